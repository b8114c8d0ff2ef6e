"""The images of ``saliency explain PATH...``: folders expand to the image files inside them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath

#: file name suffixes taken from a folder (a file named on the command line is always taken)
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"})


@dataclass(frozen=True)
class Source:
    """One image file and where its outputs go: ``stem`` (relative, without suffix) under ``--out``."""

    path: Path
    stem: PurePath


def expand(paths: Sequence[str], skip: Path | None = None) -> tuple[list[Source], list[tuple[Path, str]]]:
    """The image files of ``paths`` (folders searched recursively, sorted) and the paths that do
    not exist. A file found in folder ``F`` keeps its place relative to ``F`` in the outputs;
    two inputs that would write the same output get ``-2``, ``-3``… suffixes. Folder ``skip``
    (the output folder) is not searched: a second run never explains the first one's outputs."""
    found: list[tuple[Path, PurePath]] = []
    missing: list[tuple[Path, str]] = []
    skipped = None if skip is None else skip.resolve()

    def taken_from_folder(p: Path) -> bool:
        if not p.is_file() or p.suffix.lower() not in IMAGE_SUFFIXES:
            return False
        return skipped is None or not p.resolve().is_relative_to(skipped)

    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if taken_from_folder(p))
            found.extend((p, p.relative_to(path).with_suffix("")) for p in files)
        elif path.is_file():
            found.append((path, PurePath(path.stem)))
        else:
            missing.append((path, "no such file or folder"))
    taken: set[PurePath] = set()
    sources = []
    for path, stem in found:
        unique, n = stem, 1
        while unique in taken:
            n += 1
            unique = stem.with_name(f"{stem.name}-{n}")
        taken.add(unique)
        sources.append(Source(path, unique))
    return sources, missing
