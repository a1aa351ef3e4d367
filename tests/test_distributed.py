"""Distributed extraction: shards as dask.distributed tasks (``--cluster local:N``, ``--scheduler``) and
``--shards K/N`` commands filling one store. Every store must equal, array for array and bit for bit, the
one a single process writes."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

import cloudpickle
import numpy as np
import pytest
import zarr
from conftest import save_tiny_beitv2, save_tiny_bert

from mmkd.extract import distributed as dist
from mmkd.extract.config import ExtractConfig
from mmkd.extract.run import extract
from mmkd_core.errors import MmkdError
from mmkd_core.store import StoreLock, lock_path, open_store, slice_lock_path

# the worker-side patches below are defined here: the workers cannot import this file
cloudpickle.register_pickle_by_value(sys.modules[__name__])

SCRIPTS = Path(sysconfig.get_path("scripts"))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
TINY_BEIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("bert") / "bert", layers=2)


@pytest.fixture(scope="module")
def beit(tmp_path_factory):
    return save_tiny_beitv2(tmp_path_factory.mktemp("beit") / "tiny_beitv2.pth", **TINY_BEIT)


def text_cfg(out, bert, **kw):
    """Tiny BERT over 48 shapes captions: 6 shards of 8 samples."""
    base = dict(
        teacher="bert",
        weights=str(bert),
        dataset="shapes",
        dataset_options={"count": 48},
        out=out,
        chunk_size=4,
        shard_size=8,
        batch_size=8,
        dtype="float32",
        autocast="none",  # as cli_args: every process of a test computes in one dtype
    )
    return ExtractConfig(**{**base, **kw})


def assert_same_store(a: Path, b: Path) -> None:
    """Every array of store ``a`` (and of its caption store) bit-equal in ``b``, and the same provenance."""
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    assert sorted(ga.array_keys()) == sorted(gb.array_keys())
    for name in ga.array_keys():
        x, y = ga[name][:], gb[name][:]
        assert x.dtype == y.dtype and np.array_equal(x, y), f"{b}: array {name} differs"
    assert ga.attrs["mmkd"] == gb.attrs["mmkd"]
    assert sorted(ga.group_keys()) == sorted(gb.group_keys())
    for sub in ga.group_keys():
        assert_same_store(a / sub, b / sub)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, bert):
    """The store a single process writes."""
    out = tmp_path_factory.mktemp("ref") / "one.zarr"
    s = extract(text_cfg(out, bert), show_progress=False)
    assert s.complete and s.shards_total == 6
    return out


# ------------------------------------------------------------------------------------------- --cluster


def _spy(log: str) -> None:
    """On a worker: record every shard it writes (pid, store, shard) in the file ``log``."""
    from mmkd_core.store import StoreWriter

    real = StoreWriter.write_shard

    def write_shard(self, k, data):
        real(self, k, data)
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {self.path} {k}\n")

    StoreWriter.write_shard = write_shard


def written(log: Path, store: Path) -> list[tuple[int, int]]:
    """(shard, pid) of every shard the spied workers wrote into ``store``."""
    rows = [line.split() for line in log.read_text().splitlines()] if log.exists() else []
    return sorted((int(k), int(pid)) for pid, path, k in rows if Path(path) == store.resolve())


def test_local_cluster_of_two_workers_writes_the_single_process_store(tmp_path, bert, reference, monkeypatch):
    from distributed import WorkerPlugin

    log = tmp_path / "written.txt"
    exit_plugin = dist._exit_plugin()

    class Spy(WorkerPlugin):  # the run's own workers get it with the plugin the run registers
        def setup(self, worker):
            _spy(str(log))

        def teardown(self, worker):
            exit_plugin.teardown(worker)

    monkeypatch.setattr(dist, "_exit_plugin", Spy)
    out = tmp_path / "c.zarr"
    s = extract(text_cfg(out, bert, cluster="local:2"), show_progress=False)
    assert s.complete and s.shards_written == 6 and s.samples_written == 48
    assert_same_store(reference, out)
    shards = written(log, out)
    assert [k for k, _ in shards] == list(range(6))  # every shard once: never two tasks for one shard
    assert len({pid for _, pid in shards}) == 2 and os.getpid() not in {pid for _, pid in shards}
    assert not lock_path(out).exists()


@contextlib.contextmanager
def _two_workers():
    """A local two-worker cluster (one thread each) with mmkd's exit plugin: (scheduler address, client)."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            dashboard_address=None,
            scheduler_kwargs={"dashboard_address": ":0"},
            memory_limit=0,
        ) as c,
        Client(c) as client,
    ):
        client.register_plugin(dist._exit_plugin(), name="mmkd-exit")
        yield c.scheduler_address, client


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A running two-worker cluster (``--scheduler`` its address) whose workers log the shards they write."""
    log = tmp_path_factory.mktemp("spy") / "written.txt"
    with _two_workers() as (address, client):
        client.run(_spy, str(log))
        yield address, log


@pytest.mark.slow
def test_scheduler_runs_one_task_per_shard_spread_over_the_workers(tmp_path, bert, reference, cluster):
    address, log = cluster
    out = tmp_path / "s.zarr"
    s = extract(text_cfg(out, bert, scheduler=address), show_progress=False)
    assert s.complete
    assert_same_store(reference, out)
    shards = written(log, out)
    assert [k for k, _ in shards] == list(range(6))  # every shard once: never two tasks for one shard
    assert len({pid for _, pid in shards}) == 2  # both workers took shards
    # a resumed run submits only the shards not done
    group = zarr.open_group(str(out), mode="r+")
    group["shards_done"][3] = 0
    attrs = dict(group.attrs["mmkd"])
    group.attrs["mmkd"] = {**attrs, "complete": False}
    s = extract(text_cfg(out, bert, scheduler=address), show_progress=False)
    assert s.complete and s.shards_written == 1 and [k for k, _ in written(log, out)] == [0, 1, 2, 3, 3, 4, 5]
    assert_same_store(reference, out)


@pytest.mark.slow
def test_pair_store_on_a_cluster_equals_one_process(tmp_path, bert, beit, cluster):
    # an image teacher over image-caption data: captions (a store inside) written by the client, images by
    # the workers, two views each (random crops replayed from their stored parameters)
    address, log = cluster
    kw = dict(
        teacher="beitv2",
        weights=str(beit),
        teacher_options=TINY_BEIT,
        dataset="shapes",
        dataset_options={"count": 20},
        views=2,
        text_tokenizer=str(bert),
        chunk_size=2,
        shard_size=4,
        batch_size=4,
        dtype="float32",
    )
    one = extract(ExtractConfig(out=tmp_path / "one.zarr", **kw), show_progress=False)
    many = extract(ExtractConfig(out=tmp_path / "many.zarr", scheduler=address, **kw), show_progress=False)
    assert one.complete and many.complete and many.shards_total == 5
    assert open_store(tmp_path / "many.zarr" / "captions").complete
    assert_same_store(tmp_path / "one.zarr", tmp_path / "many.zarr")
    assert [k for k, _ in written(log, tmp_path / "many.zarr")] == list(range(5))


# ------------------------------------------------------------------------------------------- --shards


def mmkd_extract(cfg_args, out, *extra):
    return subprocess.Popen(
        [str(SCRIPTS / "mmkd-extract"), *cfg_args, "--out", str(out), *extra, "--quiet"],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def cli_args(bert):
    return [
        *("--teacher", "bert", "--weights", str(bert), "--dataset", "shapes", "--dataset-option", "count=48"),
        *("--chunk-size", "4", "--shard-size", "8", "--batch-size", "8", "--dtype", "float32"),
        # one dtype for every command: two slices started before the store exists would each probe (auto)
        *("--autocast", "none"),
    ]


def test_two_slice_commands_started_together_fill_one_store(tmp_path, bert, reference):
    out = tmp_path / "s.zarr"
    procs = [mmkd_extract(cli_args(bert), out, "--shards", f"{k}/2") for k in (0, 1)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-2000:]
    assert open_store(out).complete
    assert_same_store(reference, out)
    assert not any(p.name.startswith(lock_path(out).name) for p in tmp_path.iterdir())  # every lock released


def test_a_store_is_complete_only_once_every_slice_is_done(tmp_path, bert, reference):
    out = tmp_path / "s.zarr"
    s = extract(text_cfg(out, bert, shards="1/3"), show_progress=False)
    assert not s.complete and s.shards_written == 2 and s.samples_written == 16
    assert np.flatnonzero(zarr.open_group(str(out), mode="r")["shards_done"][:]).tolist() == [1, 4]
    assert not extract(text_cfg(out, bert, shards="0/3"), show_progress=False).complete
    assert extract(text_cfg(out, bert, shards="1/3"), show_progress=False).shards_written == 0  # done already
    assert extract(text_cfg(out, bert, shards="2/3"), show_progress=False).complete
    assert_same_store(reference, out)


def _hold(path: Path) -> StoreLock:
    lock = StoreLock(path)
    lock.acquire(path)
    return lock


def test_the_slice_lock_rule_refuses_overlapping_commands(tmp_path, bert):
    out = tmp_path / "s.zarr"
    held = _hold(slice_lock_path(out, 0, 2))  # another command writing slice 0/2 (this live pid)
    try:
        with pytest.raises(MmkdError, match="--shards 0/2: another command writes this slice"):
            extract(text_cfg(out, bert, shards="0/2"), show_progress=False)
        with pytest.raises(MmkdError, match="in slices of 2.*same N"):
            extract(text_cfg(out, bert, shards="0/3"), show_progress=False)
        with pytest.raises(MmkdError, match="being filled by --shards commands"):
            extract(text_cfg(out, bert), show_progress=False)
        with pytest.raises(MmkdError, match="being filled by --shards commands"):
            extract(text_cfg(out, bert, cluster="local:1"), show_progress=False)
        assert extract(text_cfg(out, bert, shards="1/2"), show_progress=False).shards_written == 3
    finally:
        held.release()
    # a slice lock left by a process that died is taken over
    slice_lock_path(out, 0, 2).write_text(json.dumps({"pid": 2**22 + 12345, "host": os.uname().nodename}))
    assert extract(text_cfg(out, bert, shards="0/2"), show_progress=False).complete


def test_a_slice_waits_while_the_store_lock_is_held_briefly(tmp_path, bert, monkeypatch):
    out = tmp_path / "s.zarr"
    held = _hold(lock_path(out))
    threading.Timer(1.0, held.release).start()
    t = time.monotonic()
    assert extract(text_cfg(out, bert, shards="0/6", limit=8), show_progress=False).complete
    assert time.monotonic() - t >= 1.0
    monkeypatch.setattr(dist, "LOCK_WAIT", 0.3)
    held = _hold(lock_path(out))
    try:
        with pytest.raises(MmkdError, match=r"being written by pid .*waited 0 s"):
            extract(text_cfg(out, bert, shards="1/6", limit=8), show_progress=False)
    finally:
        held.release()


@pytest.mark.parametrize(
    "kw,needle",
    [
        ({"cluster": "local:0"}, "--cluster 'local:0'"),
        ({"cluster": "dask:2"}, "--cluster 'dask:2'"),
        ({"scheduler": " "}, "--scheduler is empty"),
        ({"cluster": "local:2", "scheduler": "tcp://h:8786"}, "--cluster and --scheduler exclude"),
        ({"shards": "2/2"}, "0 ≤ K < N"),
        ({"shards": "1"}, "--shards '1'"),
        ({"shards": "0/2", "overwrite": True}, "--overwrite with --shards"),
    ],
)
def test_configuration_mistakes_are_one_line(tmp_path, kw, needle):
    with pytest.raises(MmkdError, match=re.escape(needle)) as e:
        ExtractConfig(out=tmp_path / "s.zarr", **kw)
    assert "\n" not in str(e.value)


def test_cli_mistakes_end_as_one_error_line(tmp_path):
    from typer.testing import CliRunner

    from mmkd.extract.cli import app

    result = CliRunner().invoke(app, ["--shards", "3/2", "--out", str(tmp_path / "s.zarr")])
    assert result.exit_code == 2 and result.output.strip().startswith("error: --shards '3/2'")
    assert len(result.output.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------- faults


def _block_in_shard(shard: int, marker: str) -> None:
    """On a worker: the first time shard ``shard`` is written, write wrong targets into its first arrays, then
    stop before the last one (its done flag is not set) and wait to be killed; ``marker`` gets the pid."""
    from mmkd_core.store import StoreWriter

    real = StoreWriter.write_shard

    class Stuck:
        def __init__(self, arr):
            self.dtype = arr.dtype

        def __setitem__(self, key, value):
            Path(marker).write_text(str(os.getpid()))
            time.sleep(3600)

    def write_shard(self, k, data):
        if k != shard or os.path.exists(marker):
            return real(self, k, data)
        wrong = {n: (v * 0 + 7 if n in ("tokens", "pooled") else v) for n, v in data.items()}
        arrays = self._arrays
        self._arrays = {**arrays, "index": Stuck(arrays["index"])}  # index is written last
        try:
            real(self, k, wrong)
        finally:
            self._arrays = arrays

    StoreWriter.write_shard = write_shard


def _wait_for(path: Path, seconds: float = 180) -> int:
    deadline = time.monotonic() + seconds
    while not (path.exists() and path.read_text()):
        assert time.monotonic() < deadline, f"no worker reached the shard ({path})"
        time.sleep(0.1)
    return int(path.read_text())


@pytest.fixture
def own_cluster():
    with _two_workers() as (address, client):
        yield address, client


@pytest.mark.slow
def test_a_worker_killed_mid_shard_leaves_the_store_bit_identical(tmp_path, bert, reference, own_cluster):
    address, client = own_cluster
    marker = tmp_path / "stuck"
    client.run(_block_in_shard, 3, str(marker))
    out, result = tmp_path / "s.zarr", {}
    run = threading.Thread(target=lambda: result.update(s=extract(text_cfg(out, bert, scheduler=address), False)))
    run.start()
    pid = _wait_for(marker)
    assert not zarr.open_group(str(out), mode="r")["shards_done"][3]
    os.kill(pid, signal.SIGKILL)  # the scheduler gives shard 3 to another worker
    run.join(timeout=300)
    assert result["s"].complete
    assert_same_store(reference, out)
    assert pid not in client.run(os.getpid).values()


@pytest.mark.slow
def test_a_run_killed_mid_shard_is_finished_by_the_same_command(tmp_path, bert, reference, own_cluster):
    # the whole run dies (client and the worker inside a shard): the shard was not marked done, so running
    # the command again rewrites it whole
    address, client = own_cluster
    marker = tmp_path / "stuck"
    client.run(_block_in_shard, 2, str(marker))
    out = tmp_path / "s.zarr"
    first = mmkd_extract(cli_args(bert), out, "--scheduler", address)
    pid = _wait_for(marker)
    first.kill()
    first.communicate()
    os.kill(pid, signal.SIGKILL)
    assert not open_store(out).complete and lock_path(out).exists()  # a stale lock, taken over below
    again = mmkd_extract(cli_args(bert), out, "--scheduler", address)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-2000:]
    assert_same_store(reference, out)
