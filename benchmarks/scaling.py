"""How the cost grows with the backbone and the dataset: extraction, cache bytes, epoch time, peak RSS.

Backbones of BERT shape at three sizes: all-MiniLM-L6-v2 (the bundled real weights; 6 layers, width 384),
BERT-base shape (12 x 768) and BERT-large shape (24 x 1024). The two larger ones are randomly initialised
from a ``BertConfig`` (seeded) and share MiniLM's tokenizer (the same uncased WordPiece vocabulary): the
time of a forward pass, the memory it takes and the bytes of its hidden states depend on the shapes, not
on the weights' values, so random weights measure the cost exactly (their accuracy means nothing and is
not reported). Data: seeded samples of Rotten Tomatoes (``dataset.limit``).

For every (backbone, size) point, each step runs in a fresh process of its own, so each peak RSS is that
step's alone:

- ``extract``: the real extraction (Ray worker, fp16 cache): wall seconds and backbone-forward seconds
  per 1k tokens; cache bytes on disk (every file). int8 bytes: the same rows re-encoded to int8 and
  compressed with the cache's codec and chunking (:func:`unipt.pipeline.experiment.plan.bytes_by_dtype`), plus
  the same small files: no second forward pass.
- ``cache``: one UniPT epoch from the cache (``train.epochs=1``, no linear probe): seconds, peak RSS.
- ``online``: the same UniPT epoch with the backbone in memory, run on every batch (the paper's code,
  :func:`benchmarks.online_baselines.fit_online`): seconds, peak RSS.

Each epoch includes its validation pass. Fitted exponents are least-squares slopes in log-log space.

    python benchmarks/scaling.py                                     # the README's grid (~30 min, 2 cores)
    python benchmarks/scaling.py --backbones minilm --sizes 12808 --resume   # + every snippet (~6 min)
    python benchmarks/scaling.py --backbones minilm --sizes 100 200 --out /tmp/s.json   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, machine, print_table  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "rt_minilm.yaml"
# name -> (layers, width, heads); None: the bundled real model.
SHAPES: dict[str, tuple[int, int, int] | None] = {
    "minilm": None,
    "bert-base": (12, 768, 12),
    "bert-large": (24, 1024, 16),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def backbone_dir(name: str, work: Path) -> str:
    """The backbone's ``name_or_path``: the bundled MiniLM, or a seeded random BERT of the given shape."""
    shape = SHAPES[name]
    if shape is None:
        return "bundled:all-minilm-l6-v2"
    folder = work / name
    if (folder / "model.safetensors").exists():
        return str(folder)
    import torch
    from transformers import BertConfig, BertModel

    from unipt.pipeline.data.bundled import bundled_model_path

    layers, width, heads = shape
    torch.manual_seed(0)
    config = BertConfig(
        num_hidden_layers=layers, hidden_size=width, num_attention_heads=heads, intermediate_size=4 * width
    )
    BertModel(config).save_pretrained(folder, safe_serialization=True)
    minilm = bundled_model_path("bundled:all-minilm-l6-v2")
    for file in TOKENIZER_FILES:
        shutil.copy(minilm / file, folder / file)
    return str(folder)


def _overrides(backbone: str, size: int, cache_root: Path) -> list[str]:
    return [
        f"dataset.limit={size}",
        f"backbone.name_or_path={backbone}",
        f"storage.cache_root={cache_root}",
        "train.epochs=1",
        "train.probe_baseline=false",
    ]


