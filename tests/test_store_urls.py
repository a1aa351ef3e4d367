"""Stores at URLs: memory:// in this process, and s3:// on a real S3-compatible server (moto's, on 127.0.0.1)
through the console scripts. The same rules as on disk: equal bytes, resume, one writer, --overwrite only
of an mmkd store."""

import json
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import sysconfig
import textwrap
import threading
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest
import zarr

from mmkd.extract.config import ExtractConfig
from mmkd.extract.pairs import caption_store, caption_writer
from mmkd_core import location
from mmkd_core.errors import MmkdError
from mmkd_core.location import StoreURL, looks_like_url, store_location
from mmkd_core.store import CONFIG_FIELDS, Layout, StoreWriter, lock_path, open_store

SCRIPTS = Path(sysconfig.get_path("scripts"))
BUCKET = "mmkd-test"
CONFIG = {
    "teacher": {"name": "t", "weights_sha256": "abc"},
    "recipe": {"layers": [0, 1], "pool": "mean"},
    "preprocess": {},
    "views": {"count": 2},
    "dataset": {"name": "d", "fingerprint": "f"},
}
LAYOUT = dict(num_samples=20, views=2, time_steps=6, dim=8, pooled_dim=5, input_ids=True, chunk_size=4, shard_size=8)
# the extraction of the console-script tests: 20 shards, so that a kill lands between them
EXTRACT = ("--dataset", "shapes", "--dataset-option", "count=160", "--chunk-size", "4", "--shard-size", "8")
# float32: with --autocast auto each process probes bf16 on its own, and a loaded machine can decide it apart
EXTRACT += ("--batch-size", "8", "--quiet", "--autocast", "none")


def layout(**kw):
    return Layout(**{**LAYOUT, **kw})


def fake_data(lay, k):
    lo, hi = lay.shard_range(k)
    rng = np.random.default_rng(lo)
    n = hi - lo
    return {
        "tokens": rng.standard_normal((n, lay.views, lay.time_steps, lay.dim)).astype(np.float32),
        "pooled": rng.standard_normal((n, lay.views, lay.pooled_dim)).astype(np.float32),
        "lengths": np.full(n, lay.time_steps, np.int32),
        "input_ids": rng.integers(1, 100, (n, lay.time_steps)).astype(np.int32),
        "index": np.arange(lo, hi, dtype=np.int64),
    }


def fill(url, lay=None, config=CONFIG):
    lay = lay or layout()
    with StoreWriter.open(url, lay, config, {}) as w:
        for k in range(lay.num_shards):
            w.write_shard(k, fake_data(lay, k))
        assert w.finish()


def assert_same_store(a, b):
    """Every array bit-equal, and the same provenance."""
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    assert sorted(ga.array_keys()) == sorted(gb.array_keys())
    for name in ga.array_keys():
        x, y = ga[name][:], gb[name][:]
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert x.tobytes() == y.tobytes(), f"{name} differs"
    ma, mb = ga.attrs["mmkd"], gb.attrs["mmkd"]
    assert {k: ma[k] for k in CONFIG_FIELDS} == {k: mb[k] for k in CONFIG_FIELDS}
    assert ma["complete"] and mb["complete"]


# ---- the Location module, on memory:// ------------------------------------------------------------------------


