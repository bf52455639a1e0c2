"""Files written whole or not at all (``shared_model.files``)."""

from __future__ import annotations

import json
import os
import stat
import threading

import pytest

from shared_model.files import write_atomic, write_json_atomic, write_text_atomic


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_write_atomic_writes_the_bytes_with_the_mode_and_makes_the_parents(tmp_path, umask_022):
    """A file gets the mode asked for, narrowed by the umask as any new file is."""
    path = tmp_path / "a" / "b" / "key"
    assert write_atomic(path, b"\x00secret\xff", 0o600) == path
    assert path.read_bytes() == b"\x00secret\xff" and _mode(path) == 0o600
    write_text_atomic(path, "ünïcode\n")
    assert path.read_bytes() == "ünïcode\n".encode() and _mode(path) == 0o644
    os.umask(0o077)
    write_text_atomic(path, "private\n")
    assert _mode(path) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["key"]  # no temp file left


def test_an_object_json_cannot_hold_leaves_the_old_file_and_no_temp_file(tmp_path):
    path = tmp_path / "summary.json"
    write_json_atomic(path, {"loss": 3.0})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"loss": object()})
    assert json.loads(path.read_text()) == {"loss": 3.0}
    write_json_atomic(path, {"loss": object()}, default=lambda o: "obj")
    assert json.loads(path.read_text()) == {"loss": "obj"}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_a_failed_write_removes_its_temp_file_and_keeps_the_old_one(tmp_path):
    path = tmp_path / "status.json"
    write_text_atomic(path, "old")
    (tmp_path / "status.json.d").mkdir()  # a directory where the file should go
    with pytest.raises(OSError):
        write_text_atomic(tmp_path / "status.json.d", "new")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json", "status.json.d"]


def test_writers_of_one_path_at_once_each_leave_a_whole_file(tmp_path):
    """Two writers used to share ``<name>.tmp``: one could rename the other's half-written
    file into place. Each now has a temp file of its own."""
    path = tmp_path / "shard"
    blobs = [bytes([i]) * 200_000 for i in range(8)]
    threads = [threading.Thread(target=write_atomic, args=(path, b)) for b in blobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert path.read_bytes() in blobs
    assert [p.name for p in tmp_path.iterdir()] == ["shard"]


def test_a_writer_that_fails_on_an_atomic_path_leaves_the_old_file_and_no_temp(tmp_path):
    """``atomic_path`` for writers that write to a path themselves (safetensors, np.save):
    the file appears whole when the block ends, and a failing writer changes nothing."""
    from shared_model.files import atomic_path

    path = tmp_path / "state.safetensors"
    write_text_atomic(path, "old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("the writer died")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == [path.name]
    with atomic_path(path, suffix=".tmp.npy") as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith(".tmp.npy")
        tmp.write_text("new")
        assert path.read_text() == "old"  # not before the block ends
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == [path.name]
