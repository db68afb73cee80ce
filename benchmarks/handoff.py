"""The hand-off, measured: how long ``unipt train`` takes to start (its prepare step: everything before the
first batch) today (dataset loaded and fingerprinted, backbone weights hashed), with the weights' digest
remembered, and from a cache alone; and how many raw examples per second ``unipt predict`` handles with
the default model (MiniLM-L6, all 7 hidden states, UniPT transformer, fp16 cache) on this machine.

    python benchmarks/handoff.py [--examples 2000] [--predict 1000]

The model is the default config's, trained for one epoch on a seeded sample of ``--examples`` Rotten
Tomatoes snippets (prediction speed does not depend on how well it was trained).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, machine, print_table, write_report  # noqa: E402
from unipt.pipeline import experiment  # noqa: E402
from unipt.pipeline.cache import file_digests  # noqa: E402
from unipt.pipeline.config import load_config  # noqa: E402
from unipt.pipeline.model.predict import load_model  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "rt_minilm.yaml"


def timed(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--predict", type=int, default=1000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="unipt-handoff-"))
    os.environ["UNIPT_DIGEST_MEMO"] = str(work / "digests.json")
    storage = [f"storage.cache_root={work / 'cache'}", f"storage.runs_root={work / 'runs'}",
               f"storage.registry={work / 'registry.sqlite'}"]  # fmt: skip
    full = load_config(CONFIG, storage)

    def cold() -> None:  # what every `unipt train` paid before: the weights hashed again
        file_digests._MEMORY.clear()
        Path(os.environ["UNIPT_DIGEST_MEMO"]).unlink(missing_ok=True)
        experiment.prepare(full)

    today = timed(cold)
    remembered = timed(lambda: experiment.prepare(full))

    small = load_config(CONFIG, [*storage, f"dataset.limit={args.examples}", "train.epochs=1"])
    prep = experiment.prepare(small)
    run = experiment.run(prep, progress=False)
    location = str(prep.cache_root.location(prep.key))
    alone = timed(lambda: experiment.prepare_for_cache(location))

    model = load_model(run.run_dir, device="cpu")
    texts = prep.dataset.table.column("text").to_pylist()[: args.predict]
    model.predict(texts[:64])  # loads the backbone: not part of the rate
    started = time.perf_counter()
    model.predict(texts, batch_size=256)
    rate = len(texts) / (time.perf_counter() - started)

    rows = [
        {
            "what": "unipt train startup, today (data + fingerprint + weights hashed)",
            "seconds": round(today, 3),
        },
        {"what": "unipt train startup, weights' digest remembered", "seconds": round(remembered, 3)},
        {"what": "unipt train --cache startup, cache alone", "seconds": round(alone, 3)},
        {
            "what": f"unipt predict, default model, {len(texts)} snippets (examples/s)",
            "seconds": round(rate, 1),
        },
    ]
    print_table(["what", "value"], [[r["what"], r["seconds"]] for r in rows])
    write_report(RESULTS / "handoff.json", {"machine": machine(), "rows": rows}, ["what", "seconds"])


if __name__ == "__main__":
    main()