def test_locations_are_paths_or_urls():
    assert store_location("runs/x.zarr") == Path("runs/x.zarr")
    assert store_location(Path("s3://collapsed")) == Path("s3:/collapsed")  # a Path is never read as a URL
    assert store_location("file:///tmp/x.zarr") == Path("/tmp/x.zarr")
    u = store_location("s3://bucket/a/x.zarr/")
    assert isinstance(u, StoreURL) and str(u) == "s3://bucket/a/x.zarr" and u.name == "x.zarr"
    assert str(u / "captions") == "s3://bucket/a/x.zarr/captions" and (u / "captions").name == "captions"
    assert lock_path(u) == StoreURL("s3://bucket/a/x.zarr.lock")
    assert lock_path("memory://x.zarr") == StoreURL("memory://x.zarr.lock")
    assert pickle.loads(pickle.dumps(u)) == u and store_location(u) is u
    assert looks_like_url("s3:/bucket/run") and not looks_like_url("runs/x")
    for bad, what in [
        ("nosuch://bucket/x.zarr", "knows no protocol 'nosuch'"),
        ("s3://bucket", "name a store inside the bucket"),
    ]:
        with pytest.raises(MmkdError, match=what) as e:
            store_location(bad, "--out")
        assert str(e.value).startswith(f"--out {bad}") and "\n" not in str(e.value)
    with pytest.raises(MmkdError, match="--out s3://bucket: name a store"):
        ExtractConfig(out="s3://bucket")
    from mmkd.train.config import TrainConfig

    with pytest.raises(MmkdError, match="--run-dir .*run directories are local"):
        TrainConfig(targets="memory://x.zarr", run_dir="s3://bucket/run")
    assert TrainConfig(targets="memory://x.zarr").run_dir == Path("runs/x")


def test_memory_url_operations():
    fs = fsspec.filesystem("memory")
    root = StoreURL("memory://loc-test")
    for key in ("x.zarr/zarr.json", "x.zarr/tokens/zarr.json", "x.zarr2/a", "x.zarrfoo"):
        fs.pipe_file(f"/loc-test/{key}", b"{}")
    x = root / "x.zarr"
    assert x.exists() and x.is_dir() and not x.is_file() and (x / "zarr.json").is_file()
    assert [e.name for e in x.iterdir()] == ["tokens", "zarr.json"] and (x / "zarr.json").read_text() == "{}"
    assert location.size(x) == 4
    lock = lock_path(x)
    lock.create(b"one")
    with pytest.raises(FileExistsError):
        lock.create(b"two")
    assert lock.read_text() == "one"
    location.remove(x)  # the prefix's objects only: never the lock beside it, nor x.zarr2 or x.zarrfoo
    assert not x.exists() and lock.exists() and (root / "x.zarr2").exists() and (root / "x.zarrfoo").exists()
    lock.unlink()
    with pytest.raises(FileNotFoundError):
        lock.unlink()
    lock.unlink(missing_ok=True)
    location.remove(root)


def test_memory_store_writes_reads_locks_and_overwrites_only_its_own():
    url = "memory://mem-test/s.zarr"
    lay = layout()
    first = StoreWriter.open(url, lay, CONFIG, {})
    assert json.loads(lock_path(url).read_text())["pid"] == os.getpid()  # memory:// locks in-process
    with pytest.raises(MmkdError, match=f"pid {os.getpid()}.*this process"):
        StoreWriter.open(url, lay, CONFIG, {})
    for k in range(lay.num_shards):
        first.write_shard(k, fake_data(lay, k))
    assert first.finish() and not lock_path(url).exists()
    r = open_store(url)
    assert r.complete and isinstance(r.path, StoreURL) and r.nbytes_stored() > 0
    np.testing.assert_array_equal(r.read(0, 20)["index"], np.arange(20))
    assert float(r.to_xarray()["pooled"][3, 1, 2]) == pytest.approx(float(r.read(3, 4)["pooled"][0, 1, 2]))
    with StoreWriter.open(url, lay, CONFIG, {}) as w:  # the same configuration resumes: nothing to do
        assert w.done_shards() == {0, 1, 2}
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/mem-test/s.zarr/notes.txt", b"mine")
    with pytest.raises(MmkdError, match="also holds 'notes.txt'"):
        StoreWriter.open(url, lay, {**CONFIG, "recipe": {}}, {}, overwrite=True)
    assert fs.cat_file("/mem-test/s.zarr/notes.txt") == b"mine" and open_store(url).complete
    fs.rm_file("/mem-test/s.zarr/notes.txt")
    StoreWriter.open(url, lay, {**CONFIG, "recipe": {}}, {}, overwrite=True).close()
    assert open_store(url).attrs["recipe"] == {} and not open_store(url).complete
    zarr.open_group("memory://mem-test/plain.zarr", mode="w")  # a zarr group, not ours
    with pytest.raises(MmkdError, match="not an mmkd store"):
        StoreWriter.open("memory://mem-test/plain.zarr", lay, CONFIG, {}, overwrite=True)
    location.remove(StoreURL("memory://mem-test"))


