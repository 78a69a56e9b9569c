"""A read-only or full ``RECSYS_HOME``: a clear error naming the path and the fix, and the
previous artefacts (raw tables in the warehouse, the registry's CURRENT version and its
files) intact and loadable.

How the faults are made, and why: the tests run as root, where ``chmod`` does not stop a
write, so a folder made read-only with chmod proves nothing. Instead each test mounts a
small **tmpfs** of its own as ``RECSYS_HOME`` (root may mount here; the fixture unmounts in
teardown). Read-only is ``mount -o remount,ro`` of that tmpfs: the kernel answers every
write with EROFS, exactly as on a read-only volume. Disk full is the same tmpfs filled to
the last byte by a filler file, so the kernel answers ENOSPC (not EFBIG as an RLIMIT_FSIZE
would), or, to fail one exact write, a tmpfs with few inodes whose last free inodes are
counted out. Where mounting is not allowed (an unprivileged container), the tests skip
and say so.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import duckdb
import numpy as np
import pytest
from movielens_fixtures import toy, write_ml1m

from common.io import StorageError, atomic_write_json
from export.registry import current_version, load_current_metrics, promote, write_index
from ingest.layouts import movielens_plan
from ingest.loader import connect, ingest
from pipeline.settings import SettingsError, ensure_writable, load_settings


class Tmpfs:
    """A tmpfs mounted at ``path`` for one test."""

    def __init__(self, path: Path, size: str, inodes: int | None = None):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        options = f"size={size}" + (f",nr_inodes={inodes}" if inodes else "")
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True
        )
        if result.returncode != 0:
            pytest.skip(
                f"cannot mount a tmpfs at {path} ({result.stderr.strip() or result.returncode}): these "
                "tests need root (CAP_SYS_ADMIN) to make a real read-only or full file system"
            )

    def remount(self, mode: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{mode}", str(self.path)], check=True)

    def fill(self) -> Path:
        """Fill the file system to the last byte; returns the filler (delete it to free the space)."""
        filler = self.path / "filler"
        with open(filler, "wb", buffering=0) as f:
            block = bytes(1 << 16)
            while True:
                try:
                    f.write(block)
                except OSError as exc:
                    assert exc.errno == 28, exc  # ENOSPC
                    break
            for size in (4096, 512, 1):  # the last partial block too
                while True:
                    try:
                        f.write(bytes(size))
                    except OSError:
                        break
        return filler

    def free_bytes(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def free_inodes(self) -> int:
        return os.statvfs(self.path).f_favail

    def unmount(self) -> None:
        if subprocess.run(["umount", str(self.path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(self.path)], check=True)


@pytest.fixture
def mount_tmpfs(tmp_path: Path) -> Iterator:
    mounted: list[Tmpfs] = []

    def make(name: str, size: str, inodes: int | None = None) -> Tmpfs:
        fs = Tmpfs(tmp_path / name, size, inodes)
        mounted.append(fs)
        return fs

    try:
        yield make
    finally:
        for fs in reversed(mounted):
            fs.unmount()


# ------------------------------------------------------------------ prior artefacts


def _ingest(home: Path, data_dir: Path) -> int:
    con = connect(home / "warehouse.duckdb", temp_dir=home / "scratch" / "duckdb_tmp")
    try:
        return ingest(con, movielens_plan(data_dir, home / "scratch")).interactions.rows
    finally:
        con.close()


def _raw_count(home: Path) -> int:
    con = duckdb.connect(str(home / "warehouse.duckdb"), read_only=True)
    try:
        leftovers = con.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name LIKE '%\\_\\_new' ESCAPE '\\'"
        ).fetchone()[0]
        assert leftovers == 0
        return con.execute("SELECT count(*) FROM raw.interactions").fetchone()[0]
    finally:
        con.close()


def _release(folder: Path, scale: float, ndcg: float) -> Path:
    """An export folder as the pipeline hands to the registry, with a real ONNX model
    (y = scale * x) so "loadable" means onnxruntime runs it."""
    import onnx
    from onnx import TensorProto, helper

    folder.mkdir(parents=True)
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "scale"], ["y"])],
        "scale",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor("scale", TensorProto.FLOAT, [], [scale])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.save(model, folder / "model.onnx")
    (folder / "signature.json").write_text(json.dumps({"inputs": ["x"], "outputs": ["y"]}))
    (folder / "metrics.json").write_text(json.dumps({"ndcg@10": ndcg}))
    (folder / "lineage.json").write_text(json.dumps({"data_fingerprint": f"data-{scale}"}))
    return folder


def _assert_current(registry: Path, family: str, version: str, scale: float) -> None:
    """``version`` is current, its files are whole, and onnxruntime scores with it."""
    import onnxruntime as ort

    assert current_version(family, registry) == version
    assert load_current_metrics(family, registry) is not None
    session = ort.InferenceSession(str(registry / family / version / "model.onnx"))
    [y] = session.run(None, {"x": np.ones((3, 2), np.float32)})
    np.testing.assert_allclose(y, scale)
    assert [p.name for p in (registry / family).iterdir() if p.name.startswith(".")] == []


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ read-only RECSYS_HOME


def test_read_only_home_is_a_clear_error_and_keeps_everything(mount_tmpfs, tmp_path, monkeypatch):
    fs = mount_tmpfs("home", "32m")
    home = fs.path
    rows = _ingest(home, write_ml1m(tmp_path / "ml-1m", toy()))
    registry = home / "registry"
    promote("wals", _release(tmp_path / "r1", 1.5, 0.30), registry, "v1")
    write_index(registry)
    before = _snapshot(registry)
    fs.remount("ro")

    # 1. The settings check every run can start with.
    with pytest.raises(SettingsError) as info:
        ensure_writable(load_settings({"RECSYS_HOME": str(home)}).home)
    message = str(info.value)
    assert f"RECSYS_HOME={home} is not writable" in message
    assert "Read-only file system" in message and "remount it read-write" in message

    # 2. The warehouse.
    with pytest.raises(StorageError, match=rf"Cannot write {home}/warehouse\.duckdb: Read-only file system"):
        connect(home / "warehouse.duckdb", temp_dir=home / "scratch" / "duckdb_tmp")

    # 3. The registry: promotion, index.json.
    with pytest.raises(StorageError) as info:
        promote("wals", _release(tmp_path / "r2", 2.5, 0.31), registry, "v2")
    assert f"Cannot write {registry}/wals/v2" in str(info.value)
    assert f"{registry}/wals/CURRENT still names v1" in str(info.value)
    with pytest.raises(StorageError, match="previous index.json is unchanged"):
        atomic_write_json(registry / "index.json", {"families": {}})

    # 4. A model checkpoint (models.base's atomic write, torch.save inside).
    import torch

    from common.io import atomic_write_with

    with pytest.raises(StorageError, match=rf"Cannot write {registry}/wals/v1/model\.pt: Read-only"):
        atomic_write_with(
            registry / "wals" / "v1" / "model.pt", lambda fh: torch.save({"w": torch.ones(3)}, fh)
        )

    # 5. The Dagster ingest asset fails at once with the settings message, not a deep stack.
    import dagster as dg

    from orchestration.assets.ingest import raw_tables
    from orchestration.resources import WarehouseResource

    monkeypatch.setenv("RECSYS_HOME", str(home))
    result = dg.materialize([raw_tables], resources={"warehouse": WarehouseResource()}, raise_on_error=False)
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    error = failure.step_failure_data.error
    assert error.cls_name == "Failure"
    assert f"RECSYS_HOME={home} is not writable" in error.message

    # Everything from before is intact and loadable, read-only.
    assert _raw_count(home) == rows
    assert _snapshot(registry) == before
    _assert_current(registry, "wals", "v1", 1.5)

    # Writable again: the same calls work.
    fs.remount("rw")
    assert ensure_writable(home) == home
    promote("wals", tmp_path / "r2", registry, "v2")
    _assert_current(registry, "wals", "v2", 2.5)


def test_file_where_the_home_folder_should_be(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file, not a folder")
    with pytest.raises(SettingsError, match=rf"RECSYS_HOME={blocker}: .* is a file, not a folder"):
        ensure_writable(blocker)
    with pytest.raises(SettingsError, match="a file stands where a folder is needed"):
        ensure_writable(blocker / "home")
    with pytest.raises(StorageError, match="a file stands where a folder is needed"):
        connect(blocker / "home" / "warehouse.duckdb")
    assert blocker.read_text() == "a file, not a folder"


# ------------------------------------------------------------------ disk full


def test_full_disk_during_ingest_keeps_the_previous_raw_tables(mount_tmpfs, tmp_path):
    fs = mount_tmpfs("home", "16m")
    home = fs.path
    rows = _ingest(home, write_ml1m(tmp_path / "small", toy()))
    bigger = write_ml1m(tmp_path / "bigger", toy(n_users=300, n_items=200, per_user=100, seed=2))
    filler = fs.fill()
    assert fs.free_bytes() == 0

    with pytest.raises(StorageError) as info:
        _ingest(home, bigger)
    message = str(info.value)
    assert f"Cannot write {home}/warehouse.duckdb: No space left on device" in message
    assert "free space on it, or point RECSYS_HOME at a disk with room" in message
    assert "The previous raw tables are kept" in message

    filler.unlink()
    assert _raw_count(home) == rows
    assert _ingest(home, bigger) == 300 * 100  # space freed: the same ingest now succeeds


def test_full_disk_during_promotion_keeps_current_and_allows_a_retry(mount_tmpfs, tmp_path):
    fs = mount_tmpfs("registry", "2m")
    registry = fs.path
    promote("wals", _release(tmp_path / "r1", 1.5, 0.30), registry, "v1")
    write_index(registry)
    before = _snapshot(registry)
    filler = fs.fill()

    with pytest.raises(StorageError) as info:
        promote("wals", _release(tmp_path / "r2", 2.5, 0.31), registry, "v2")
    message = str(info.value)
    assert f"Cannot write {registry}/wals/v2" in message and "No space left on device" in message
    assert f"Nothing was promoted; {registry}/wals/CURRENT still names v1" in message
    with pytest.raises(StorageError, match=rf"{registry}/index\.json: No space left .* previous index"):
        write_index(registry)
    import torch

    from common.io import atomic_write_with

    # Overwriting an existing file (the checkpoint writer's atomic replace): the old bytes stay.
    target = registry / "wals" / "v1" / "model.onnx"
    kept = r"model\.onnx: No space left on device.* previous model\.onnx is unchanged"
    with pytest.raises(StorageError, match=kept):
        atomic_write_with(target, lambda fh: torch.save({"w": torch.ones(9)}, fh))

    assert _snapshot(registry) == {**before, "filler": (registry / "filler").read_bytes()}
    _assert_current(registry, "wals", "v1", 1.5)
    filler.unlink()
    promote("wals", tmp_path / "r2", registry, "v2")  # no half-promoted v2 blocks the retry
    _assert_current(registry, "wals", "v2", 2.5)


def test_full_disk_when_current_is_written_takes_the_new_version_back_out(mount_tmpfs, tmp_path):
    """The last step of a promotion, replacing CURRENT, hits ENOSPC: the version folder is
    already renamed into place, so promote must remove it again (else the registry holds a
    version that was never current, and a retry fails with "already exists").

    The exact write is made to fail by inodes, which tmpfs counts one per file or folder:
    every free inode is taken, then exactly as many are freed as the copy needs (the hidden
    temp folder plus one per file), so the copy succeeds and CURRENT's temp file is the
    first thing with no inode left.
    """
    fs = mount_tmpfs("registry", "8m", inodes=64)
    registry = fs.path
    promote("wals", _release(tmp_path / "r1", 1.5, 0.30), registry, "v1")
    release = _release(tmp_path / "r2", 2.5, 0.31)
    needed = 1 + sum(1 for p in release.rglob("*") if p.is_file())
    pads = registry / "pads"
    pads.mkdir()
    n = 0
    while True:
        try:
            (pads / str(n)).touch()
        except OSError as exc:
            assert exc.errno == 28, exc
            break
        n += 1
    assert fs.free_inodes() == 0
    for k in range(needed):
        (pads / str(n - 1 - k)).unlink()

    with pytest.raises(StorageError) as info:
        promote("wals", release, registry, "v2")
    message = str(info.value)
    assert f"Cannot write {registry}/wals/CURRENT: No space left on device" in message
    assert f"v2 was not promoted (its folder was removed); {registry}/wals/CURRENT still names v1" in message
    assert sorted(p.name for p in (registry / "wals").iterdir()) == ["CURRENT", "v1"]
    _assert_current(registry, "wals", "v1", 1.5)

    for p in pads.iterdir():
        p.unlink()
    promote("wals", release, registry, "v2")
    _assert_current(registry, "wals", "v2", 2.5)
