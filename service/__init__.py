"""saliency-service: a REST microservice that explains what an image classifier looked at."""

__version__ = "0.1.0"
