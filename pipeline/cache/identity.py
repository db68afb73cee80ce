"""Identities that make caches content-addressed: the backbone's and the cache key.

A cache key is the hash of everything that determines the bytes in a cache: the dataset
fingerprint, the backbone's weights/config/tokenizer hashes, the stored layers, max length,
dtype, and the cache format version. Change any of them and the key changes; change none and
the existing cache is reused.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from unipt.pipeline import FORMAT_VERSION
from unipt.pipeline.cache.file_digests import file_sha256, files_sha256
from unipt.pipeline.config import BackboneConfig, ExtractConfig, settings_affecting
from unipt.pipeline.data.augment import views_key_field
from unipt.pipeline.data.bundled import bundled_cnn_settings, bundled_model_path, is_bundled
from unipt.pipeline.errors import UniptError
from unipt.pipeline.hashing import sha256_file, sha256_files, sha256_json

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "preprocessor_config.json",
)
THROUGH_THE_IDENTITY = ("name_or_path", "revision")  # the backbone's files, hashed, stand for them
IN_THE_VIEWS_FIELD = ("views", "view_seed")  # one "views" field (views_key_field), absent for one view
_VERSION_ONLY = ("dataset_fingerprint", "views")  # key fields that name a version, not activation bytes
_HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model"]


@dataclass(frozen=True)
class BackboneIdentity:
    """What a backbone *is*, independent of where it sits on disk."""

    name: str
    revision: str | None
    weights_sha256: str
    config_sha256: str
    tokenizer_sha256: str
    local_dir: str  # where this machine loads it from; not part of the identity hash

    def key_fields(self) -> dict[str, Any]:
        fields = asdict(self)
        fields.pop("local_dir")
        fields.pop("name")  # the same weights under another name or path are the same backbone
        return fields


def resolve_model_dir(config: BackboneConfig) -> Path:
    """A local folder holding the backbone's files: bundled, a local path, or a hub snapshot."""
    if is_bundled(config.name_or_path):
        return bundled_model_path(config.name_or_path)
    path = Path(config.name_or_path).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists() or config.name_or_path.startswith((".", "/", "~")):
        raise UniptError(
            f"backbone path {config.name_or_path} is not a folder with a config.json and weights"
        )
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                config.name_or_path,
                revision=config.revision,
                allow_patterns=_HUB_FILES + (["*.bin"] if config.allow_pickle else []),
            )
        )
    except Exception as exc:  # network, auth or missing repo: all mean "cannot get the files"
        raise UniptError(
            f"backbone {config.name_or_path!r} is neither a local folder nor reachable on the model hub "
            f"({type(exc).__name__}); download it and set backbone.name_or_path to its folder"
        ) from exc


def hub_commit(model_dir: Path) -> str | None:
    """The commit a hub snapshot folder holds (``.../snapshots/<commit sha>``), or None for other folders."""
    name = model_dir.name
    if (
        model_dir.parent.name == "snapshots"
        and len(name) == 40
        and all(c in "0123456789abcdef" for c in name)
    ):
        return name
    return None


def backbone_identity(config: BackboneConfig) -> BackboneIdentity:
    """What the backbone is: weights digests (once per file version, see
    :mod:`unipt.pipeline.cache.file_digests`),
    config and tokenizer digests, and for a hub id the commit its files came from."""
    cnn = bundled_cnn_settings(config.name_or_path)
    if cnn is not None:
        return _bundled_cnn_identity(config, cnn)
    model_dir = resolve_model_dir(config)
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise UniptError(
            f"backbone folder {model_dir} has no config.json; is it a Hugging Face model folder?"
        )
    weights = sorted(model_dir.glob("*.safetensors"))
    if not weights:
        pickled = sorted(model_dir.glob("*.bin"))
        if pickled and not config.allow_pickle:
            # Pickled checkpoints can run code when unpickled; loading them is an explicit opt-in.
            raise UniptError(
                f"backbone folder {model_dir} has only pickled weights ({pickled[0].name}); convert them to "
                "safetensors (model.save_pretrained(dir, safe_serialization=True)), or set "
                "backbone.allow_pickle: true to load them with torch.load(weights_only=True)"
            )
        if not pickled:
            raise UniptError(f"backbone folder {model_dir} has no *.safetensors weights")
        weights = pickled
    tokenizer = [model_dir / name for name in _TOKENIZER_FILES if (model_dir / name).is_file()]
    # A hub id's revision ("main", a tag, or none) is pinned to the commit it resolved to, so workers
    # load exactly the files hashed here, not whatever the branch points at when they start.
    is_hub = not is_bundled(config.name_or_path) and not Path(config.name_or_path).expanduser().exists()
    return BackboneIdentity(
        name=config.name_or_path,
        revision=(hub_commit(model_dir) or config.revision) if is_hub else config.revision,
        weights_sha256=files_sha256(weights),
        config_sha256=sha256_file(config_file),
        tokenizer_sha256=sha256_files(tokenizer) if tokenizer else "none",
        local_dir=str(model_dir),
    )


