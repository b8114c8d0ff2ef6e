"""Jobs: the service the API talks to, job stores, the runner, results, the local pool and Celery."""