# --- one step, in its own process ------------------------------------------------------------------------
def run_step(step: str, backbone: str, size: int, cache_root: Path) -> dict[str, Any]:
    from benchmarks.resources import peak_rss_mib
    from unipt.pipeline import experiment
    from unipt.pipeline.config import load_config

    config = load_config(CONFIG, _overrides(backbone, size, cache_root))
    prep = experiment.prepare(config)
    if step.startswith("plan"):  # "plan<N>": unipt plan's predictions from a sample of N examples
        from dataclasses import asdict

        from unipt.pipeline.experiment.plan import plan

        predicted = plan(prep, sample=int(step[4:]))
        return {**asdict(predicted.backbones[0]), "plan_s": predicted.sample_s}
    if step == "extract":
        from unipt.pipeline.cache.opener import open_cache
        from unipt.pipeline.experiment.plan import bytes_by_dtype

        with experiment.extract(prep, progress=False) as result:
            reader = open_cache(result.path)
            on_disk = sum(p.stat().st_size for p in cache_root.rglob("*") if p.is_file())
            arrays = bytes_by_dtype(reader, config.extract)
            row = {
                "examples": result.examples,
                "tokens": result.tokens,
                "extract_s": result.seconds,
                "forward_s": result.stats.get("forward_s"),
                "fp16_bytes": on_disk,
                # The small files (offsets, examples, metadata) are the same for both dtypes.
                "int8_bytes": on_disk - arrays["float16"] + arrays["int8"],
                "params": None,
            }
        return row
    if step == "cache":
        from unipt.train.tasks import train_task

        reader = experiment.open_for_training(prep)
        result = train_task(reader, config.train, config.seed, progress=False)
        return {"epoch_s": result.history[0]["seconds"], "peak_rss_mib": peak_rss_mib()}
    from benchmarks.online_baselines import fit_online, load_online_data

    data = load_online_data(
        prep.dataset.table, prep.dataset.label_names, config.backbone, config.train, config.extract
    )
    result, _ = fit_online(data, config.train, config.seed, "unipt-online")
    return {
        "epoch_s": result.history[0]["seconds"],
        "peak_rss_mib": peak_rss_mib(),
        "params": sum(p.numel() for p in data.backbone.model.parameters()),
        "setup_s": data.setup_seconds,
    }