def test_pair_store_captions_live_inside_the_url_store():
    url = "memory://pair-test/p.zarr"
    images = Layout(num_samples=4, views=1, time_steps=1, dim=1, pooled_dim=3, store_tokens=False)
    caps = Layout(
        num_samples=6, views=1, time_steps=5, dim=1, pooled_dim=0, store_tokens=False, input_ids=True,
        extras=(("image", (), "int64", ("sample",)),),
    )  # fmt: skip
    one = {**CONFIG, "views": {"count": 1}}
    config = {**one, "dataset": {"name": "d", "unit": "image", "captions_group": "captions"}}
    with StoreWriter.open(url, images, config, {}) as w:  # the captions are written under the pair store's lock
        with caption_writer(store_location(url), caps, one, {}) as c:
            c.write_shard(
                0,
                {
                    "pooled": np.zeros((6, 1, 0), np.float32),
                    "lengths": np.full(6, 5, np.int32),
                    "input_ids": np.arange(30, dtype=np.int32).reshape(6, 5),
                    "index": np.arange(6),
                    "image": np.array([0, 0, 1, 2, 3, 3]),
                },
            )
            assert c.finish()
        pooled = np.ones((4, 1, 3), np.float32)
        w.write_shard(0, {"pooled": pooled, "lengths": np.ones(4, np.int32), "index": np.arange(4)})
        assert w.finish()
    table = caption_store(url)
    assert str(table.path) == url + "/captions" and table.read(0, 6)["image"].tolist() == [0, 0, 1, 2, 3, 3]
    # --overwrite proves the pair store ours: its captions are a zarr node inside it
    StoreWriter.open(url, images, {**config, "recipe": {}}, {}, overwrite=True).close()
    assert not StoreURL(url + "/captions").exists()
    location.remove(StoreURL("memory://pair-test"))


# ---- a real S3-compatible server on 127.0.0.1 -----------------------------------------------------------------


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on a free port, a bucket in it, and this process's environment pointed at it (botocore
    reads AWS_ENDPOINT_URL_S3 when s3fs connects). Yields the environment the console scripts get."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": f"http://{host}:{port}",
    }
    mp = pytest.MonkeyPatch()
    for k, v in env.items():
        mp.setenv(k, v)
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"]).create_bucket(Bucket=BUCKET)
    try:
        yield {**os.environ, "HF_HUB_OFFLINE": "1", **env}
    finally:
        mp.undo()
        server.stop()


def s3fs_():
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    return fs


