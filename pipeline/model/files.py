"""The tuned model as files: ``model.safetensors`` (UniPT and the task head, the best epoch's weights)
and ``model.json`` (everything needed to rebuild it and feed it raw inputs).

``model.json`` says what the network is (variant, task, layers, hidden sizes, grids, embed size,
downsample factor, outputs, label names, regression target statistics), what it reads (the cache's
dtype, max length, preprocessing; the backbone's name, revision, weights/config/tokenizer hashes,
model type, tokenizer class, autocast) and where it came from (cache key, dataset fingerprint, run id,
metrics). Every training run writes both next to its record, with a ``README.md`` model card
(:mod:`unipt.pipeline.model.card`); ``unipt export`` and
:meth:`unipt.pipeline.model.predict.TunedModel.save_pretrained` write
the same three files into a folder of their own (:func:`write_model`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unipt.pipeline.errors import UniptError
from unipt.pipeline.runs.registry import Registry
from unipt.pipeline.storage import DEFAULT_REGISTRY

if TYPE_CHECKING:
    from unipt.pipeline.cache.attrs import CacheAttrs

MODEL_WEIGHTS = "model.safetensors"
MODEL_CARD = "model.json"
MODEL_FORMAT = 1


@dataclass
class ModelSpec:
    """The contents of ``model.json``."""

    task: str
    variant: str
    num_outputs: int
    label_names: list[str]
    layers: list[int]
    hidden_sizes: dict[str, int]
    grids: dict[str, list[int]]
    embed_size: int | None
    downsample_factor: int
    dropout: float
    input: str  # "text", "image" or "text_pair" ((text, text_pair) tuples): what the backbone reads
    dtype: str  # the cache's storage dtype: predictions round activations to it
    max_length: int  # what extraction passed the backbone (tokens per image for image encoders)
    preprocessing: dict[str, Any]
    backbone: dict[str, Any]  # name_or_path, revision, hashes, model_type, tokenizer, trust/pickle flags
    autocast: str  # the backbone's compute precision at extraction
    batch_size: int  # the backbone batch size extraction used
    cache_key: str
    dataset_fingerprint: str
    method: str = "unipt"  # train.method: what network the weights belong to
    side_reduction: int = 8  # train.side_reduction (method lst)
    target: dict[str, float] | None = None  # regression: train-split mean and std of the label
    # The training data's columns by role (text, text_pair, image, label): predict and evaluate read the
    # same names from an input file unless told otherwise. Empty in models written before it.
    columns: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    # What the run warned about its results (a model that predicts one class): the card repeats it.
    warnings: list[str] = field(default_factory=list)
    run_id: str | None = None
    format: int = MODEL_FORMAT

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> ModelSpec:
        if not isinstance(data, dict):
            raise UniptError(
                f"model.json holds a {type(data).__name__}, not a model description (an object); "
                "export the run again"
            )
        if data.get("format") != MODEL_FORMAT:
            raise UniptError(
                f"model.json has format {data.get('format')}, this unipt reads {MODEL_FORMAT}; "
                "export it again with this version"
            )
        known = set(cls.__dataclass_fields__)
        spec = cls(**{k: v for k, v in data.items() if k in known})
        check_spec(spec)
        return spec


# Sizes a model.json may state. Real backbones stay far below them; a larger number is a damaged or hostile
# file, refused before anything the size of it is allocated.
MAX_WIDTH = 65536  # hidden and embed sizes
MAX_LAYERS = 1024
MAX_OUTPUTS = 1_000_000  # classes
MAX_GRID = 4096  # a feature map's side


def _count(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def check_spec(spec: ModelSpec) -> None:
    """Refuse a model.json whose sizes or settings are not sane, in one line, before a network is built
    from it (the weights are then checked against these sizes:
    :func:`unipt.pipeline.model.predict.check_weights`)."""
    from pydantic import ValidationError

    from unipt.pipeline.config import BackboneConfig, TrainConfig, _describe

    def bad(what: str) -> UniptError:
        return UniptError(f"model.json: {what}; it is damaged or not written by unipt: export the run again")

    if not isinstance(spec.layers, list) or not spec.layers or len(spec.layers) > MAX_LAYERS:
        raise bad(f"layers is {spec.layers!r:.60}, not a list of 1 to {MAX_LAYERS} layer indices")
    if not all(_count(layer, 0, MAX_LAYERS) for layer in spec.layers):
        raise bad(f"layers {spec.layers!r:.60} are not layer indices")
    if not isinstance(spec.hidden_sizes, dict) or not isinstance(spec.grids, dict):
        raise bad("hidden_sizes and grids must be objects keyed by layer")
    for layer in spec.layers:
        width = spec.hidden_sizes.get(str(layer))
        if not _count(width, 1, MAX_WIDTH):
            raise bad(f"layer {layer}'s hidden size is {width!r:.40}, not 1 to {MAX_WIDTH}")
    for layer, grid in spec.grids.items():
        if not (isinstance(grid, list) and len(grid) == 2 and all(_count(n, 1, MAX_GRID) for n in grid)):
            raise bad(f"layer {layer}'s grid is {grid!r:.40}, not [height, width] of 1 to {MAX_GRID}")
    if spec.embed_size is not None and not _count(spec.embed_size, 1, MAX_WIDTH):
        raise bad(f"embed_size is {spec.embed_size!r:.40}, not 1 to {MAX_WIDTH}")
    if not _count(spec.num_outputs, 1, MAX_OUTPUTS):
        raise bad(f"num_outputs is {spec.num_outputs!r:.40}, not 1 to {MAX_OUTPUTS}")
    if not isinstance(spec.label_names, list) or not all(isinstance(n, str) for n in spec.label_names):
        raise bad("label_names is not a list of names")
    if spec.task == "regression" and spec.num_outputs != 1:
        raise bad(f"a regression model has 1 output, not {spec.num_outputs}")
    if spec.task != "regression" and len(spec.label_names) != spec.num_outputs:
        raise bad(f"{len(spec.label_names)} label_names for {spec.num_outputs} outputs")
    if not isinstance(spec.backbone, dict) or not isinstance(spec.backbone.get("name_or_path"), str):
        raise bad("backbone is not an object naming the backbone (name_or_path)")
    train = {
        "variant": spec.variant,
        "method": spec.method,
        "side_reduction": spec.side_reduction,
        "embed_size": spec.embed_size,
        "downsample_factor": spec.downsample_factor,
        "dropout": spec.dropout,
        "task": spec.task,
    }
    try:
        TrainConfig.model_validate(train)
        BackboneConfig.model_validate({"name_or_path": "-", "batch_size": spec.batch_size})
    except ValidationError as exc:
        raise bad(_describe(exc).split("; ")[0]) from None


def describe_model(
    attrs: CacheAttrs,
    reader_layers: list[int],
    hidden_sizes: dict[int, int],
    grids: dict[int, list[int]],
    label_names: list[str],
    layout_max_length: int,
    dtype: str,
    config: Any,
    num_outputs: int,
    target: dict[str, float] | None,
) -> ModelSpec:
    """The spec of a model trained on a cache with these attributes and ``config`` (ExperimentConfig)."""
    from unipt.pipeline.config import upgrade_key_fields

    fields = attrs.key_fields
    described = attrs.backbone
    settings = config.primary_backbone
    backbone = {
        "name_or_path": settings.name_or_path,
        **fields.get("backbone", {}),
        "model_type": described.get("model_type"),
        "tokenizer": (attrs.tokenizer or {}).get("class"),
        "image_size": described.get("image_size"),
        "trust_remote_code": settings.trust_remote_code,
        "allow_pickle": settings.allow_pickle,
    }
    input_kind = str(attrs.input or described.get("input", "text"))  # the view says text_pair
    return ModelSpec(
        task=config.train.task,
        variant=config.train.variant,
        method=config.train.method,
        side_reduction=config.train.side_reduction,
        num_outputs=num_outputs,
        label_names=list(label_names),
        layers=list(reader_layers),
        hidden_sizes={str(k): int(v) for k, v in hidden_sizes.items()},
        grids={str(k): list(v) for k, v in grids.items()},
        embed_size=config.train.embed_size,
        downsample_factor=config.train.downsample_factor,
        dropout=config.train.dropout,
        input=input_kind,
        dtype=dtype,
        max_length=int(layout_max_length),
        preprocessing=dict(fields.get("preprocessing", {})),
        backbone=backbone,
        autocast=str(upgrade_key_fields(fields, dtype=dtype, max_length=layout_max_length)["autocast"]),
        batch_size=settings.batch_size,
        cache_key=attrs.cache_key or "",
        dataset_fingerprint=attrs.dataset_fingerprint or "",
        target=target,
        columns=training_columns(config.dataset, input_kind),
    )


def training_columns(dataset: Any, input_kind: str) -> dict[str, str]:
    """The columns ``dataset`` (a DatasetConfig) reads for a model whose backbone reads ``input_kind``, by
    role; only those it names. None for a config made from a cache alone: the cache does not record them,
    and the defaults would be a guess."""
    from unipt.pipeline.cache.provenance import CACHE_SOURCE

    if str(dataset.source).startswith(CACHE_SOURCE):
        return {}
    reads_text = input_kind != "image"  # an image model's text_column is only the config's default
    roles = {
        "text": dataset.text_column if reads_text else None,
        "text_pair": dataset.text_pair_column if reads_text else None,
        "image": dataset.image_column,
        "label": dataset.label_column,
        "id": dataset.id_column,  # predict echoes it by default, so predictions join back to the input
    }
    return {role: str(name) for role, name in roles.items() if name}


def write_model(
    directory: str | Path,
    state: dict[str, Any],
    spec: ModelSpec,
    extra: dict[str, Any] | None = None,
    card_names: str | Path | None = None,
) -> Path:
    """``model.safetensors``, ``model.json`` (with ``extra`` keys, e.g. ``exported_from``) and the
    ``README.md`` model card (its usage lines name ``card_names``, default ``directory``) in ``directory``;
    returns the weights' path. Each file is written whole or not
    at all (a temporary file, then a rename), with the mode every other file of a run has (0644 under the
    usual umask: safetensors' own writer made the weights 0600)."""
    from safetensors.torch import save

    from unipt.pipeline.model.card import CARD_FILE, model_card

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Own, contiguous CPU copies: safetensors refuses tensors that share storage.
    tensors = {name: value.detach().cpu().contiguous().clone() for name, value in state.items()}
    weights = save(tensors, metadata={"format": "pt", "unipt": str(MODEL_FORMAT)})
    text = json.dumps(spec.to_json() | (extra or {}), indent=2, sort_keys=True, allow_nan=True) + "\n"
    _write_whole(directory / MODEL_WEIGHTS, weights)
    _write_whole(directory / MODEL_CARD, text.encode())
    _write_whole(directory / CARD_FILE, model_card(spec, str(card_names or directory)).encode())
    return directory / MODEL_WEIGHTS


def _write_whole(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as handle:  # open() honours the umask, as every other file of a run does
            handle.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UniptError(f"could not write {path} ({exc.strerror}); free space there and try again") from exc


def weight_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape in the safetensors file at ``path``, from its header alone (the library bounds
    the header's length and checks every tensor's offsets against the file's size)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as weights:
            return {name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()}
    except (SafetensorError, OSError) as exc:
        reason = " ".join(str(exc).split())[:120]
        raise UniptError(
            f"{path} is not a readable safetensors file ({reason}); export the run again"
        ) from exc


def check_weights(path: Path, expected: dict[str, tuple[int, ...]]) -> None:
    """Refuse weights that are not the tensors ``expected`` (by name and shape: what model.json's sizes
    build) before a network of those sizes is allocated."""
    present = weight_shapes(path)
    missing = sorted(set(expected) - set(present))
    extra = sorted(set(present) - set(expected))
    wrong = [name for name in sorted(set(expected) & set(present)) if expected[name] != present[name]]
    if missing or extra or wrong:
        first = (
            f"{wrong[0]} is {list(present[wrong[0]])}, model.json makes it {list(expected[wrong[0]])}"
            if wrong
            else f"missing {missing[:3]}"
            if missing
            else f"unexpected {extra[:3]}"
        )
        raise UniptError(f"{path} does not fit its model.json ({first}); export the run again")


def read_model_spec(directory: str | Path) -> ModelSpec:
    path = Path(directory) / MODEL_CARD
    if not path.is_file() or not (Path(directory) / MODEL_WEIGHTS).is_file():
        raise UniptError(
            f"{directory} holds no tuned model ({MODEL_CARD} + {MODEL_WEIGHTS}); give a run id, a run "
            "directory or a folder written by `unipt export`"
        )
    try:
        return ModelSpec.from_json(json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:
        raise UniptError(f"{path} is not a readable model description ({exc}); export the run again") from exc


def model_directory(target: str | Path, registry: str | Path = DEFAULT_REGISTRY) -> Path:
    """A run id (or unique prefix) in ``registry``, a run directory, or a folder from ``unipt export``."""
    path = Path(target).expanduser()
    if path.is_dir():
        return path
    if not Path(registry).expanduser().exists():
        raise UniptError(f"{target} is neither a model folder nor a run id (no registry at {registry})")
    with Registry(registry, create=False) as runs:
        entry = runs.get(str(target))
    return Path(entry.artifacts.get("model") or entry.artifacts["run_dir"])


def export_model(run_dir: str | Path, out: str | Path) -> Path:
    """A run's model (``run_dir``: a run or an exported folder) written into ``out``, a new or empty folder,
    by :func:`write_model`, the writer of :meth:`unipt.pipeline.model.predict.TunedModel.save_pretrained` (so
    any task's
    model exports, retrieval's too); returns ``out``."""
    from safetensors.torch import load_file

    spec = read_model_spec(run_dir)  # refuses a run without a model before anything is written
    weights = Path(run_dir) / MODEL_WEIGHTS
    weight_shapes(weights)  # a damaged file is refused in one line, before it is read
    origin = {"exported_from": str(Path(run_dir).resolve())}
    return save_model_folder(out, load_file(str(weights)), spec, origin)


def save_model_folder(
    out: str | Path, state: dict[str, Any], spec: ModelSpec, extra: dict[str, Any] | None = None
) -> Path:
    """:func:`write_model` into ``out``, a new or empty folder (or one holding only an earlier model's
    files, replaced): the files go to a hidden folder beside it first, so ``out`` appears whole."""
    from unipt.pipeline.model.card import CARD_FILE

    out = Path(out).expanduser()
    ours = {MODEL_WEIGHTS, MODEL_CARD, CARD_FILE}
    if out.exists() and (not out.is_dir() or any(p.name not in ours for p in out.iterdir())):
        raise UniptError(f"--out {out} is not empty; give a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write_model(staging, state, spec, extra, card_names=out)  # the folder a person will use
        staging.chmod(0o777 & ~_umask())
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
