"""``unipt export|predict|evaluate``, and how ``train``/``sweep`` read their config when it may be a cache.

The tuned model leaves its run as ``model.safetensors`` + ``model.json`` (:mod:`unipt.pipeline.model.files`);
predicting runs the backbone it was trained on and then the model (:mod:`unipt.pipeline.model.predict`).
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from unipt.pipeline.cli.common import load_args, print_json, storage_overrides
from unipt.pipeline.errors import UniptError
from unipt.pipeline.storage import DEFAULT_REGISTRY

if TYPE_CHECKING:
    from unipt.pipeline import experiment
    from unipt.pipeline.config import ExperimentConfig


def load_config_or_cache(args: argparse.Namespace) -> ExperimentConfig:
    """The CONFIG with its flags, or, without one, the ``--cache``'s own attributes with them."""
    if args.config:
        return load_args(args)
    if not getattr(args, "cache", None):
        raise UniptError(f"`unipt {args.command}` needs a CONFIG, or --cache PATH to work from a cache alone")
    from unipt.pipeline.experiment.cache_config import config_for_cache

    return config_for_cache(args.cache, [*(args.set or []), *storage_overrides(args)])


def prepare_train(args: argparse.Namespace) -> experiment.Prepared:
    """What ``unipt train`` trains: the config's cache by key, or ``--cache`` (then CONFIG is optional)."""
    from unipt.pipeline import experiment

    if args.cache is None:
        return experiment.prepare(load_config_or_cache(args))
    config = load_args(args) if args.config else None
    return experiment.prepare_for_cache(args.cache, config, [*(args.set or []), *storage_overrides(args)])


def cmd_export(args: argparse.Namespace) -> int:
    from unipt.pipeline.model.files import export_model, model_directory

    run_dir = model_directory(args.run, args.registry)
    if args.mlflow:
        from unipt.pipeline.model.mlflow_export import export_pyfunc_model

        print(export_pyfunc_model(run_dir, args.out))
    else:
        print(export_model(run_dir, args.out))
    return 0


def _model_and_inputs(args: argparse.Namespace, labelled: bool = False):
    from unipt.pipeline.model.predict import load_model
    from unipt.pipeline.model.prediction_files import InputTable, read_inputs

    if args.batch_size < 1:
        raise UniptError(f"--batch-size {args.batch_size}: give 1 or more")
    model = load_model(
        args.model,
        registry=args.registry,
        device=args.device,
        backbone=args.backbone,
        trust_remote_code=args.trust_remote_code,
    )
    if getattr(args, "text", None):
        if args.input:
            raise UniptError("give --input FILE or --text, not both")
        return model, InputTable([str(i) for i in range(len(args.text))], list(args.text), None)
    if not args.input:
        raise UniptError('nothing to read: give --input FILE (csv, jsonl, parquet) or --text "..."')
    # An unset column is the one the model was trained on (model.json), else the usual name.
    trained = model.spec.columns
    table = read_inputs(
        args.input,
        kind=model.spec.input,
        text_column=args.text_column or trained.get("text", "text"),
        text_pair_column=args.text_pair_column or trained.get("text_pair", "text_pair"),
        image_column=args.image_column or trained.get("image", "image"),
        id_column=args.id_column or trained.get("id"),
        id_column_required=args.id_column is not None,
        label_column=(args.label_column or trained.get("label", "label")) if labelled else None,
    )
    return model, table


