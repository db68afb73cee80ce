"""What a worker needs to load a backbone; light enough for the driver to import."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BackboneLoadSpec:
    """Where and how a worker loads the backbone (a local folder or a hub id)."""

    name_or_path: str
    revision: str | None = None
    trust_remote_code: bool = False
    device: str = "auto"
    # torch.autocast precision for the forward pass ("none" = the model's own fp32); part of the cache key.
    autocast: str = "none"
    # Pickled *.bin weights (still weights_only=True) only when the config opts in: backbone.allow_pickle.
    allow_pickle: bool = False
