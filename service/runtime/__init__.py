"""Execution layer, by concern.

- ``sync/``: the synchronous lane: a worker thread per device (``devices``), the executor the
  routes await (``executor``) and dynamic batching of compatible requests (``batcher``).
- ``jobs/``: jobs: the job service the API talks to (``service``), job records and their stores
  (``store`` in memory, ``redis_store``), the code that runs one job (``runner``), its stored
  result (``result``), and the two places jobs run: this process's pool (``local_pool``) or
  Celery workers over Redis (``celery_app``).
- ``process/``: process-wide utilities: the glibc heap setting (``heap``) and the container
  health check (``healthcheck``).
"""
