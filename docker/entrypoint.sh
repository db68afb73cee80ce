#!/usr/bin/env bash
# Entrypoint of the extraction image (docker/Dockerfile.extract).
#   head [ARGS...]    start a Ray head (GCS on $RAY_PORT, default 6379; dashboard and job server on
#                     0.0.0.0:$RAY_DASHBOARD_PORT, default 8265) and stay in the foreground
#   worker [ARGS...]  join the head at $RAY_HEAD_ADDRESS (HOST:PORT) and stay in the foreground;
#                     Ray counts the GPUs the container was given
#   anything else     run as given: `unipt extract ...`, `ray status`, `bash`
# ARGS go to `ray start`, e.g. `head --num-cpus=0` or `worker --num-gpus=2`.
set -euo pipefail

case "${1:-}" in
  head)
    shift
    exec ray start --head --port="${RAY_PORT:-6379}" \
      --dashboard-host=0.0.0.0 --dashboard-port="${RAY_DASHBOARD_PORT:-8265}" --block "$@"
    ;;
  worker)
    shift
    : "${RAY_HEAD_ADDRESS:?set RAY_HEAD_ADDRESS=HEAD_HOST:6379 so the worker can find the head}"
    exec ray start --address="$RAY_HEAD_ADDRESS" --block "$@"
    ;;
  *)
    exec "$@"
    ;;
esac