def _child(step: str, backbone: str, size: int, cache_root: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", step, "--backbone", backbone]
        command += ["--size", str(size), "--cache-root", str(cache_root), "--result", str(out)]
        subprocess.run(command, check=True, env={**os.environ, "RAY_DEDUP_LOGS": "1"})
        return json.loads(out.read_text())


# --- the grid, the fits, the plot ------------------------------------------------------------------------
def slope(x: list[float], y: list[float]) -> float | None:
    """Least-squares exponent of y ~ x^k (None with fewer than two distinct x)."""
    if len(set(x)) < 2:
        return None
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def fits(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"by_dataset_size": {}, "by_backbone": {}}
    for name in dict.fromkeys(r["backbone"] for r in rows):
        mine = [r for r in rows if r["backbone"] == name]
        tokens = [r["tokens"] for r in mine]
        out["by_dataset_size"][name] = {
            key: slope(tokens, [r[key] for r in mine])
            for key in ("fp16_bytes", "int8_bytes", "forward_s", "cache_epoch_s", "online_epoch_s")
        }
    for size in dict.fromkeys(r["size"] for r in rows):
        same = [r for r in rows if r["size"] == size and r.get("params")]
        params = [r["params"] for r in same]
        out["by_backbone"][str(size)] = {
            "x": "backbone parameters",
            **{
                key: slope(params, [r[key] for r in same])
                for key in ("fp16_bytes", "forward_s_per_1k_tokens", "cache_epoch_s", "online_epoch_s")
            },
        }
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name in dict.fromkeys(r["backbone"] for r in rows):
        mine = sorted((r for r in rows if r["backbone"] == name), key=lambda r: r["tokens"])
        tokens = [r["tokens"] for r in mine]
        (line,) = axes[0].plot(tokens, [r["fp16_bytes"] / 2**20 for r in mine], "o-", label=f"{name} fp16")
        axes[0].plot(tokens, [r["int8_bytes"] / 2**20 for r in mine], "s--", color=line.get_color(),
                     label=f"{name} int8")  # fmt: skip
        axes[1].plot(tokens, [r["extract_s"] for r in mine], "o-", color=line.get_color(), label=name)
        axes[2].plot(tokens, [r["cache_epoch_s"] for r in mine], "o-", color=line.get_color(),
                     label=f"{name} from cache")  # fmt: skip
        axes[2].plot(tokens, [r["online_epoch_s"] for r in mine], "s--", color=line.get_color(),
                     label=f"{name} online")  # fmt: skip
    titles = ("cache on disk (MiB)", "extraction (s, wall)", "one UniPT epoch (s)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tokens in the dataset")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbones", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--sizes", nargs="+", type=int, default=[1000, 4000])
    parser.add_argument(
        "--large-sizes", nargs="+", type=int, default=[1000], help="sizes for bert-large (slow on CPU)"
    )
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "unipt-scaling"))
    parser.add_argument("--out", default=str(RESULTS / "scaling.json"))
    parser.add_argument("--resume", action="store_true", help="keep the points in --out, add the rest")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # extract, cache, online or plan<N>
    parser.add_argument("--backbone", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cache-root", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        row = run_step(args.worker, args.backbone, args.size, Path(args.cache_root))
        Path(args.result).write_text(json.dumps(row))
        return

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    rows: list[dict[str, Any]] = json.loads(out.read_text())["rows"] if args.resume and out.exists() else []
    for name in args.backbones:
        backbone = backbone_dir(name, work)
        for size in args.large_sizes if name == "bert-large" else args.sizes:
            if any(r["backbone"] == name and r["size"] == size for r in rows):
                continue  # measured by an earlier run (--resume)
            cache_root = work / "caches" / f"{name}-{size}"
            shutil.rmtree(cache_root, ignore_errors=True)  # a fresh extraction every time
            started = time.perf_counter()
            row: dict[str, Any] = {
                "backbone": name,
                "size": size,
                **_child("extract", backbone, size, cache_root),
            }
            cache, online = (
                _child("cache", backbone, size, cache_root),
                _child("online", backbone, size, cache_root),
            )
            shutil.rmtree(cache_root, ignore_errors=True)
            row |= {
                "params": online["params"],
                "forward_s_per_1k_tokens": row["forward_s"] / row["tokens"] * 1000,
                "extract_s_per_1k_tokens": row["extract_s"] / row["tokens"] * 1000,
                "cache_epoch_s": cache["epoch_s"],
                "online_epoch_s": online["epoch_s"],
                "epoch_speedup": online["epoch_s"] / cache["epoch_s"],
                "cache_peak_rss_mib": cache["peak_rss_mib"],
                "online_peak_rss_mib": online["peak_rss_mib"],
                "rss_ratio": cache["peak_rss_mib"] / online["peak_rss_mib"],
                "online_setup_s": online["setup_s"],
                "point_s": time.perf_counter() - started,
            }
            saved = online["epoch_s"] - cache["epoch_s"]
            # Extract once, then each epoch saves `saved` seconds: the cache wins from this many epochs on.
            row["break_even_epochs"] = row["extract_s"] / saved if saved > 0 else None
            rows.append(row)
            print(json.dumps(row), flush=True)
            _write(out, rows, args)
    header = ("backbone", "size", "tokens", "s/1k tok", "fp16 MiB", "int8 MiB", "cache s", "online s",
              "speed-up", "RSS cache", "RSS online", "RSS ratio", "break-even ep")  # fmt: skip
    print_table(
        header,
        [
            (
                r["backbone"],
                r["size"],
                r["tokens"],
                f"{r['forward_s_per_1k_tokens']:.2f}",
                f"{r['fp16_bytes'] / 2**20:.1f}",
                f"{r['int8_bytes'] / 2**20:.1f}",
                f"{r['cache_epoch_s']:.2f}",
                f"{r['online_epoch_s']:.1f}",
                f"{r['epoch_speedup']:.1f}x",
                f"{r['cache_peak_rss_mib']:.0f}",
                f"{r['online_peak_rss_mib']:.0f}",
                f"{r['rss_ratio']:.2f}",
                "-" if r["break_even_epochs"] is None else f"{r['break_even_epochs']:.2f}",
            )  # fmt: skip
            for r in rows
        ],
    )
    print(json.dumps(fits(rows), indent=2))
    plot(rows, out.with_suffix(".png"))
    print(f"written to {out} and {out.with_suffix('.png')}")


def _write(out: Path, rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "scaling",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {**machine(), "load_average_1m": os.getloadavg()[0]},
        "note": "2 CPU cores: compare points of one run, not absolute seconds",
        "sizes": args.sizes,
        "large_sizes": args.large_sizes,
        "rows": rows,
        "fits": fits(rows),
    }
    out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