def _bundled_cnn_identity(config: BackboneConfig, settings: dict[str, Any]) -> BackboneIdentity:
    """A bundled CNN is one weights file plus fixed settings (architecture, input size, normalization)."""
    weights = bundled_model_path(config.name_or_path)
    return BackboneIdentity(
        name=config.name_or_path,
        revision=config.revision,
        weights_sha256=file_sha256(weights),
        config_sha256=sha256_json(settings),
        tokenizer_sha256="none",
        local_dir=str(weights.parent),
    )


def cache_key_fields(
    dataset_fingerprint: str,
    backbone: BackboneIdentity,
    backbone_config: BackboneConfig,
    extract_config: ExtractConfig,
) -> dict[str, Any]:
    """Everything that determines a cache's bytes; hashed into the key and kept in the store."""
    fields = {
        "format_version": FORMAT_VERSION,
        "dataset_fingerprint": dataset_fingerprint,
        "backbone": backbone.key_fields(),
        # The settings declared to affect the cache (layers, max_length, dtype, autocast), but those that
        # reach the key another way: the backbone's identity, and the views field below.
        **settings_affecting(backbone_config, "cache", but=THROUGH_THE_IDENTITY),
        **settings_affecting(extract_config, "cache", but=IN_THE_VIEWS_FIELD),
        # Texts are padded to a multiple of 8 of their own length (unipt.extract.backbones.hf_text): rows from
        # the longest-in-batch padding of earlier versions differ in their last bits, so not one space.
        "preprocessing": {"truncation": True, "special_tokens": True, "padding": "own_length_multiple_of_8"},
    }
    views = views_key_field(extract_config)
    if views is not None:  # absent for one view: caches made before augmented views keep their keys
        fields["views"] = views
    return fields


def cache_key(fields: dict[str, Any]) -> str:
    # 32 hex chars (128 bits) keep directory names short with no realistic collision risk.
    return sha256_json(fields)[:32]


def space_key_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """The fields of a cache key that decide activation bytes: all but the dataset's fingerprint.

    Labels, ids and the split assignment change the fingerprint (and so the cache key, which names a
    dataset version's *view*) but not one activation, so they stay out of the *space* the view reads.
    So do augmented views: each is an input of its own, named by its input hash
    (:mod:`unipt.pipeline.data.augment`).
    """
    return {name: value for name, value in fields.items() if name not in _VERSION_ONLY}


def same_space_but_layers(fields: dict[str, Any], space_fields: dict[str, Any]) -> bool:
    """Whether a space's key fields (its ``space.json``) agree with a cache key's ``fields`` on everything
    that decides activation bytes except the stored layers: the layers are a per-layer choice, so such a
    space holds the very rows of each layer it shares
    (:func:`unipt.pipeline.cache.space.plan_layer_subset`)."""
    mine = {name: value for name, value in space_key_fields(fields).items() if name != "layers"}
    return mine == {name: value for name, value in space_fields.items() if name != "layers"}


def space_key(fields: dict[str, Any]) -> str:
    """The activation space of a cache key's fields: one per backbone identity and byte-deciding setting."""
    return sha256_json(space_key_fields(fields))[:32]
