"""Process-wide utilities: the heap setting of serve/worker and the container health check."""
