"""What MLflow and TensorBoard show for one unipt run, written as files (issue 15's closing note).

Trains from an existing cache with both sinks on, then reads each back with the tool's own reader:

    python benchmarks/tracking_views.py --cache .unipt/cache/KEY --epochs 2

writes to benchmarks/results/tracking/: ``mlflow_run.json`` (run info, params, tags, every metric's history,
artifacts), ``tensorboard_scalars.csv`` (tag, step, value), ``tensorboard_scalars.png`` (those curves, as
TensorBoard's scalar tab draws them) and ``record_tracking.json`` (what the run record keeps).
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results" / "tracking"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cache", required=True, help="a Zarr cache path (unipt cache ls)")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()

    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from unipt.pipeline.cli.app import main as unipt

    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        argv = ["train", "--cache", args.cache, "--runs-root", str(work / "runs"), "--registry",
                str(work / "registry.sqlite"), "--set", f"train.epochs={args.epochs}",
                "--set", f"tracking.mlflow={work / 'mlruns'}", "--set", f"tracking.tensorboard={work / 'tb'}",
                "--no-progress"]  # fmt: skip
        assert unipt(argv) == 0
        (run_dir,) = (work / "runs").iterdir()
        record = json.loads((run_dir / "record.json").read_text())
        tracking = record["tracking"]
        (OUT / "record_tracking.json").write_text(
            json.dumps({"run_id": record["run_id"], **tracking}, indent=2)
        )

        client = MlflowClient(tracking_uri=tracking["mlflow_uri"])
        run = client.get_run(tracking["mlflow_run_id"])
        view = {
            "experiment": client.get_experiment(run.info.experiment_id).name,
            "run_name": run.info.run_name,
            "status": run.info.status,
            "tags": {k: v for k, v in sorted(run.data.tags.items()) if not k.startswith("mlflow.source")},
            "params": dict(sorted(run.data.params.items())),
            "metrics": {
                key: [
                    {"step": m.step, "value": m.value}
                    for m in client.get_metric_history(run.info.run_id, key)
                ]
                for key in sorted(run.data.metrics)
            },
            "artifacts": [
                {"path": f.path, "bytes": f.file_size} for f in client.list_artifacts(run.info.run_id)
            ],
        }
        (OUT / "mlflow_run.json").write_text(json.dumps(view, indent=2))

        events = EventAccumulator(tracking["tensorboard_dir"])
        events.Reload()
        rows = [
            (tag, e.step, e.value) for tag in sorted(events.Tags()["scalars"]) for e in events.Scalars(tag)
        ]
        with open(OUT / "tensorboard_scalars.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["tag", "step", "value"])
            writer.writerows(rows)
        _plot(rows, OUT / "tensorboard_scalars.png")
    print(f"wrote {OUT}")


def _plot(rows: list[tuple[str, int, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tags = sorted({tag for tag, _, _ in rows if not tag.startswith("final/")})
    fig, axes = plt.subplots(1, len(tags), figsize=(3.2 * len(tags), 3), dpi=100, squeeze=False)
    for axis, tag in zip(axes[0], tags, strict=True):
        points = [(step, value) for t, step, value in rows if t == tag]
        axis.plot([p[0] for p in points], [p[1] for p in points], "o-")
        axis.set_title(tag)
        axis.set_xlabel("epoch")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
