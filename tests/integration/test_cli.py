"""``saliency explain | models | layers``: in this process (the engine, no server) and through
``--url`` (the client, against ``tiny_service``), writing the same numbers either way.

``main`` runs in the test process; its settings come from the environment, so each call sets
``SALIENCY_MODELS_CONFIG`` and clears the cached settings.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from client_helpers import CLIENT_TEST_KEY
from jobs_helpers import png

from service.__main__ import main
from service.config import get_settings

SEED = ["--seed", "3"]


@pytest.fixture
def local_env(tiny_service: tuple[str, Path], monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The settings of an in-process run: the tiny model's config, on the CPU; the URL to compare."""
    monkeypatch.setenv("SALIENCY_MODELS_CONFIG", str(tiny_service[1]))
    monkeypatch.setenv("SALIENCY_DEVICE", "cpu")
    monkeypatch.setenv("SALIENCY_TORCH_THREADS", "1")
    get_settings.cache_clear()
    yield tiny_service[0]
    get_settings.cache_clear()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three good images (one in a sub-folder), a corrupt one, and a text file that is skipped."""
    root = tmp_path_factory.mktemp("images")
    (root / "sub").mkdir()
    (root / "a.png").write_bytes(png(10, (40, 30)))
    (root / "b.png").write_bytes(png(11, (36, 24)))
    (root / "sub" / "c.png").write_bytes(png(12, (20, 28)))
    (root / "sub" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "notes.txt").write_text("not an image, and not taken from a folder")
    return root


GOOD = {"a": (30, 40), "b": (24, 36), "sub/c": (28, 20)}


def remote(url: str) -> list[str]:
    return ["--url", url, "--api-key", CLIENT_TEST_KEY]


def explain(folder: Path, out: Path, *extra: str) -> list[str]:
    return [
        "explain",
        str(folder),
        "--model",
        "tiny",
        "--method",
        "saliency",
        "--out",
        str(out),
        *SEED,
        *extra,
    ]


def check_failure_report(err: str, folder: Path) -> None:
    lines = [line for line in err.splitlines() if line.startswith("saliency: ")]
    assert len(lines) == 1, err
    assert str(folder / "sub" / "broken.jpg") in lines[0] and "could not be decoded" in lines[0]


def load_npy(out: Path) -> dict[str, np.ndarray]:
    return {name: np.load(out / f"{name}.saliency.npy") for name in GOOD}


def test_explain_folder_locally_and_through_the_service_writes_the_same_maps(
    local_env: str, folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = local_env
    assert main(explain(folder, tmp_path / "local", "--format", "npy")) == 1  # one bad file
    captured = capsys.readouterr()
    check_failure_report(captured.err, folder)
    assert "written" in captured.out and "this process" in captured.out
    local = load_npy(tmp_path / "local")
    assert sorted(
        p.relative_to(tmp_path / "local").as_posix() for p in (tmp_path / "local").rglob("*.npy")
    ) == [f"{name}.saliency.npy" for name in sorted(GOOD)]
    for name, (h, w) in GOOD.items():
        assert (
            local[name].shape == (1, h, w)
            and local[name].dtype == np.float32
            and np.abs(local[name]).max() > 0
        )

    # through the service, one request per image
    assert main(explain(folder, tmp_path / "sync", "--format", "npy", *remote(url))) == 1
    check_failure_report(capsys.readouterr().err, folder)
    for name, arr in load_npy(tmp_path / "sync").items():
        np.testing.assert_allclose(arr, local[name], rtol=1e-4, atol=1e-6 * float(np.abs(arr).max()))

    # as jobs of two images (the corrupt one refused by the server, then left out)
    jobs = [*remote(url), "--job-threshold", "1", "--job-size", "2"]
    assert main(explain(folder, tmp_path / "jobs", "--format", "npy", *jobs)) == 1
    check_failure_report(capsys.readouterr().err, folder)
    for name, arr in load_npy(tmp_path / "jobs").items():
        np.testing.assert_allclose(arr, local[name], rtol=1e-4, atol=1e-6 * float(np.abs(arr).max()))


def test_explain_json_and_png_outputs(
    local_env: str, folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = local_env
    files = [str(folder / "a.png"), str(folder / "sub" / "c.png")]
    args = ["--model", "tiny", "--method", "gradcam", *SEED, "--colormap", "viridis"]
    assert main(["explain", *files, "--format", "json", "--out", str(tmp_path / "j"), *args]) == 0
    jobs = [*remote(url), "--job-threshold", "0"]
    assert main(["explain", *files, "--format", "json", "--out", str(tmp_path / "jj"), *args, *jobs]) == 0
    for name, (h, w) in (("a", GOOD["a"]), ("c", GOOD["sub/c"])):
        here = json.loads((tmp_path / "j" / f"{name}.gradcam.json").read_text())
        there = json.loads((tmp_path / "jj" / f"{name}.gradcam.json").read_text())
        assert here["parameters"]["colormap"] == "viridis" and here["parameters"]["seed"] == 3
        assert here["parameters"]["layer"] == there["parameters"]["layer"]
        [entry] = here["explanations"]
        assert entry["shape"] == [h, w] and entry["target"] == there["explanations"][0]["target"]
        np.testing.assert_allclose(entry["heatmap"], there["explanations"][0]["heatmap"], atol=1e-4)

    # no --model: the service's first
    overlay = ["explain", *files, "--format", "overlay", "--out", str(tmp_path / "o"), *remote(url)]
    assert main(overlay) == 0
    assert (tmp_path / "o" / "a.gradcam.overlay.png").read_bytes().startswith(b"\x89PNG")
    out = capsys.readouterr().out
    assert "failed" in out and "tiny" in out


def test_explain_refuses_what_no_file_can_pass(
    local_env: str, folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = local_env
    for where in ([], remote(url)):
        assert main(explain(folder, tmp_path, "--model", "nope", *where)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "no model named 'nope'" in err and "tiny" in err
    for where in ([], remote(url), [*remote(url), "--job-threshold", "0"]):
        assert (
            main(explain(folder, tmp_path, "--steps", "0", "--method", "integrated_gradients", *where)) == 2
        )
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "steps" in err, err
    assert main(explain(folder, tmp_path, "--method", "attention_rollout")) == 2  # a ResNet has none
    err = capsys.readouterr().err
    assert "'attention_rollout' does not work on model 'tiny'" in err and "gradcam" in err
    assert main(["explain", str(tmp_path / "missing.png"), "--model", "tiny", "--out", str(tmp_path)]) == 1
    assert "no such file" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.png"))


def test_models_and_layers_tables(local_env: str, capsys: pytest.CaptureFixture[str]) -> None:
    url = local_env
    for where in ([], remote(url)):
        assert main(["models", *where]) == 0
        out = capsys.readouterr().out
        assert "tiny" in out and "resnet18" in out and "3×32×32" in out
        assert main(["layers", "tiny", *where]) == 0
        out = capsys.readouterr().out
        rows = [line for line in out.splitlines() if "default" in line]
        assert len(rows) == 1 and "layer3" in rows[0] and "nchw" in out
    assert main(["models", "--url", url]) == 2  # no key
    assert "401" in capsys.readouterr().err
