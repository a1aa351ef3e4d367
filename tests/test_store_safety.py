"""What StoreWriter must never do: delete what is not a store, let two writers share a store, store inf
where the user gave a number, or mark a shard done before its data is written."""

import errno
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import zarr

from mmkd_core.errors import MmkdError
from mmkd_core.store import (
    Layout,
    StoreLock,
    StoreWriter,
    live_slices,
    lock_path,
    open_store,
    refuse_slices,
    slice_lock_path,
    take_slice,
    wait_for_lock,
)

CONFIG = {
    "teacher": {"name": "t", "weights_sha256": "abc"},
    "recipe": {"layers": [0, 1], "pool": "mean"},
    "preprocess": {},
    "views": {"count": 2},
    "dataset": {"name": "d", "fingerprint": "f"},
}
LAYOUT = dict(num_samples=20, views=2, time_steps=6, dim=8, pooled_dim=5, input_ids=True, chunk_size=4, shard_size=8)


def layout(**kw):
    return Layout(**{**LAYOUT, **kw})


def fake_data(lay, k, seed=0):
    lo, hi = lay.shard_range(k)
    rng = np.random.default_rng([seed, lo])
    n = hi - lo
    return {
        "tokens": rng.standard_normal((n, lay.views, lay.time_steps, lay.dim)).astype(np.float32),
        "pooled": rng.standard_normal((n, lay.views, lay.pooled_dim)).astype(np.float32),
        "lengths": np.full(n, lay.time_steps, np.int32),
        "input_ids": rng.integers(1, 100, (n, lay.time_steps)).astype(np.int32),
        "index": np.arange(lo, hi, dtype=np.int64),
    }


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_shard_untouched(path, lay, k):
    """Every array of the store reads its fill value (0) over shard k, and shard k is not done."""
    g = zarr.open_group(str(path), mode="r")
    lo, hi = lay.shard_range(k)
    for name in g.array_keys():
        if name != "shards_done":
            assert not np.any(g[name][lo:hi]), f"{name} has data of shard {k}"
    assert g["shards_done"][k] == 0


# ---- 1. --overwrite replaces an mmkd store or an empty directory, nothing else ----------------------------


def user_folder(root: Path) -> Path:
    (root / "photos").mkdir(parents=True)
    (root / "notes.txt").write_text("mine")
    (root / "photos" / "a.jpg").write_bytes(b"\xff\xd8 not really")
    return root


@pytest.mark.parametrize("overwrite", [False, True])
def test_user_folder_is_never_deleted(tmp_path, overwrite):
    out = user_folder(tmp_path / "out")
    before = snapshot(out)
    with pytest.raises(MmkdError, match=re.escape(str(out)) + r".*not an mmkd store") as e:
        StoreWriter.open(out, layout(), CONFIG, {}, overwrite=overwrite)
    assert "\n" not in str(e.value)
    assert snapshot(out) == before
    assert not lock_path(out).exists()  # a refused open leaves no lock behind


def test_file_is_never_replaced(tmp_path):
    out = tmp_path / "out.zarr"
    out.write_text("a file the user wants")
    with pytest.raises(MmkdError, match=re.escape(str(out)) + r" exists and is not a directory"):
        StoreWriter.open(out, layout(), CONFIG, {}, overwrite=True)
    assert out.read_text() == "a file the user wants"


def test_zarr_group_without_mmkd_attribute_is_never_deleted(tmp_path):
    out = tmp_path / "theirs.zarr"
    g = zarr.open_group(str(out), mode="w", attributes={"owner": "someone else"})
    g.create_array("x", shape=(4,), dtype="float32")[:] = np.arange(4)
    before = snapshot(out)
    with pytest.raises(MmkdError, match=re.escape(str(out)) + r".*not an mmkd store"):
        StoreWriter.open(out, layout(), CONFIG, {}, overwrite=True)
    assert snapshot(out) == before


