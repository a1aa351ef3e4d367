"""The store as a dataset in other people's training loops: a plain PyTorch loop, Hugging Face Accelerate
(``accelerator.prepare`` with the loader) and ``torchrun`` DDP on 2 CPU ranks each train a tiny student; the
DDP run, stopped mid-epoch, continues on 1 and on 3 ranks with every sample of the epoch seen once."""

import inspect
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_loader import N, write_store

from mmkd_core import create_student, store_loader, to_device

STUDENT = dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=32, vocab_size=8, max_position=8)
STUDENT_HEADS = dict(token_pred="head", target_dim=4, pooled_dim=2)


def step(student, opt, batch):
    """One step of token and pooled MSE (the same code runs in the torchrun script)."""
    out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    mask = batch["mask"]
    loss = ((out.tokens - batch["tokens"]) ** 2)[mask].mean() + ((out.pooled - batch["pooled"]) ** 2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach())


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_store(tmp_path_factory.mktemp("s") / "f16.zarr", "float16")


def test_a_plain_pytorch_loop_trains_a_student(store):
    torch.manual_seed(0)
    student = create_student("text", **STUDENT, **STUDENT_HEADS)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    loader = store_loader(store, 8, seed=0, by_length=True)
    losses = []
    for _ in range(3):
        losses.append(np.mean([step(student, opt, to_device(batch, "cpu")) for batch in loader]))
    assert loader.state_dict()["epoch"] == 3
    assert losses[-1] < 0.9 * losses[0]


def test_accelerate_prepares_the_loader_and_trains(store):
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(cpu=True)
    torch.manual_seed(0)
    student = create_student("text", **STUDENT, **STUDENT_HEADS)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    student, opt, loader = accelerator.prepare(student, opt, store_loader(store, 8, seed=0, workers=1))
    losses = []
    for _ in range(3):
        epoch = []
        for batch in loader:
            batch = to_device(batch, accelerator.device)
            out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            loss = ((out.tokens - batch["tokens"]) ** 2)[batch["mask"]].mean()
            opt.zero_grad()
            accelerator.backward(loss)
            opt.step()
            epoch.append(float(loss.detach()))
        losses.append(np.mean(epoch))
    assert loader.state_dict()["epoch"] == 3 and losses[-1] < losses[0]


DDP_SCRIPT = """
import json, sys
import torch
import torch.distributed as dist
from mmkd_core import create_student, store_loader, to_device

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
student = torch.nn.parallel.DistributedDataParallel(create_student("text", **STUDENT, **STUDENT_HEADS))
opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
loader = store_loader(sys.argv[1], 4, seed=7, workers=1)  # rank and world size from torch.distributed
seen, losses = [], []
for epoch in range(2):
    for k, batch in enumerate(loader):
        seen.append(batch["index"].tolist())
        losses.append(step(student, opt, to_device(batch, "cpu")))
        if epoch == 1 and k == 2:  # stop mid-epoch, as a run killed after a checkpoint would
            break
out = {"seen": seen, "losses": losses, "state": loader.state_dict(), "steps": len(seen)}
json.dump(out, open(f"{sys.argv[2]}/rank{rank}.json", "w"))
dist.destroy_process_group()
"""


def test_torchrun_ddp_on_2_ranks_then_resumed_on_1_and_3(store, tmp_path):
    script = tmp_path / "ddp.py"
    head = f"STUDENT = {STUDENT!r}\nSTUDENT_HEADS = {STUDENT_HEADS!r}\n\n{inspect.getsource(step)}\n"
    script.write_text(DDP_SCRIPT.replace("dist.init_process_group", head + "dist.init_process_group", 1))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(script),
        str(store),
        str(tmp_path),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert (
        ranks[0]["state"]
        == ranks[1]["state"]
        == {"format": "mmkd-store-dataset/1", "epoch": 1, "consumed": 24, "seed": 7}
    )
    assert ranks[0]["steps"] == ranks[1]["steps"]  # DDP never waits on a rank with fewer batches
    first_epoch = sum((r["seen"][:-3] for r in ranks), [])
    assert sorted(sum(first_epoch, [])) == list(range(N))  # epoch 0: every sample once over the two ranks
    before = sorted(sum(sum((r["seen"][-3:] for r in ranks), []), []))
    assert all(np.isfinite(r["losses"]).all() for r in ranks)
    for world in (1, 3):  # the same epoch continued on other ranks
        after = []
        for r in range(world):
            loader = store_loader(store, 5, seed=7, rank=r, world_size=world)
            loader.load_state_dict(ranks[0]["state"])
            after += [i for b in loader for i in b["index"].tolist()]
        assert sorted(before + after) == list(range(N))
