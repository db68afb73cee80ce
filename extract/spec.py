"""What a worker needs to load a backbone; light enough for the driver to import."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from unipt.pipeline.data.bundled import is_bundled

if TYPE_CHECKING:
    from unipt.pipeline.cache.identity import BackboneIdentity
    from unipt.pipeline.config import BackboneConfig


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


def load_spec_for(
    config: BackboneConfig, identity: BackboneIdentity, autocast: str, device: str = "auto"
) -> BackboneLoadSpec:
    """How a worker (or ``unipt predict``) loads a backbone: exactly the files its identity hashed."""
    name = config.name_or_path
    # Workers may run on other nodes: bundled and hub models are resolved there; local folders go as paths.
    is_local_folder = not is_bundled(name) and Path(name).expanduser().exists()
    return BackboneLoadSpec(
        identity.local_dir if is_local_folder else name,
        # A hub id's revision is the commit the identity resolved: workers load exactly what was hashed.
        identity.revision,
        config.trust_remote_code,
        device=device,
        autocast=autocast,
        allow_pickle=config.allow_pickle,
    )
