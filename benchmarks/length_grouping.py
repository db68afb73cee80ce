"""What length grouping buys: padding, epoch time and accuracy, with ``train.length_grouping`` on and off.

On the default experiment (configs/rt_minilm.yaml, every snippet unless ``--limit``), from one cache:

- **padding**: over one shuffled training epoch, padded tokens per real token (``B * N`` against the
  lengths) and the same for the ``N x N`` interaction term (``B * N^2`` against ``sum(n^2)``);
- **UniPT from the cache**: seeds ``--seeds``, each trained with grouping off and on (taking turns, so a
  load that comes and goes lands on both alike): median seconds per epoch, val/test accuracy;
- **UniPT online** (backbone in memory, :mod:`benchmarks.online_baselines`): the same on ``--online-limit``
  snippets for ``--online-epochs`` epochs, seeds ``--online-seeds`` (default: ``--seeds``), off and on
  taking turns: it walks the batches the cache loader would give, so grouping must speed it up alike for
  the cache-vs-online ratio to stay fair.

Writes benchmarks/results/length_grouping.json and .csv.

    python benchmarks/length_grouping.py                          # the README's numbers
    python benchmarks/length_grouping.py --limit 600 --epochs 1 --seeds 0 --online-limit 200   # a quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402,F401  (before Ray: see extract/runner.py)

from benchmarks.common import RESULTS, machine, mean_std, print_table, write_report  # noqa: E402
from unipt.pipeline.config import ExperimentConfig, load_config  # noqa: E402
from unipt.train.loader import CacheBatches  # noqa: E402

COLUMNS = ("stage", "length_grouping", "seed", "seconds_per_epoch", "val_acc", "test_acc", "samples_per_s")


def padding(loader: CacheBatches, epoch: int = 0) -> dict[str, float]:
    """Padded over real tokens, and the same for the N x N term, over one epoch's batch order."""
    lengths = loader.lengths
    padded = real = padded_sq = real_sq = 0
    for batch in loader.epoch(epoch):
        n = lengths[batch.indices].astype(np.int64)
        padded += len(n) * int(n.max())
        padded_sq += len(n) * int(n.max()) ** 2
        real += int(n.sum())
        real_sq += int((n**2).sum())
    return {"tokens": padded / real, "interaction": padded_sq / real_sq}


