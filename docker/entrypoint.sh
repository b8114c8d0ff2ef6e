#!/usr/bin/env bash
# Entrypoint of the saliency-service image. The first argument picks the role:
#   serve (default)      the HTTP API: saliency serve on $SALIENCY_HOST:$SALIENCY_PORT (0.0.0.0:8000)
#   worker [ARGS…]       a Celery worker for jobs: saliency worker (ARGS go to Celery)
#   healthcheck api|worker   python -m service.runtime.process.healthcheck (exit 0 when healthy)
#   openapi              print the OpenAPI document
#   anything else        run as a command (e.g. `bash`)
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: entrypoint.sh [serve | worker [CELERY ARGS…] | healthcheck api|worker | openapi | COMMAND…]

  serve        the HTTP API (saliency serve) on $SALIENCY_HOST:$SALIENCY_PORT, default 0.0.0.0:8000
  worker       a Celery worker running jobs (saliency worker); needs SALIENCY_JOBS_BACKEND=celery
               and SALIENCY_BROKER_URL=redis://…; extra arguments are passed to Celery
  healthcheck  api: GET /readyz answers 200; worker: this host's worker answers a ping
  openapi      print the OpenAPI document (JSON)
  COMMAND      anything else runs as is
USAGE
}

role="${1:-serve}"
[ "$#" -gt 0 ] && shift

case "$role" in
  -h | --help | help)
    usage
    ;;
  serve)
    exec saliency serve --host "${SALIENCY_HOST:-0.0.0.0}" --port "${SALIENCY_PORT:-8000}" "$@"
    ;;
  worker)
    if [ "${SALIENCY_JOBS_BACKEND:-local}" != "celery" ]; then
      echo "entrypoint: a worker needs SALIENCY_JOBS_BACKEND=celery (and SALIENCY_BROKER_URL)" >&2
      exit 2
    fi
    exec saliency worker "$@"
    ;;
  healthcheck)
    exec python -m service.runtime.process.healthcheck "$@"
    ;;
  openapi)
    exec saliency openapi "$@"
    ;;
  *)
    exec "$role" "$@"
    ;;
esac
