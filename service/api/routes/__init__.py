"""One router per resource: models, methods, explain/predict/compare, jobs, operations."""