def run(script, *args, env, cwd=None):
    return subprocess.run([str(SCRIPTS / script), *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd)


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


def child(url, mode, env):
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, url, json.dumps(LAYOUT), json.dumps(CONFIG), mode],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_s3_lock_is_an_object_created_only_if_absent(s3, caplog):
    url = f"s3://{BUCKET}/locked.zarr"
    lock = lock_path(url)
    assert lock == StoreURL(url + ".lock")
    # S3's conditional write: of many racing creators exactly one wins
    wins = []

    def race(i):
        try:
            (StoreURL(f"s3://{BUCKET}/race.lock")).create(str(i).encode())
            wins.append(i)
        except FileExistsError:
            pass

    threads = [threading.Thread(target=race, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and StoreURL(f"s3://{BUCKET}/race.lock").read_text() == str(wins[0])
    proc = child(url, "hold", s3)
    try:
        assert proc.stdout.readline().strip() == "locked"
        info = json.loads(lock.read_text())
        assert info["pid"] == proc.pid and info["host"] == socket.gethostname() and info["started"]
        with pytest.raises(MmkdError) as e:
            StoreWriter.open(url, layout(), CONFIG, {})
        msg = str(e.value)
        assert str(lock) in msg and f"pid {proc.pid}" in msg and "\n" not in msg
        with pytest.raises(MmkdError, match=f"pid {proc.pid}"):  # --overwrite does not break a live lock
            StoreWriter.open(url, layout(), {**CONFIG, "recipe": {}}, {}, overwrite=True)
        assert open_store(url).attrs["recipe"] == CONFIG["recipe"]  # readers are not locked out
    finally:
        proc.kill()
        proc.wait()
    # the holder is dead (kill -9): this host takes its lock over, with a warning that names it
    with caplog.at_level(logging.WARNING, logger="mmkd_core.store"):
        with StoreWriter.open(url, layout(), CONFIG, {}) as w:
            assert json.loads(lock.read_text())["pid"] == os.getpid()
            w.write_shard(0, fake_data(w.layout, 0))
    assert f"took over the stale lock {lock} of pid {proc.pid}" in caplog.text and not lock.exists()
    # a lock of another host is never judged by its pid
    lock.create(json.dumps({"pid": 1, "host": socket.gethostname() + "-other", "started": "x"}).encode())
    with pytest.raises(MmkdError, match=f"pid 1 on host {socket.gethostname()}-other"):
        StoreWriter.open(url, layout(), CONFIG, {})
    lock.unlink()


def test_s3_overwrite_deletes_only_an_mmkd_store(s3):
    fs = s3fs_()
    url = f"s3://{BUCKET}/ow.zarr"
    fill(url)
    fs.pipe_file(f"{BUCKET}/ow.zarr/notes.txt", b"mine")  # a foreign object under the store's prefix
    fs.pipe_file(f"{BUCKET}/ow.zarr2/keep", b"k")  # a neighbour sharing the prefix's spelling
    other = {**CONFIG, "recipe": {"layers": [1]}}
    with pytest.raises(MmkdError, match="also holds 'notes.txt'.*--overwrite will not delete it") as e:
        StoreWriter.open(url, layout(), other, {}, overwrite=True)
    assert "\n" not in str(e.value) and not lock_path(url).exists()
    assert s3fs_().cat_file(f"{BUCKET}/ow.zarr/notes.txt") == b"mine" and open_store(url).complete
    fs.rm_file(f"{BUCKET}/ow.zarr/notes.txt")
    with StoreWriter.open(url, layout(), other, {}, overwrite=True) as w:
        assert w.done_shards() == set()
    assert open_store(url).attrs["recipe"] == other["recipe"] and s3fs_().cat_file(f"{BUCKET}/ow.zarr2/keep") == b"k"
    # a prefix of someone else's objects, with or without --overwrite
    fs.pipe_file(f"{BUCKET}/theirs/data.csv", b"1,2")
    for overwrite in (False, True):
        with pytest.raises(MmkdError, match="not an mmkd store.*never deletes it"):
            StoreWriter.open(f"s3://{BUCKET}/theirs", layout(), CONFIG, {}, overwrite=overwrite)
    assert s3fs_().cat_file(f"{BUCKET}/theirs/data.csv") == b"1,2"
    with pytest.raises(MmkdError, match="no such store"):
        open_store(f"s3://{BUCKET}/missing.zarr")


def _read_in_child(url, queue):
    queue.put(int(open_store(url).read(0, 20)["index"].sum()))


def test_a_forked_worker_connects_anew(s3):
    """DataLoader workers fork from a process that already reached the bucket (s3fs is not fork-safe)."""
    import multiprocessing

    url = store_location(f"s3://{BUCKET}/fork.zarr")
    fill(url)
    assert url.exists() and open_store(url).complete  # this process is connected now
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_read_in_child, args=(url, queue))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0 and queue.get(timeout=5) == sum(range(20))


@pytest.fixture(scope="module")
def extracted(s3, tmp_path_factory):
    """The same extraction into a local directory and into the bucket, run side by side."""
    local = tmp_path_factory.mktemp("local") / "x.zarr"
    url = f"s3://{BUCKET}/x.zarr"
    procs = {
        where: subprocess.Popen(
            [str(SCRIPTS / "mmkd-extract"), *EXTRACT, "--out", str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=s3,
        )
        for where, out in (("local", local), ("s3", url))
    }
    outputs = {where: p.communicate() for where, p in procs.items()}
    for where, p in procs.items():
        assert p.returncode == 0, (where, outputs[where][1][-2000:])
    return local, url, {w: o[1] for w, o in outputs.items()}


def test_extraction_into_a_bucket_equals_the_local_one(extracted):
    local, url, stderr = extracted
    assert_same_store(local, url)
    assert "Traceback" not in stderr["s3"] and "store " not in stderr["s3"]  # --quiet: no summary
    assert not lock_path(url).exists() and sorted(p.name for p in local.parent.iterdir()) == ["x.zarr"]
    # the same bytes but the root zarr.json, whose mmkd_extract_seconds differ between runs
    meta_url, meta_local = len(StoreURL(url + "/zarr.json").read_bytes()), (local / "zarr.json").stat().st_size
    assert open_store(url).nbytes_stored() - meta_url == open_store(local).nbytes_stored() - meta_local


@pytest.mark.slow
def test_killed_extraction_into_a_bucket_resumes_to_the_same_store(s3, extracted):
    local = extracted[0]
    url = f"s3://{BUCKET}/killed.zarr"
    done = f"{BUCKET}/killed.zarr/shards_done/c"
    proc = subprocess.Popen(
        [str(SCRIPTS / "mmkd-extract"), *EXTRACT, "--out", url],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=s3,
    )
    n = 0
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            fs = s3fs_()
            n = len(fs.ls(done)) if fs.exists(done) else 0  # a done flag is one object (0 is not written)
            if n >= 3:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the extraction finished before it could be killed"
    assert 3 <= n < 20 and not open_store(url).complete and lock_path(url).exists()
    res = run("mmkd-extract", *EXTRACT, "--out", url, env=s3)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"took over the stale lock {url}.lock of pid {proc.pid}" in " ".join(res.stderr.split())
    assert_same_store(local, url)


def test_training_and_its_evaluation_read_the_bucket(s3, extracted, tmp_path):
    url = extracted[1]
    mrpc = tmp_path / "mrpc"
    mrpc.mkdir()
    rows = ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"]
    for i, c in enumerate(("red", "blue", "green")):
        rows.append(f"1\t{2 * i}\t{2 * i + 1}\ta {c} circle at the top\tthere is a {c} circle on top")
    (mrpc / "msr_paraphrase_train.txt").write_text("\n".join(rows) + "\n")
    run_dir = tmp_path / "run"
    res = run(
        "mmkd-train",
        *("--targets", url, "--student", "text", "--depth", 1, "--steps", 2, "--batch-size", 8),
        *("--run-dir", run_dir, "--eval", f"mrpc:{mrpc}", "--quiet"),
        env=s3,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    record = json.loads((run_dir / "config.json").read_text())
    assert record["train"]["targets"] == url and record["store"]["dataset"]["name"] == "shapes"
    results = json.loads((run_dir / "eval.json").read_text())
    assert set(results) >= {"mrpc/train/s1_to_s2_r1", "mean"} and 0 <= results["mean"] <= 1
    res = run("mmkd-train", "--targets", f"s3://{BUCKET}/none.zarr", "--run-dir", tmp_path / "r2", env=s3)
    assert res.returncode == 2 and "none.zarr: no such store" in res.stderr and "Traceback" not in res.stderr
