"""Atomic outputs (bismap.io): the umask's permissions, and no temporary folders left from killed jobs."""

from __future__ import annotations

import os
import stat

import pytest

from bismap.io import atomic_directory, write_json


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_outputs_get_the_umask_permissions_not_owner_only(tmp_path, umask_022):
    write_json(tmp_path / "metrics.json", {"miou": 1.0})
    with atomic_directory(tmp_path / "shard_0") as folder:
        write_json(folder / "a.json", {})
    mode = lambda path: stat.S_IMODE(os.stat(path).st_mode)  # noqa: E731
    assert mode(tmp_path / "metrics.json") == 0o644
    assert mode(tmp_path / "shard_0") == 0o755 and mode(tmp_path / "shard_0" / "a.json") == 0o644


def test_a_killed_jobs_temporary_folder_is_removed_by_the_next_successful_write(tmp_path):
    stale = tmp_path / ".shard_0.k3x9.tmp"  # what a SIGKILLed atomic_directory leaves
    (stale / "deep").mkdir(parents=True)
    (stale / "deep" / "image.png").write_bytes(b"half")
    other = tmp_path / ".shard_1.aaaa.tmp"  # another output's: not touched
    other.mkdir()
    with atomic_directory(tmp_path / "shard_0") as folder:
        (folder / "image.png").write_bytes(b"whole")
    assert sorted(path.name for path in tmp_path.iterdir()) == [".shard_1.aaaa.tmp", "shard_0"]
    assert (tmp_path / "shard_0" / "image.png").read_bytes() == b"whole"
