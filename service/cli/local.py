"""``saliency explain`` without ``--url``: the engine in this process, no server.

The model is loaded from the settings the way the server loads it (``ModelRegistry``, just the
model asked for); parameters are validated by the API's own request model (``ExplainOptions``),
images decoded with the server's limits (``decode_upload``), explained by the engine, and
rendered by the code that renders the API's answers (``service.api.responses``), so a file
written here is what ``POST /v1/models/{model}/explain`` would have answered.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch
from pydantic import ValidationError

from service.api.options import ExplainOptions
from service.api.pipeline import Prepared
from service.api.problems import validation_errors
from service.api.responses import dumps, explain_body, npy_bytes, png_bytes
from service.cli.inputs import Source
from service.cli.outcome import Outcome, Report, batched, target_text
from service.config import Settings
from service.errors import InvalidParameter, MethodNotApplicable, SaliencyError
from service.explainers import Explanation, Targets, get_method
from service.explainers import explain as run_engine
from service.explainers.engine import resolve_params
from service.imaging.decode import decode_upload
from service.models.registry import ModelRegistry


class LocalRunner:
    """Explains files with one model and method in this process. Refuses (``SaliencyError``) at
    construction what every file would fail for: an unknown model, method or layer, a bad
    parameter, a target out of range."""

    def __init__(self, settings: Settings, model: str, method: str, fmt: str, params: dict[str, Any]) -> None:
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        try:
            options = ExplainOptions.model_validate({**params, "method": method, "format": fmt})
        except ValidationError as exc:
            errors = validation_errors([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()])
            raise InvalidParameter(
                "; ".join(f"--{e['field'].replace('_', '-')}: {e['message']}" for e in errors)
            ) from None
        self.settings = settings
        self.fmt = fmt
        self.options = options
        self.model = ModelRegistry.from_settings(settings, only=[model]).get(model)
        chosen = get_method(options.method)
        self.render = options.render().resolve(chosen.rendering)
        if self.render.reduction == "none" and fmt in ("png", "overlay"):
            raise InvalidParameter("--reduction none needs --format json or npy")
        if not chosen.offered(self.model.handle):  # this method only: probing them all takes long
            raise MethodNotApplicable(
                f"method {chosen.name!r} does not work on model {model!r}; "
                f"it offers {', '.join(self.model.methods())}"
            )
        options.targets(1, self.model.num_classes)  # a target out of range fails every file
        # seed drawn and layer resolved once: every batch runs with the same parameters
        self.params = resolve_params(chosen, self.model.handle, options.engine_params(settings))

    @property
    def method(self) -> str:
        return self.options.method

    def run(self, sources: list[Source], report: Report, batch: int = 8) -> Iterator[Outcome]:
        """Each file's outcome, ``batch`` images per engine call (a map never depends on which
        images share its batch)."""
        for chunk in batched(sources, batch):
            items: list[tuple[Source, Prepared]] = []
            for source in chunk:
                try:
                    image = decode_upload(source.path.read_bytes(), self.settings)
                    x, geometry = self.model.preprocess(image)
                except SaliencyError as exc:
                    yield Outcome(source, reason=exc.message)
                    continue
                except OSError as exc:
                    yield Outcome(source, reason=exc.strerror or str(exc))
                    continue
                items.append((source, Prepared(image=image, x=x, geometry=geometry)))
            if items:
                yield from self._explain(items)

    def _explain(self, items: list[tuple[Source, Prepared]]) -> Iterator[Outcome]:
        started = time.perf_counter()
        targets = self.options.targets(len(items), self.model.num_classes)
        try:
            expl = run_engine(
                self.model.handle,
                torch.stack([item.x for _, item in items]),
                self.method,
                self.params,
                targets=targets,
            )
        except SaliencyError as exc:
            for source, _ in items:
                yield Outcome(source, reason=exc.message)
            return
        elapsed_ms = (time.perf_counter() - started) * 1000.0 / len(items)
        for i, (source, item) in enumerate(items):
            index = int(expl.targets[i, 0])
            target = target_text(index, self.model.label(index), float(expl.scores[i, 0]))
            try:
                data = self._render(expl, i, item, targets, elapsed_ms)
            except SaliencyError as exc:
                yield Outcome(source, reason=exc.message)
                continue
            yield Outcome(source, data=data, target=target)

    def _render(
        self, expl: Explanation, i: int, item: Prepared, targets: Targets, elapsed_ms: float
    ) -> bytes:
        if self.fmt == "json":
            one = expl.select(slice(i, i + 1))
            body = explain_body(
                self.model, one, [item.geometry], targets, self.render, fmt="json", elapsed_ms=elapsed_ms
            )
            return dumps(body)
        if self.fmt == "npy":
            return npy_bytes(expl, item.geometry, i, self.render)
        return png_bytes(expl, item, i, self.render, overlay=self.fmt == "overlay")
