"""benchmarks/gpu.py, the prepared GPU check, runs to the end here at its smallest sizes: one table, a JSON
file under $OUT, and every section ran (the extraction of all three stores, decoding, training from the store
and from memory, ``mmkd-train --nproc 1`` and the one-rank DDP path)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_check_runs_on_the_cpu(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--quick", "--device", "cpu"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| section | measure | value | goal |" in done.stdout
    assert (tmp_path / "gpu_benchmark.md").read_text().strip() in done.stdout

    result = json.loads((tmp_path / "gpu_benchmark.json").read_text())
    assert result["device"] == "cpu"
    stores = ("float16 tokens", "int8 tokens", "pooled only")
    for name in stores:
        extraction = result["extraction"][name]
        assert extraction["repeats"] >= 1
        assert all(v > 0 for v in extraction["rate"] + extraction["bare"])
        assert extraction["bytes_per_sample"] > 0
    assert (
        result["extraction"]["pooled only"]["bytes_per_sample"]
        < result["extraction"]["int8 tokens"]["bytes_per_sample"]
    )
    for name in ("float16 tokens", "int8 tokens"):
        assert result["decoding"][name]["equal"], f"{name}: widened on the device differs from targets='float32'"
    assert set(result["training"]) == {"workers=0", "workers=1", "seconds"}
    for workers in ("workers=0", "workers=1"):
        assert result["training"][workers]["from_store"] and result["training"][workers]["in_memory"]
    ranks = result["ranks"]
    assert ranks["mmkd_train_nproc_1"]["ok"], ranks["mmkd_train_nproc_1"]["tail"]
    assert ranks["ddp_one_rank"]["ok"], ranks["ddp_one_rank"]["tail"]
    assert ranks["ddp_one_rank"]["backend"] == "gloo" and ranks["ddp_one_rank"]["world_size"] == 1
    assert result["elapsed_s"] > 0 and result["failed"] == []