def cmd_predict(args: argparse.Namespace) -> int:
    from unipt.pipeline.model.prediction_files import write_predictions

    model, table = _model_and_inputs(args)
    predictions = model.predict(
        table.inputs, table.ids, batch_size=args.batch_size, progress=not args.no_progress
    )
    if args.out:
        print(write_predictions(predictions, args.out))
    else:
        for row in predictions.rows():
            print(json.dumps(row))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from unipt.pipeline.model.prediction_files import write_metrics
    from unipt.pipeline.model.predictions import format_metrics, format_report

    if args.out and not str(args.out).lower().endswith(".json"):
        raise UniptError(f"--out {args.out}: give a .json file, e.g. --out metrics.json")
    model, table = _model_and_inputs(args, labelled=True)
    assert table.labels is not None
    evaluation = model.evaluation(
        table.inputs, table.labels, batch_size=args.batch_size, progress=not args.no_progress
    )
    evaluation = {"model": str(model.directory), "input": args.input, **evaluation}
    if args.out:
        write_metrics(evaluation, args.out)
    if args.json:
        print_json(evaluation)
        return 0
    print(f"{format_metrics(evaluation['metrics'])} | {evaluation['examples']} examples")
    if "report" in evaluation:
        print("\n".join(format_report(evaluation["report"])))
    if args.out:
        print(f"wrote {args.out}")
    return 0


def add_model_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``export``, ``predict`` and ``evaluate``."""
    registry_help = f"SQLite run registry, to find a run id (default: {DEFAULT_REGISTRY})"
    export = sub.add_parser(
        "export",
        help="copy a run's tuned model (model.safetensors + model.json) into a self-describing folder",
        description="copy a run's tuned model: the best epoch's UniPT and head (model.safetensors) and "
        "model.json (architecture, labels, cache dtype and settings, backbone identity, metrics)",
    )
    export.add_argument("run", help="a run id (or unique prefix) or a run directory")
    export.add_argument("--out", required=True, help="a new (or empty) folder")
    export.add_argument("--registry", default=DEFAULT_REGISTRY, help=registry_help)
    export.add_argument(
        "--mlflow",
        action="store_true",
        help="write an MLflow pyfunc model folder instead (MLmodel, the model under data/), for "
        "`mlflow models serve -m DIR` or MLflow's registry; needs mlflow",
    )
    export.set_defaults(handler=cmd_export)

    for name, help_text, handler in (
        (
            "predict",
            "run a tuned model on raw inputs: the backbone it was trained on, then UniPT; writes the label "
            "(or value), class probabilities and the example id",
            cmd_predict,
        ),
        ("evaluate", "the task's metrics of a tuned model on labelled raw inputs", cmd_evaluate),
    ):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("model", help="a run id (or unique prefix), a run directory, or an exported folder")
        p.add_argument("--input", help="a .csv, .jsonl or .parquet file of inputs")
        trained = "default: the column the model was trained on, else"
        p.add_argument("--text-column", help=f"the input's text column ({trained} text)")
        p.add_argument(
            "--text-pair-column", help=f"text-pair models: the second text's column ({trained} text_pair)"
        )
        p.add_argument("--image-column", help=f"image models: the column of image paths ({trained} image)")
        p.add_argument(
            "--id-column",
            help="a column of example ids (default: the id column the model was trained with, when the "
            "input has it, else the row numbers)",
        )
        p.add_argument("--backbone", help="the backbone's folder, when not where model.json says")
        p.add_argument(
            "--trust-remote-code",
            action="store_true",
            help="let the backbone run Python code shipped with it (only for a backbone you trust; "
            "model.json alone never turns this on)",
        )
        p.add_argument(
            "--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: a GPU if any"
        )
        p.add_argument("--batch-size", type=int, default=256, help="inputs per step (default 256)")
        p.add_argument("--registry", default=DEFAULT_REGISTRY, help=registry_help)
        p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
        p.set_defaults(handler=handler)
        if name == "predict":
            p.add_argument(
                "--text", action="append", help="a text to predict (repeatable), instead of --input"
            )
            p.add_argument(
                "--out", help="write predictions here (.csv or .jsonl); default: JSON lines on stdout"
            )
        else:
            p.add_argument("--label-column", help=f"the input's label column ({trained} label)")
            p.add_argument(
                "--out",
                help="also write the metrics, per-class report and confusion matrix here (a .json file)",
            )
            p.add_argument(
                "--json", action="store_true", help="print the evaluation as JSON on stdout (no table)"
            )
