"""``saliency explain`` on a folder, three ways, side by side: in this process (the engine, no
server), through ``--url`` one request per image, and through ``--url`` as jobs.

It starts the real server (``saliency serve``, the default model, warmed up) on 127.0.0.1 at a
free port, writes ``--images`` photos (``skimage.data``'s cat and coffee, cropped differently) to
a temporary folder, and runs the CLI's ``main`` in this process for each way, ``--repeats``
times interleaved. Reported: the median wall time of the whole command, images/s, and each way's
ratio to the in-process run (the server's own start is not timed; the in-process command's is,
so its two parts are timed apart too: loading the model, and explaining the folder). It also
checks that the three ways wrote the same maps (``--format npy``, one seed).

    .venv/bin/python benchmarks/cli.py [--images 24] [--method gradcam] [--repeats 2]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import skimage.data
from _common import median, table
from http_bench import server
from PIL import Image

from service.__main__ import main as cli
from service.cli.inputs import expand
from service.cli.local import LocalRunner
from service.config import get_settings
from service.models.registry import DEFAULT_MODEL


def write_images(folder: Path, n: int) -> None:
    photos = [skimage.data.chelsea(), skimage.data.coffee()]
    for i in range(n):
        arr = photos[i % 2]
        h, w = arr.shape[:2]
        top, left = (i * 7) % (h // 4), (i * 11) % (w // 4)
        Image.fromarray(arr[top : top + 3 * h // 4, left : left + 3 * w // 4]).save(
            folder / f"img{i:03d}.png"
        )


def run(args: list[str]) -> float:
    """Seconds of one ``saliency explain`` (its output captured; it must succeed)."""
    out, err = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli(args)
    elapsed = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"saliency {' '.join(args)} exited with {code}:\n{err.getvalue()}")
    return elapsed


def parts(folder: Path, method: str) -> tuple[float, float, float]:
    """Seconds of the in-process command's two parts, loading the model and explaining the
    folder, and of explaining it again with the same runner (its private copy for the method
    made: the pace of a warmed-up model, as the server's)."""
    start = time.perf_counter()
    runner = LocalRunner(get_settings(), DEFAULT_MODEL, method, "npy", {"seed": 0})
    loaded = time.perf_counter()
    sources, _ = expand([str(folder)])
    assert all(o.ok for o in runner.run(sources, lambda done: None))
    first = time.perf_counter()
    assert all(o.ok for o in runner.run(sources, lambda done: None))
    return loaded - start, first - loaded, time.perf_counter() - first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--method", default="gradcam")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads, here and in the server")
    opts = parser.parse_args()
    get_settings.cache_clear()
    with tempfile.TemporaryDirectory() as tmp, server("cpu", opts.threads) as url:
        root = Path(tmp)
        (root / "in").mkdir()
        write_images(root / "in", opts.images)
        common = ["explain", str(root / "in"), "--method", opts.method, "--format", "npy", "--seed", "0"]
        ways = {
            "in process": [],
            "--url, a request per image": ["--url", url, "--job-threshold", str(opts.images)],
            "--url, as jobs": ["--url", url, "--job-threshold", "0", "--job-size", "64"],
        }
        times: dict[str, list[float]] = {name: [] for name in ways}
        loading: list[float] = []  # the in-process command's parts
        explaining: list[float] = []
        again: list[float] = []
        for _ in range(opts.repeats):
            for k, (name, extra) in enumerate(ways.items()):
                times[name].append(run([*common, "--out", str(root / f"out{k}"), *extra]))
            load, work, warm = parts(root / "in", opts.method)
            loading.append(load)
            explaining.append(work)
            again.append(warm)
        first = sorted((root / "out0").glob("*.npy"))
        assert len(first) == opts.images, "the in-process run wrote fewer files than images"
        for k in range(1, len(ways)):
            for path in first:
                a, b = np.load(path), np.load(root / f"out{k}" / path.name)
                np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-5 * float(np.abs(a).max()))
        base = median(times["in process"])
        rows = []
        for name in ways:
            t = median(times[name])
            rows.append([name, f"{t:.2f}", f"{opts.images / t:.2f}", f"{t / base:.2f}×"])
        rows.append(["in process: loading the model", f"{median(loading):.2f}", "", ""])
        work = median(explaining)
        warm = median(again)
        for label, t in (("in process: explaining", work), ("in process: explaining again", warm)):
            rows.append([label, f"{t:.2f}", f"{opts.images / t:.2f}", f"{t / base:.2f}×"])
        print(f"{opts.images} images, {opts.method}, efficientnet_lite0 on the CPU, {opts.threads} threads")
        print(table(["way", "seconds", "images/s", "time vs in process"], rows))
        print("the three ways wrote the same maps (npy, seed 0)")


if __name__ == "__main__":
    sys.exit(main())