def test_mmkd_store_holding_a_foreign_file_is_not_deleted(tmp_path):
    out = tmp_path / "s.zarr"
    StoreWriter.open(out, layout(), CONFIG, {}).close()
    (out / "README.txt").write_text("a note the user put into the store")
    other = {**CONFIG, "recipe": {"layers": [1], "pool": "mean"}}
    with pytest.raises(MmkdError, match="README.txt"):
        StoreWriter.open(out, layout(), other, {}, overwrite=True)
    assert (out / "README.txt").read_text() == "a note the user put into the store"
    assert open_store(out).attrs["recipe"] == CONFIG["recipe"]


def test_overwrite_through_a_symlink_is_refused(tmp_path):
    real = tmp_path / "real.zarr"
    StoreWriter.open(real, layout(), CONFIG, {}).close()
    link = tmp_path / "link.zarr"
    link.symlink_to(real)
    other = {**CONFIG, "recipe": {"layers": [1], "pool": "mean"}}
    with pytest.raises(MmkdError, match="symbolic link"):
        StoreWriter.open(link, layout(), other, {}, overwrite=True)
    assert open_store(real).attrs["recipe"] == CONFIG["recipe"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_empty_directory_becomes_the_store(tmp_path, overwrite):
    out = tmp_path / "empty.zarr"
    out.mkdir()
    with StoreWriter.open(out, layout(), CONFIG, {}, overwrite=overwrite) as w:
        assert w.done_shards() == set()
    assert open_store(out).attrs["recipe"] == CONFIG["recipe"]


def test_overwrite_replaces_an_mmkd_store(tmp_path):
    out = tmp_path / "s.zarr"
    lay = layout()
    with StoreWriter.open(out, lay, CONFIG, {}) as w:
        w.write_shard(0, fake_data(lay, 0))
    other = {**CONFIG, "recipe": {"layers": [1], "pool": "mean"}}
    with StoreWriter.open(out, lay, other, {}, overwrite=True) as w:
        assert w.done_shards() == set()
    assert open_store(out).attrs["recipe"] == other["recipe"]
    assert not np.any(zarr.open_group(str(out), mode="r")["index"][:])


def test_store_whose_creation_was_cut_short_can_be_overwritten(tmp_path):
    out = tmp_path / "s.zarr"
    StoreWriter.open(out, layout(), CONFIG, {}).close()
    shutil.rmtree(out / "index")  # as if the process died while creating the arrays
    with pytest.raises(MmkdError, match="'index'.*--overwrite"):
        StoreWriter.open(out, layout(), CONFIG, {})
    StoreWriter.open(out, layout(), CONFIG, {}, overwrite=True).close()
    assert len(open_store(out)) == 20


def test_creation_killed_before_any_shard_is_created_again_by_the_same_command(tmp_path):
    """kill -9 while the arrays are created: re-running the same command (no --overwrite) must work."""
    out = tmp_path / "s.zarr"
    StoreWriter.open(out, layout(), CONFIG, {}).close()
    for name in ("shards_done", "index"):  # created last: as if the process died before them
        shutil.rmtree(out / name)
    with StoreWriter.open(out, layout(), CONFIG, {}) as w:
        assert w.done_shards() == set() and "index" in w.group
    assert len(open_store(out)) == 20


# ---- 2. one writer at a time ---------------------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import json, os, sys, time
    from mmkd_core.store import Layout, StoreWriter
    path, layout, config, mode = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
    w = StoreWriter.open(path, Layout(**layout), config, {})
    print("locked", flush=True)
    if mode == "die":
        os._exit(0)  # like a killed process: no close, the lock stays behind
    time.sleep(120)
""")


def child(path, mode):
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), json.dumps(LAYOUT), json.dumps(CONFIG), mode],
        stdout=subprocess.PIPE,
        text=True,
    )


def test_second_writer_is_refused_while_the_first_lives(tmp_path):
    out = tmp_path / "s.zarr"
    proc = child(out, "hold")
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(MmkdError) as e:
            StoreWriter.open(out, layout(), CONFIG, {})
        msg = str(e.value)
        assert str(lock_path(out)) in msg and f"pid {proc.pid}" in msg and "\n" not in msg
        with pytest.raises(MmkdError, match=f"pid {proc.pid}"):  # --overwrite does not break a live lock
            StoreWriter.open(out, layout(), {**CONFIG, "recipe": {}}, {}, overwrite=True)
        assert open_store(out).attrs["recipe"] == CONFIG["recipe"]  # readers are not locked out
    finally:
        proc.kill()
        proc.wait()


def test_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
    """A kill -9 leaves the lock behind; re-running the same command must continue the store."""
    import logging

    out = tmp_path / "s.zarr"
    proc = child(out, "die")
    assert proc.stdout.readline().strip() == "locked"
    assert proc.wait() == 0  # exited and reaped: its pid is no longer running
    lock = lock_path(out)
    assert json.loads(lock.read_text())["pid"] == proc.pid
    with caplog.at_level(logging.WARNING, logger="mmkd_core.store"):
        with StoreWriter.open(out, layout(), CONFIG, {}) as w:
            assert w.done_shards() == set()
            assert json.loads(lock.read_text())["pid"] == os.getpid()  # the lock is now this writer's
    assert f"took over the stale lock {lock} of pid {proc.pid}" in caplog.text
    assert not lock.exists() and not list(tmp_path.glob("*.stale-*"))


def test_lock_from_another_host_is_not_judged_by_pid(tmp_path):
    out = tmp_path / "s.zarr"
    lock = lock_path(out)
    lock.write_text(json.dumps({"pid": 1, "host": socket.gethostname() + "-other", "started": "x", "token": "t"}))
    with pytest.raises(MmkdError, match=re.escape(f"pid 1 on host {socket.gethostname()}-other")):
        StoreWriter.open(out, layout(), CONFIG, {})
    assert lock.exists()


def test_unreadable_lock_is_refused(tmp_path):
    out = tmp_path / "s.zarr"
    lock_path(out).write_text("")
    with pytest.raises(MmkdError, match="unreadable"):
        StoreWriter.open(out, layout(), CONFIG, {})


def test_second_writer_in_the_same_process_is_refused(tmp_path):
    out = tmp_path / "s.zarr"
    first = StoreWriter.open(out, layout(), CONFIG, {})
    with pytest.raises(MmkdError, match=f"pid {os.getpid()}.*this process"):
        StoreWriter.open(out, layout(), CONFIG, {})
    first.close()
    StoreWriter.open(out, layout(), CONFIG, {}).close()


def test_lock_is_released_after_a_run_an_error_and_a_refusal(tmp_path):
    out = tmp_path / "s.zarr"
    lay = layout()
    lock = lock_path(out)
    w = StoreWriter.open(out, lay, CONFIG, {})
    assert lock.exists() and json.loads(lock.read_text())["pid"] == os.getpid()
    for k in range(lay.num_shards):
        w.write_shard(k, fake_data(lay, k))
    assert w.finish()
    assert not lock.exists()
    with pytest.raises(RuntimeError, match="closed"):
        w.write_shard(0, fake_data(lay, 0))
    with pytest.raises(ValueError), StoreWriter.open(out, lay, CONFIG, {}):
        raise ValueError("something failed while writing")
    assert not lock.exists()
    with pytest.raises(MmkdError, match="recipe"):
        StoreWriter.open(out, lay, {**CONFIG, "recipe": {}}, {})
    assert not lock.exists()
    w = StoreWriter.open(out, lay, CONFIG, {})
    w.close()
    w.close()  # idempotent
    assert not lock.exists()


def test_close_leaves_a_lock_it_no_longer_owns(tmp_path):
    out = tmp_path / "s.zarr"
    first = StoreWriter.open(out, layout(), CONFIG, {})
    lock_path(out).unlink()  # the user cleared it by hand while `first` ran
    second = StoreWriter.open(out, layout(), CONFIG, {})
    first.close()
    assert lock_path(out).exists()  # still second's
    second.close()
    assert not lock_path(out).exists()


def test_lock_is_beside_the_store_and_invisible_to_readers(tmp_path):
    out = tmp_path / "s.zarr"
    lay = layout()
    with StoreWriter.open(out, lay, CONFIG, {}) as w:
        w.write_shard(0, fake_data(lay, 0))
        assert lock_path(out) == tmp_path / "s.zarr.lock"
        assert not any("lock" in p.name for p in out.rglob("*"))
        r = open_store(out)
        np.testing.assert_array_equal(r.read(0, 8)["index"], np.arange(8))
        assert "lock" not in " ".join(zarr.open_group(str(out), mode="r").keys())
    # two spellings of one store share one lock
    with StoreWriter.open(out, lay, CONFIG, {}), pytest.raises(MmkdError, match="being written"):
        StoreWriter.open(tmp_path / "." / "s.zarr", lay, CONFIG, {})


def test_slice_locks_are_named_beside_the_store_lock_and_refuse_overlaps(tmp_path):
    """``--shards K/N``: one lock per slice; a slice of another N, or a whole run, is refused beside a live one."""
    out = tmp_path / "s.zarr"
    assert slice_lock_path(out, 1, 3) == tmp_path / "s.zarr.lock.1-of-3"
    assert live_slices(out) == []
    held = take_slice(out, 0, 2)
    try:
        [(kn, path, info)] = live_slices(out)
        assert kn == (0, 2) and path == slice_lock_path(out, 0, 2) and info["pid"] == os.getpid()
        refuse_slices(out, 2)  # another slice of the same N is fine
        take_slice(out, 1, 2).release()
        with pytest.raises(MmkdError, match="another command writes this slice"):
            take_slice(out, 0, 2)
        with pytest.raises(MmkdError, match=re.escape("--shards K/3: ") + ".*in slices of 2.*every command"):
            refuse_slices(out, 3)
        with pytest.raises(MmkdError, match=re.escape("filled by --shards commands (slice 0/2, pid")):
            refuse_slices(out, None)
    finally:
        held.release()
    assert live_slices(out) == [] and not slice_lock_path(out, 0, 2).exists()


def test_a_slice_lock_of_a_dead_process_is_not_live_and_is_taken_over(tmp_path):
    out = tmp_path / "s.zarr"
    dead = {"pid": 2**22 + 12345, "host": socket.gethostname(), "started": "x", "token": "t"}
    slice_lock_path(out, 0, 2).write_text(json.dumps(dead))
    assert live_slices(out) == []
    refuse_slices(out, None)
    lock = take_slice(out, 0, 2)
    assert json.loads(slice_lock_path(out, 0, 2).read_text())["pid"] == os.getpid()
    lock.release()


def test_wait_for_lock_waits_for_the_holder_then_gives_up(tmp_path):
    import threading

    out = tmp_path / "s.zarr"
    held = StoreLock(lock_path(out))
    held.acquire(out)
    with pytest.raises(MmkdError, match=r"being written by pid .*\(waited 0 s\)"):
        wait_for_lock(lock_path(out), out, wait=0.3)
    timer = threading.Timer(0.3, held.release)
    timer.start()
    try:
        lock = wait_for_lock(lock_path(out), out, wait=30)
    finally:
        timer.join()
    assert json.loads(lock_path(out).read_text())["token"] == lock.token
    lock.release()
    assert not lock_path(out).exists()


# ---- 3. values the storage dtype cannot hold are refused, naming them ----------------------------------------


@pytest.mark.parametrize(
    "dtype,name", [("float16", "tokens"), ("float16", "pooled"), ("int8", "tokens"), ("int8", "pooled")]
)
def test_value_beyond_float16_is_refused_before_anything_is_written(tmp_path, dtype, name):
    out = tmp_path / "s.zarr"
    lay = layout(dtype=dtype)
    with StoreWriter.open(out, lay, CONFIG, {}) as w:
        w.write_shard(0, fake_data(lay, 0))
        data = fake_data(lay, 1)
        data[name][1, 1, ..., 2] = 1e5  # sample 9 of the store, view 1
        with pytest.raises(
            MmkdError,
            match=rf"'{name}', sample 9\b, view 1.*value 100000 .*float16.*inf"
            r".*--dtype bfloat16 or --dtype float32",
        ) as e:
            w.write_shard(1, data)
        assert "\n" not in str(e.value)
        assert w.done_shards() == {0}
    assert not open_store(out).complete
    assert_shard_untouched(out, lay, 1)


def test_float16_limit_is_where_rounding_reaches_inf(tmp_path):
    # float16's largest finite value is 65504 and the next step would be 65536: round-to-nearest gives inf
    # from the midpoint 65520 on, so 65519 must be stored (as 65504) and 65520 refused
    lay = layout(dtype="float16")
    with StoreWriter.open(tmp_path / "s.zarr", lay, CONFIG, {}) as w:
        data = fake_data(lay, 0)
        data["pooled"][0, 0, 0] = -65519.0
        w.write_shard(0, data)
        data["pooled"][0, 0, 0] = -65520.0
        with pytest.raises(MmkdError, match="value -65520 "):
            w.write_shard(0, data)
    assert open_store(tmp_path / "s.zarr").pooled(0)[0] == -65504.0


def test_bfloat16_stores_large_values(tmp_path):
    lay = layout(dtype="bfloat16")
    with StoreWriter.open(tmp_path / "s.zarr", lay, CONFIG, {}) as w:
        data = fake_data(lay, 0)
        data["tokens"][3, 0, 2, 1] = 1e5
        w.write_shard(0, data)
    got = open_store(tmp_path / "s.zarr").tokens(3)[2, 1]
    assert abs(got - 1e5) <= 1e5 * 2.0**-8  # bfloat16 keeps 8 significant bits: half an ulp is 2^-8 relative


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_targets_are_refused(tmp_path, dtype, bad):
    lay = layout(dtype=dtype)
    out = tmp_path / "s.zarr"
    with StoreWriter.open(out, lay, CONFIG, {}) as w:
        data = fake_data(lay, 1)
        data["index"] += 100
        data["tokens"][2, 0, 4, 3] = bad
        with pytest.raises(
            MmkdError,
            match=rf"'tokens', sample 10 \(dataset index 110\), view 0, time step 4: "
            rf"the teacher's target is {bad}",
        ):
            w.write_shard(1, data)
        assert w.done_shards() == set()
    assert_shard_untouched(out, lay, 1)


# ---- 4. a shard is marked done only after its data is written ------------------------------------------------


def test_shard_interrupted_mid_write_is_not_done_and_rewrites_equal(tmp_path, monkeypatch):
    lay = layout(dtype="int8")
    ref = tmp_path / "ref.zarr"
    with StoreWriter.open(ref, lay, CONFIG, {}) as w:
        for k in range(lay.num_shards):
            w.write_shard(k, fake_data(lay, k))
        assert w.finish()

    out = tmp_path / "s.zarr"
    w = StoreWriter.open(out, lay, CONFIG, {})
    w.write_shard(0, fake_data(lay, 0))
    real = zarr.Array.__setitem__
    calls = []

    def disk_full_on_second_write(self, key, value):
        calls.append(self.basename)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, key, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", disk_full_on_second_write)
    with pytest.raises(OSError, match="No space left"):
        w.write_shard(1, fake_data(lay, 1))
    monkeypatch.setattr(zarr.Array, "__setitem__", real)
    lo, hi = lay.shard_range(1)
    g = zarr.open_group(str(out), mode="r")
    assert np.any(g[calls[0]][lo:hi])  # the first array of shard 1 did land: the interruption is mid-shard
    assert w.done_shards() == {0}
    assert not w.finish()  # not complete; finish closes, as a crashed run's rerun starts a new writer
    assert not open_store(out).complete

    with StoreWriter.open(out, lay, CONFIG, {}) as w:
        assert w.done_shards() == {0}
        for k in sorted(set(range(lay.num_shards)) - w.done_shards()):
            w.write_shard(k, fake_data(lay, k))
        assert w.finish()
    a, b = zarr.open_group(str(ref), mode="r"), zarr.open_group(str(out), mode="r")
    assert sorted(a.array_keys()) == sorted(b.array_keys())
    for name in a.array_keys():
        np.testing.assert_array_equal(a[name][:], b[name][:], err_msg=name)
    assert open_store(out).complete
