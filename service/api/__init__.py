"""The HTTP layer: thin routes per resource, request parsing, response rendering, error mapping.

Nothing below ``service.api`` computes explanations: routes parse a request (``params``), hand the
work to the executor, and render the engine's answer (``responses``). Domain errors become
problem+json responses in one place (``problems``).
"""
