"""UniPT vs the linear probe on a text-pair task from real data (issue 14, point 4).

``bundled:rt_same_movie``: are two Rotten Tomatoes critic snippets about the same movie? ~6k balanced
pairs, split by movie, each pair encoded together by all-MiniLM-L6-v2 (configs/rt_pairs_minilm.yaml).
The cache is extracted once (``unipt.pipeline.experiment.extract``, a hit when ``unipt run`` built it
before); then UniPT is trained with each seed, and every run also fits its linear probe (last layer,
mean-pooled) and reports the majority class, as ``unipt run``'s summary line does.

    python benchmarks/text_pairs.py                      # seeds 0 1 2, the whole dataset
    python benchmarks/text_pairs.py --seeds 0 --set dataset.limit=2000   # a quicker look

writes benchmarks/results/text_pairs.json and .csv (one row per seed, then the mean and std), and a
reference that trains nothing: the cosine of the two snippets encoded apart (``bi_encoder_cosine``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, machine, mean_std, print_table, write_report  # noqa: E402

CONFIG = "configs/rt_pairs_minilm.yaml"
METRICS = ("test_acc", "test_f1", "probe_test_acc", "probe_test_f1", "majority_test_acc", "val_acc")
COLUMNS = ("seed", *METRICS, "train_seconds")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--out", type=Path, default=RESULTS / "text_pairs.json")
    parser.add_argument(
        "--bi-encoder-only",
        action="store_true",
        help="only (re)compute the bi-encoder cosine reference and add it to the report at --out",
    )
    args = parser.parse_args()

    from unipt.pipeline import experiment
    from unipt.pipeline.config import load_config

    prep = experiment.prepare(load_config(args.config, args.set))
    if args.bi_encoder_only:
        report = json.loads(args.out.read_text())
        report.pop("date", None)
        report["bi_encoder_cosine"] = bi_encoder_cosine(prep)
        write_report(args.out, report, COLUMNS)
        return
    started = time.perf_counter()
    with experiment.extract(prep, progress=False) as extracted:
        cache = {
            "key": prep.key,
            "hit": extracted.cache_hit,
            "extract_seconds": round(time.perf_counter() - started, 1),
        }
        rows: list[dict] = []
        for seed in args.seeds:
            seeded = experiment.prepare(load_config(args.config, [*args.set, f"seed={seed}"]))
            started = time.perf_counter()
            trained = experiment.train(seeded, progress=False)
            row = {"seed": seed, **{m: trained.metrics.get(m) for m in METRICS}}
            rows.append({**row, "train_seconds": round(time.perf_counter() - started, 1)})
            # Written after every seed, so a long run that is stopped keeps the seeds it finished.
            _report(args, prep, cache, rows)
    _report(args, prep, cache, rows, bi_encoder_cosine(prep))


def bi_encoder_cosine(prep: Any) -> dict[str, float]:
    """A reference that trains nothing: each snippet encoded alone (last layer, mean-pooled), the pair's
    cosine similarity, "same" above a threshold chosen on val. Says whether the task has signal that the
    backbone sees when the two texts are not encoded together."""
    import numpy as np

    from unipt.extract.backbones import HFTextBackbone
    from unipt.extract.spec import BackboneLoadSpec

    backbone = HFTextBackbone(BackboneLoadSpec(prep.primary.identity.local_dir, device="cpu"))
    last = backbone.num_hidden_states - 1
    table, same = prep.dataset.table, prep.dataset.label_names.index("same")

    def embed(texts: list[str]) -> np.ndarray:
        encoded = backbone.encode(texts, [last], prep.config.backbone.max_length, 64, "float32")
        bounds = np.cumsum([0, *encoded.lengths])
        pooled = np.stack(
            [encoded.layers[last][a:b].mean(0) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        )
        return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)

    scores, truth = {}, {}
    for split in ("val", "test"):
        part = table.filter(np.array(table.column("split").to_pylist()) == split)
        first, second = part.column("text").to_pylist(), part.column("text_pair").to_pylist()
        scores[split] = (embed(first) * embed(second)).sum(1)
        truth[split] = np.array(part.column("label").to_pylist()) == same
    threshold = max(
        np.unique(scores["val"]), key=lambda t: float(np.mean((scores["val"] >= t) == truth["val"]))
    )
    test, positive = scores["test"], truth["test"]
    # ROC AUC: the chance that a random "same" pair scores above a random "different" one (ties count half).
    above = (test[positive][:, None] > test[~positive][None, :]).mean()
    ties = (test[positive][:, None] == test[~positive][None, :]).mean()
    return {
        "val_threshold": float(threshold),
        "test_acc": float(np.mean((test >= threshold) == positive)),
        "test_auc": float(above + ties / 2),
    }


def _report(
    args: argparse.Namespace, prep: Any, cache: dict, rows: list[dict], bi_encoder: dict | None = None
) -> None:
    summary: dict = {"seed": "mean"}
    spread: dict = {"seed": "std"}
    for name in (*METRICS, "train_seconds"):
        values = [r[name] for r in rows if r[name] is not None]
        if values:
            summary[name], spread[name] = mean_std(values)
    print()
    print_table(COLUMNS, [[_cell(r.get(c)) for c in COLUMNS] for r in [*rows, summary, spread]])
    report = {
        "what": "UniPT vs linear probe on bundled:rt_same_movie (same movie? pairs of Rotten Tomatoes "
        "snippets), all-MiniLM-L6-v2, pairs encoded together",
        "config": args.config,
        "overrides": args.set,
        "dataset": {
            "fingerprint": prep.dataset.fingerprint,
            "splits": prep.dataset.split_counts(),
            "classes": prep.dataset.class_counts(),
        },
        "cache": cache,
        "machine": machine(),
        "rows": [*rows, summary, spread],
        **({"bi_encoder_cosine": bi_encoder} if bi_encoder else {}),
    }
    write_report(args.out, report, COLUMNS)


def _cell(value: object) -> object:
    return f"{value:.4f}" if isinstance(value, float) else ("-" if value is None else value)


if __name__ == "__main__":
    main()
