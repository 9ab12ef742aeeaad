"""Atomic file writing and small readers/writers shared by every stage.

A stage never leaves a file that looks finished when it was killed half-way:
everything is written to a temporary sibling first, then moved into place with
``os.replace`` (atomic on POSIX within one file system).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def creation_mode(directory: bool = False) -> int:
    """The mode ``open``/``mkdir`` would give under the current umask (0644 / 0755 under umask 022):
    mkstemp and mkdtemp make 0600 / 0700, which would hide results from a group sharing them on a cluster."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def remove_stale_temporaries(target: Path) -> None:
    """Remove ``.<name>.*.tmp`` siblings of ``target`` that a killed job left (a job never shares its output)."""
    for stale in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it into place on success (with the umask's mode)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    try:
        yield Path(temporary)
        os.chmod(temporary, creation_mode())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; it replaces ``path`` on success. Temporary folders a killed
    job left for the same ``path`` are removed first."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    temporary = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield temporary
        os.chmod(temporary, creation_mode(directory=True))
        if target.exists():
            shutil.rmtree(target)
        os.replace(temporary, target)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    return json.loads(Path(path).read_text())


def write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text)


def write_png(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Write a uint8 (H, W) or (H, W, 3) array as PNG, atomically."""
    with atomic_path(path) as temporary:
        Image.fromarray(array).save(temporary, format="PNG")


def shard_png_paths(directories: Sequence[str | os.PathLike[str]], kind: str = "PNG",
                    expected_names: Sequence[str] | None = None) -> dict[str, Path]:
    """Sample name -> ``<name>.png`` over the shard folders of a sharded stage (pseudo-labels, weight maps).

    A missing folder, a name found in two folders or (with ``expected_names``)
    a sample without a PNG raises, naming them; ``kind`` names the files in the message.
    """
    paths: dict[str, Path] = {}
    for directory in map(Path, directories):
        if not directory.is_dir():
            raise FileNotFoundError(f"{kind} folder {directory} does not exist")
        for png in sorted(directory.glob("*.png")):
            if png.stem in paths:
                raise ValueError(f"{kind} '{png.stem}' found twice: {paths[png.stem]} and {png}")
            paths[png.stem] = png
    missing = sorted(set(expected_names or ()) - set(paths))
    if missing:
        raise FileNotFoundError(f"no {kind} for {len(missing)} image(s) {missing[:10]} "
                                f"in {[str(directory) for directory in directories]}")
    return paths
