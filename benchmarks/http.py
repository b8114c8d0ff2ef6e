"""HTTP overhead and throughput of the explain route: ``python benchmarks/http.py --help``.

The benchmark itself is ``http_bench.py``. This file's name shadows the standard library's
``http`` package for every script run from this folder (the folder is their ``sys.path[0]``), so
when it is imported under that name (by ``urllib``, ``httpx``, ``torch.hub`` …) it puts the real
package in its place instead.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def _load_stdlib_http() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("http", path)
    if spec is None or spec.loader is None:
        raise ImportError("the standard library's http package was not found")
    module = importlib.util.module_from_spec(spec)
    sys.modules["http"] = module  # the import system returns what sys.modules holds
    spec.loader.exec_module(module)


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as ``saliency serve`` does, before torch loads
    from http_bench import main

    main()
elif __name__ == "http":
    _load_stdlib_http()
