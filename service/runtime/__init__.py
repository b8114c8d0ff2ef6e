"""Execution layer: running model work off the event loop, batching, the worker pool and job store."""
