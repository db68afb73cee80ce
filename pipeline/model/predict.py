"""A tuned model on raw inputs: the backbone it was trained on, then UniPT and its head.

``load_model(run id | run dir | exported folder)`` gives a :class:`TunedModel`. ``predict(texts or
images)`` runs what extraction ran, exactly: the backbone with the same identity (refused, naming the
difference, if this machine's files hash differently), the same tokenizer settings, truncation,
image transform and compute precision, through the same ``Backbone.encode``; then it rounds every
activation to the cache's dtype with the cache's own encoder
(:func:`unipt.pipeline.cache.encoding.encode_rows`:
fp16, bf16, or int8/float8_e4m3 with per-token scales), so UniPT sees the values it was trained on. The
backbone is loaded on first use (on the GPU when there is one); :meth:`TunedModel.outputs_from_cache`
needs none.

This module drives both stages (a backbone, then a trained model), like
:mod:`unipt.pipeline.experiment.recipe`. What it returns is a
:class:`unipt.pipeline.model.predictions.Predictions`; the files ``unipt predict`` and ``unipt evaluate``
read and write are :mod:`unipt.pipeline.model.prediction_files`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from unipt.pipeline.cache.activation_cache import ActivationCache
from unipt.pipeline.cache.encoding import decode_rows, encode_rows
from unipt.pipeline.cache.layout import LayerSpec
from unipt.pipeline.config import BackboneConfig, TrainConfig
from unipt.pipeline.errors import UniptError
from unipt.pipeline.model.files import (
    MODEL_WEIGHTS,
    ModelSpec,
    check_weights,
    model_directory,
    read_model_spec,
    save_model_folder,
)
from unipt.pipeline.model.predictions import Predictions
from unipt.pipeline.runs.registry import DEFAULT_REGISTRY
from unipt.pipeline.tasks import get_task


class _Shape:
    """What :func:`unipt.train.methods.build_model` reads from a cache, taken from ``model.json`` instead."""

    def __init__(self, spec: ModelSpec, source: str) -> None:
        self.source = source
        self.layers = list(spec.layers)
        self.hidden_sizes = {int(k): int(v) for k, v in spec.hidden_sizes.items()}
        self.label_names = list(spec.label_names)
        self._grids = {int(k): tuple(v) for k, v in spec.grids.items()}

    def layer_spec(self, layer: int) -> LayerSpec:
        return LayerSpec(layer, self.hidden_sizes[layer], self._grids.get(layer))


class TunedModel:
    """A tuned UniPT and its head, ready for raw inputs (see the module docstring)."""

    def __init__(
        self,
        directory: Path,
        spec: ModelSpec,
        device: str = "auto",
        backbone: str | None = None,
        trust_remote_code: bool = False,
    ):
        import torch
        from safetensors.torch import load_file

        from unipt.train.fit import pick_device
        from unipt.train.methods import build_model

        if get_task(spec.task).caches != 1:
            raise UniptError(
                f"model {directory} is a {spec.task} model; predict and evaluate take one-cache "
                "models (classification, regression)"
            )
        refuse_stored_remote_code(directory, spec, trust_remote_code)
        self.directory = directory
        self.spec = spec
        self.trust_remote_code = trust_remote_code
        self.device = pick_device(device)
        self._device_setting = device
        self._backbone_path = backbone
        self._backbone: Any = None
        config = TrainConfig(
            variant=spec.variant,
            method=spec.method,
            side_reduction=spec.side_reduction,
            embed_size=spec.embed_size,
            downsample_factor=spec.downsample_factor,
            dropout=spec.dropout,
            task=spec.task,
        )
        shape = _Shape(spec, str(directory))
        # Built first on the meta device (no memory): the sizes model.json states must be the tensors
        # the weights file holds before a network of those sizes is allocated.
        with torch.device("meta"):
            planned = build_model(shape, config, num_outputs=spec.num_outputs).state_dict()
        check_weights(directory / MODEL_WEIGHTS, {name: tuple(t.shape) for name, t in planned.items()})
        torch.manual_seed(0)  # weights are all loaded below; this only keeps construction quiet
        network = build_model(shape, config, num_outputs=spec.num_outputs)
        try:
            network.load_state_dict(load_file(str(directory / MODEL_WEIGHTS)))
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise UniptError(f"{directory / MODEL_WEIGHTS} does not fit its model.json ({first})") from exc
        self.network = network.to(self.device).eval()

    # --- the folder ----------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        *,
        device: str = "auto",
        backbone: str | None = None,
        trust_remote_code: bool = False,
    ) -> TunedModel:
        """The model in ``directory``: a folder :meth:`save_pretrained` or ``unipt export`` wrote, or a run
        directory (the backbone is loaded on first use; see :func:`load_model` for the arguments)."""
        path = Path(directory).expanduser()
        if not path.is_dir():
            raise UniptError(
                f"{directory} is not a folder; give one written by save_pretrained or `unipt export`"
            )
        return cls(
            path, read_model_spec(path), device=device, backbone=backbone, trust_remote_code=trust_remote_code
        )

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write this model into ``directory`` (new, empty, or holding an earlier model's files) as
        ``unipt export`` does: ``model.safetensors``, ``model.json`` and the ``README.md`` model card;
        :meth:`from_pretrained` loads it back to the same predictions. Returns the folder."""
        return save_model_folder(directory, self.network.state_dict(), self.spec)

    # --- the backbone --------------------------------------------------------------------------------------
    def backbone_config(self) -> BackboneConfig:
        """The backbone settings extraction used, as model.json stored them (allow_pickle included: the
        model never loads pickles its training run did not). ``trust_remote_code`` is the person's own
        ``--trust-remote-code``, never model.json's: a file must not decide to run code."""
        b = self.spec.backbone
        return BackboneConfig(
            name_or_path=self._backbone_path or b["name_or_path"],
            revision=b.get("revision"),
            layers=list(self.spec.layers),
            max_length=max(2, min(self.spec.max_length, 8192)),
            batch_size=self.spec.batch_size,
            trust_remote_code=self.trust_remote_code,
            allow_pickle=bool(b.get("allow_pickle")),
        )

    def backbone(self) -> Any:
        """The backbone the model was trained on, checked by its hashes and loaded once."""
        if self._backbone is None:
            from unipt.pipeline.cache.identity import backbone_identity

            settings = self.backbone_config()
            identity = backbone_identity(settings)
            for name in ("weights_sha256", "config_sha256", "tokenizer_sha256"):
                have, want = getattr(identity, name), self.spec.backbone.get(name)
                if have != want:
                    raise UniptError(
                        f"backbone {settings.name_or_path} is not the one this model was trained on: its "
                        f"{name} is {have[:12]}, the model's {str(want)[:12]}; point --backbone at the "
                        "original files"
                    )
            from unipt.extract.backbones import load_backbone
            from unipt.extract.spec import load_spec_for

            self._backbone = load_backbone(
                load_spec_for(settings, identity, self.spec.autocast, device=self._device_setting)
            )
        return self._backbone

    # --- raw inputs -> outputs -----------------------------------------------------------------------------
    def activations(self, inputs: list) -> list[dict[int, np.ndarray]]:
        """Per input, each layer's activations as the cache would hold them (rounded to its dtype),
        decoded to float32: ``[tokens, width]``, or ``[H, W, C]`` for feature maps."""
        spec = self.spec
        compute = "float16" if spec.dtype == "float16" else "float32"  # what extraction workers compute
        shard = self.backbone().encode(inputs, spec.layers, spec.max_length, spec.batch_size, compute)
        per_example: list[dict[int, np.ndarray]] = [{} for _ in inputs]
        for layer in spec.layers:
            stored, scale = encode_rows(shard.layers[layer], spec.dtype)
            rows = decode_rows(stored, spec.dtype, scale).astype(np.float32, copy=False)
            grid = spec.grids.get(str(layer))
            if grid:
                maps = rows.reshape(len(inputs), grid[0], grid[1], -1)
                for i in range(len(inputs)):
                    per_example[i][layer] = maps[i]
            else:
                assert shard.lengths is not None
                bounds = np.concatenate([[0], np.cumsum(shard.lengths)])
                for i in range(len(inputs)):
                    per_example[i][layer] = rows[bounds[i] : bounds[i + 1]]
        return per_example

    def outputs(self, examples: list[dict[int, np.ndarray]]) -> np.ndarray:
        """The model's outputs (in label units for regression) for per-example activations."""
        import torch

        from unipt.train.loader import padding_mask

        spec = self.spec
        if spec.grids:
            hidden = [
                torch.from_numpy(np.stack([ex[layer] for ex in examples])).permute(0, 3, 1, 2).contiguous()
                for layer in spec.layers
            ]
            h, w = spec.grids[str(spec.layers[-1])]
            mask = torch.ones(len(examples), h * w, dtype=torch.bool)
        else:
            lengths = [ex[spec.layers[0]].shape[0] for ex in examples]
            hidden = []
            for layer in spec.layers:
                padded = np.zeros((len(examples), max(lengths), examples[0][layer].shape[1]), np.float32)
                for row, ex in enumerate(examples):
                    padded[row, : lengths[row]] = ex[layer]
                hidden.append(torch.from_numpy(padded))
            mask = padding_mask(lengths)
        return self.forward(hidden, mask)

    def forward(self, hidden: list, mask: Any) -> np.ndarray:
        """Padded batch tensors (as :class:`unipt.train.loader.Batch` holds them) -> outputs, in label
        units."""
        import torch

        with torch.no_grad():
            out, _ = self.network([h.to(self.device) for h in hidden], mask.to(self.device))
        out = out.float().cpu().numpy().astype(np.float64)
        if self.spec.task == "regression":
            target = self.spec.target or {"mean": 0.0, "std": 1.0}
            return out[:, 0] * target["std"] + target["mean"]
        return out

    def predict(
        self,
        inputs: list,
        ids: list[str] | None = None,
        *,
        batch_size: int = 256,
        progress: bool = False,
        desc: str = "predict",
    ) -> Predictions:
        """Labels (or values) and class probabilities for raw texts (or images, as
        :func:`unipt.pipeline.data.images.load_image` gives them). ``desc`` names the progress bar."""
        from tqdm import tqdm

        if not inputs:
            raise UniptError("nothing to predict: the input is empty")
        if batch_size < 1:  # a step below 1 would predict nothing (or fail), e.g. from an MLmodel's config
            raise UniptError(f"batch_size {batch_size}: give 1 or more")
        check_inputs(inputs, self.spec.input)
        ids = ids if ids is not None else [str(i) for i in range(len(inputs))]
        parts = []
        bar = tqdm(total=len(inputs), unit="ex", desc=desc, disable=not progress, dynamic_ncols=True)
        for start in range(0, len(inputs), batch_size):
            chunk = inputs[start : start + batch_size]
            parts.append(self.outputs(self.activations(chunk)))
            bar.update(len(chunk))
        bar.close()
        return Predictions(list(ids), np.concatenate(parts), list(self.spec.label_names), self.spec.task)

    def outputs_from_cache(self, reader: ActivationCache, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(example indices, outputs) of one split of the cache the model was trained on: what the run
        record's metrics were computed from."""
        from unipt.train.loader import CacheBatches

        data = CacheBatches(reader, split, self.spec.layers, 64)
        indices, outputs = [], []
        for batch in data.epoch(0):
            outputs.append(self.forward(batch.hidden, batch.mask))
            indices.append(batch.indices)
        return np.concatenate(indices), np.concatenate(outputs)

    def evaluate(self, inputs: list, labels: list, *, batch_size: int = 256, progress: bool = False) -> dict:
        """The task's metrics of the model's predictions on labelled raw inputs."""
        return self.evaluation(inputs, labels, batch_size=batch_size, progress=progress)["metrics"]

    def evaluation(
        self, inputs: list, labels: list, *, batch_size: int = 256, progress: bool = False
    ) -> dict[str, Any]:
        """What ``unipt evaluate`` reports: ``metrics`` (the task's), ``examples``, and for classification
        ``report``: per-class precision, recall, F1 and support and the confusion matrix (rows: true class,
        columns: predicted), as a run record's ``report`` holds them."""
        import torch

        from unipt.train.tasks.classification import classification_head
        from unipt.train.tasks.regression import regression_head

        predictions = self.predict(inputs, batch_size=batch_size, progress=progress, desc="evaluate")
        if self.spec.task == "regression":
            try:
                truth = torch.tensor([float(v) for v in labels], dtype=torch.float64)
            except (TypeError, ValueError) as exc:
                raise UniptError(f"a label is not a number ({exc}); regression labels are numbers") from exc
            head = regression_head(0.0, 1.0)
            metrics = head.metrics(torch.from_numpy(predictions.outputs), truth)
            return {"metrics": metrics, "examples": len(inputs)}
        index = {name: i for i, name in enumerate(self.spec.label_names)}
        unknown = sorted({str(v) for v in labels if str(v) not in index})
        if unknown:
            raise UniptError(
                f"labels {unknown[:5]} are not among the model's classes {self.spec.label_names}; fix them"
            )
        truth = torch.tensor([index[str(v)] for v in labels])
        head = classification_head(len(self.spec.label_names), list(self.spec.label_names))
        predicted = head.collect(torch.from_numpy(predictions.outputs))
        assert head.report is not None
        return {
            "metrics": head.metrics(predicted, truth),
            "examples": len(inputs),
            "report": head.report(predicted, truth),
        }


def check_inputs(inputs: list, kind: str) -> None:
    if kind == "text_pair":
        bad = [
            i
            for i, x in enumerate(inputs)
            if not (isinstance(x, (tuple, list)) and len(x) == 2 and all(isinstance(t, str) for t in x))
        ]
        if bad:
            raise UniptError(
                f"input {bad[0]} is {inputs[bad[0]]!r:.40}, not a (text, text_pair) pair; this model reads "
                "text pairs: give --input FILE with --text-column and --text-pair-column"
            )
    elif kind == "text":
        bad = [i for i, x in enumerate(inputs) if not isinstance(x, str)]
        if bad:
            raise UniptError(f"input {bad[0]} is {inputs[bad[0]]!r:.40}, not text; this model reads texts")
    elif any(not isinstance(x, dict) or "pixels" not in x for x in inputs):
        raise UniptError("this model reads images; give an input file with an image column (--image-column)")


def load_model(
    target: str | Path,
    *,
    registry: str | Path = DEFAULT_REGISTRY,
    device: str = "auto",
    backbone: str | None = None,
    trust_remote_code: bool = False,
) -> TunedModel:
    """The tuned model of a run (id or directory) or an exported folder. ``backbone`` points at the
    backbone's files when they are not where the model says (they must hash the same).
    ``trust_remote_code`` (the command line's ``--trust-remote-code``) lets a backbone run its own code."""
    directory = model_directory(target, registry)
    spec = read_model_spec(directory)
    return TunedModel(directory, spec, device=device, backbone=backbone, trust_remote_code=trust_remote_code)


def refuse_stored_remote_code(directory: Path, spec: ModelSpec, trust_remote_code: bool) -> None:
    """A model whose backbone runs its own code loads only when the person asked for it on the command
    line: model.json (a file anyone may have written) saying so is not enough."""
    if spec.backbone.get("trust_remote_code") and not trust_remote_code:
        raise UniptError(
            f"model {directory} was trained on a backbone that runs its own Python code (model.json: "
            "backbone.trust_remote_code); pass --trust-remote-code to run it, only for a backbone you trust"
        )
