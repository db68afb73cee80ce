"""Runs: the record each run writes, the registry that indexes them, tracking sinks, reruns and sweeps."""

from unipt._lazy import lazy_surface

_SURFACE = {
    "TIMING_METRICS": "compare",
    "differences": "compare",
    "result_metrics": "compare",
    "same_value": "compare",
    "RECORD_FILE": "records",
    "check_run_id": "records",
    "finite_record": "records",
    "new_run_id": "records",
    "package_versions": "records",
    "project_commit": "records",
    "read_run_record": "records",
    "referenced_cache_keys": "records",
    "without_nan": "records",
    "write_run_record": "records",
    "check_registered": "registered",
    "registry_mismatch": "registered",
    "read_finished_record": "registration",
    "ready_registry": "registration",
    "register_run": "registration",
    "registry_id": "registration",
    "DEFAULT_REGISTRY": "registry",
    "Registry": "registry",
    "RunEntry": "registry",
    "SCHEMA_VERSION": "registry",
    "failure": "registry",
    "registered_cache_keys": "registry",
    "Tracker": "tracking",
}
__all__ = sorted(_SURFACE)
__getattr__, __dir__ = lazy_surface(__name__, _SURFACE)
