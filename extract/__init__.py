"""Extract stage: run each frozen backbone once over a dataset (Ray actors) into a Zarr cache.

Only the Ray worker processes import ``transformers`` and hold a backbone; the driver plans
shards, tracks progress and commits the store.
"""
