"""``saliency explain``'s inputs: folders expand to their images, outputs never collide, and the
output folder is not taken as input."""

from __future__ import annotations

from pathlib import Path, PurePath

from service.cli.explain import output_path
from service.cli.inputs import expand


def test_folders_expand_to_their_images_and_outputs_stay_apart(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    (a / "deep").mkdir(parents=True)
    b.mkdir()
    for f in (a / "x.png", a / "deep" / "y.JPG", a / "notes.txt", b / "x.png", tmp_path / "x.webp"):
        f.write_bytes(b"")
    out = a / "out"
    out.mkdir()
    (out / "x.gradcam.png").write_bytes(b"")  # a previous run's output: not an input
    sources, missing = expand([str(a), str(b), str(tmp_path / "x.webp"), str(tmp_path / "nope")], skip=out)
    assert [s.path for s in sources] == [a / "deep" / "y.JPG", a / "x.png", b / "x.png", tmp_path / "x.webp"]
    assert [s.stem for s in sources] == [PurePath("deep/y"), PurePath("x"), PurePath("x-2"), PurePath("x-3")]
    assert missing == [(tmp_path / "nope", "no such file or folder")]
    paths = {output_path(out, s, "gradcam", "overlay") for s in sources}
    assert len(paths) == len(sources) and out / "deep" / "y.gradcam.overlay.png" in paths