def with_train(config: ExperimentConfig, **train: Any) -> ExperimentConfig:
    return config.model_copy(update={"train": config.train.model_copy(update=train)})


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/rt_minilm.yaml")
    parser.add_argument("--limit", type=int, default=0, help="dataset.limit (0: every snippet)")
    parser.add_argument("--epochs", type=int, help="train.epochs (default: the config's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--online-limit", type=int, default=2000, help="snippets for the online runs (0: skip)"
    )
    parser.add_argument("--online-epochs", type=int, default=2)
    parser.add_argument("--online-seeds", type=int, nargs="+", help="online seeds (default: --seeds)")
    parser.add_argument("--cache-root", default=".unipt/cache")
    parser.add_argument("--out", default=str(RESULTS / "length_grouping.json"))
    args = parser.parse_args()

    from benchmarks.online_baselines import train_online
    from unipt.pipeline import experiment

    overrides = [f"storage.cache_root={args.cache_root}", "train.probe_baseline=false"]
    overrides += [f"dataset.limit={args.limit}"] if args.limit else []
    overrides += [f"train.epochs={args.epochs}"] if args.epochs else []
    config = load_config(args.config, overrides)
    prep = experiment.prepare(config)
    experiment.extract(prep, progress=False).release()
    reader = experiment.open_for_training(prep)

    pads = {}
    for grouping in (False, True):
        loader = CacheBatches.for_split(
            reader, "train", with_train(config, length_grouping=grouping).train, 0, True
        )
        pads[grouping] = padding(loader)
    train_examples = len(reader.split_indices("train"))

    rows: list[dict[str, Any]] = []
    for seed in args.seeds:
        for grouping in (False, True):
            trial = with_train(config, length_grouping=grouping).model_copy(update={"seed": seed})
            trained = experiment.train(dataclasses.replace(prep, config=trial), reader, progress=False)
            per_epoch = statistics.median(h["seconds"] for h in trained.history)
            rows.append(
                {
                    "stage": "unipt-cache",
                    "length_grouping": grouping,
                    "seed": seed,
                    "seconds_per_epoch": per_epoch,
                    "val_acc": trained.metrics["val_acc"],
                    "test_acc": trained.metrics["test_acc"],
                    "samples_per_s": train_examples / per_epoch,
                }
            )
            print(f"cache seed {seed} grouping {grouping}: {per_epoch:.1f}s/epoch, test_acc "
                  f"{trained.metrics['test_acc']:.4f}", flush=True)  # fmt: skip

    if args.online_limit:
        online = load_config(args.config, [f"dataset.limit={args.online_limit}", "train.probe_baseline=false",
                                           f"train.epochs={args.online_epochs}"])  # fmt: skip
        online_prep = experiment.prepare(online)
        for seed, grouping in [(s, g) for s in args.online_seeds or args.seeds for g in (False, True)]:
            result = train_online(
                online_prep.dataset.table,
                online_prep.dataset.label_names,
                online.backbone,
                with_train(online, length_grouping=grouping).train,
                seed,
                "unipt-online",
                online.extract,
            )
            per_epoch = statistics.median(h["seconds"] for h in result.history)
            rows.append(
                {
                    "stage": "unipt-online",
                    "length_grouping": grouping,
                    "seed": seed,
                    "seconds_per_epoch": per_epoch,
                    "val_acc": result.metrics["val_acc"],
                    "test_acc": result.metrics["test_acc"],
                    "samples_per_s": online_prep.dataset.split_counts()["train"] / per_epoch,
                }
            )
            print(f"online seed {seed} grouping {grouping}: {per_epoch:.1f}s/epoch", flush=True)

    summary: dict[str, Any] = {}
    for stage in ("unipt-cache", "unipt-online"):
        by = {
            g: [r for r in rows if r["stage"] == stage and r["length_grouping"] == g] for g in (False, True)
        }
        if not by[False]:
            continue
        off, on = (statistics.median(r["seconds_per_epoch"] for r in by[g]) for g in (False, True))
        summary[stage] = {
            "seconds_per_epoch_off": off,
            "seconds_per_epoch_on": on,
            "speedup": off / on,
            "test_acc_off": mean_std([r["test_acc"] for r in by[False]]),
            "test_acc_on": mean_std([r["test_acc"] for r in by[True]]),
            "val_acc_off": mean_std([r["val_acc"] for r in by[False]]),
            "val_acc_on": mean_std([r["val_acc"] for r in by[True]]),
        }
    print(
        f"\npadding per real token: off {pads[False]['tokens']:.2f}x, on {pads[True]['tokens']:.2f}x; "
        f"N x N term: off {pads[False]['interaction']:.2f}x, on {pads[True]['interaction']:.2f}x"
    )
    print_table(
        ("stage", "s/epoch off", "s/epoch on", "speedup", "test acc off", "test acc on"),
        [
            (
                stage,
                f"{s['seconds_per_epoch_off']:.1f}",
                f"{s['seconds_per_epoch_on']:.1f}",
                f"{s['speedup']:.2f}x",
                f"{s['test_acc_off'][0]:.4f} ± {s['test_acc_off'][1]:.4f}",
                f"{s['test_acc_on'][0]:.4f} ± {s['test_acc_on'][1]:.4f}",
            )
            for stage, s in summary.items()
        ],
    )
    report = {
        "benchmark": "length_grouping",
        "machine": machine(),
        "config": args.config,
        "settings": vars(args),
        "train_examples": train_examples,
        "padding": {"off": pads[False], "on": pads[True]},
        "summary": summary,
        "rows": rows,
    }
    write_report(Path(args.out), report, COLUMNS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
