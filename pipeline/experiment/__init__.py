"""The recipe: unipt's Python API (prepare, extract, train, record, run) and the cost plan, the one place
(with the CLI) that drives both stages. :mod:`.recipe` holds ``run``; each of its steps is a module
beside it (preparation, extraction, training, recording, resuming).
"""

from unipt._lazy import lazy_surface

_SURFACE = {
    "config_for_cache": "cache_config",
    "bytes_by_dtype": "plan",
    "check_space": "plan",
    "forward_rate": "forward_timing",
    "read_rate": "plan",
    "Prepared": "preparation",
    "PreparedBackbone": "preparation",
    "check_cache_matches": "preparation",
    "prepare": "preparation",
    "prepare_for_cache": "preparation",
    "release_reader": "preparation",
    "built_keys": "extraction",
    "extract": "extraction",
    "extract_all": "extraction",
    "leased": "extraction",
    "load_spec": "extraction",
    "Trained": "training",
    "extraction_runtime": "training",
    "model_spec": "training",
    "open_for_training": "training",
    "require_caches": "training",
    "torch_threads": "training",
    "train": "training",
    "weighted_layer_names": "training",
    "RunResult": "recording",
    "Timings": "recording",
    "record": "recording",
    "recorded_result": "recording",
    "timings_since": "recording",
    "checkpoint_threads": "resuming",
    "run_to_continue": "resuming",
    "run": "recipe",
    "start_tracking": "recipe",
    "train_from_cache": "recipe",
    "stored_config": "rerun",
    "DISTRIBUTIONS": "trials",
    "Distribution": "trials",
    "SWEEP_FILE": "sweep",
    "Search": "trials",
    "SweepResult": "sweep",
    "Trial": "trials",
    "default_parallel": "sweep_resources",
    "describe": "trials",
    "gpu_share": "sweep_resources",
    "resume_sweep": "sweep",
    "trial_resources": "sweep_resources",
    "trusted_spec": "sweep",
}
__all__ = sorted(_SURFACE)
__getattr__, __dir__ = lazy_surface(__name__, _SURFACE)
