"""Training that cannot hang, resume that is the same run, checkpoints that cannot run code, options that
fail before the first step."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import WORDS, save_tiny_bert
from safetensors.torch import load_file
from typer.testing import CliRunner

from mmkd.extract.config import ExtractConfig
from mmkd.extract.run import extract
from mmkd.train.checkpoint import KEEP, latest_checkpoint, read_checkpoint, write_checkpoint
from mmkd.train.cli import app
from mmkd.train.config import TrainConfig
from mmkd.train.loop import train
from mmkd.train.optim import param_groups
from mmkd_core.errors import MmkdError


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("bert"), layers=2)


def _text_store(root: Path, bert_dir: Path, n: int, chunk: int) -> Path:
    rng = np.random.default_rng(n)
    (root / "s.txt").write_text(
        "\n".join(" ".join(rng.choice(WORDS, size=rng.integers(2, 12))) for _ in range(n)) + "\n"
    )
    out = root / "t.zarr"
    extract(
        ExtractConfig(
            teacher="bert",
            weights=str(bert_dir),
            dataset="text",
            data_root=str(root / "s.txt"),
            out=out,
            dtype="float32",
            chunk_size=chunk,
            shard_size=chunk * 4,
        ),
        show_progress=False,
    )
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory, bert_dir):
    return _text_store(tmp_path_factory.mktemp("s"), bert_dir, 60, 4)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    w = load_file(str(run_dir / "student" / "model.safetensors"))
    assert w
    return w


@pytest.mark.parametrize("n, chunk, batch, epochs", [(141, 5, 8, 4), (191, 5, 8, 4)])
def test_reported_hangs_and_lost_batches_end_with_every_epoch_whole(tmp_path, bert_dir, n, chunk, batch, epochs):
    """The reproductions: N=141 hung in epoch 3 (18 batches where epoch 0 had 19); N=191 cut epochs short."""
    import signal

    store = _text_store(tmp_path, bert_dir, n, chunk)

    def hung(*_):
        raise TimeoutError("training did not end: the loop spins")

    signal.signal(signal.SIGALRM, hung)
    signal.alarm(240)
    try:
        res = CliRunner().invoke(
            app,
            [
                "--targets",
                str(store),
                "--depth",
                "1",
                "--batch-size",
                str(batch),
                "--epochs",
                str(epochs),
                "--run-dir",
                str(tmp_path / "run"),
                "--quiet",
                "--log-every",
                "1",
                "--loss",  # losses without in-batch negatives keep the short last batch of each buffer
                "token_mse=1,pooled_mse=1",
            ],
            catch_exceptions=False,
        )
    finally:
        signal.alarm(0)
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    per_epoch = -(-n // batch)  # one rank, one buffer: ceil(N / batch) batches in every epoch
    assert [sum(r["epoch"] == e for r in rows) for e in range(epochs)] == [per_epoch] * epochs


def test_resume_without_flags_is_the_same_run_and_differing_flags_are_refused(tmp_path, store):
    runner = CliRunner()
    args = [
        "--targets",
        str(store),
        "--depth",
        "1",
        "--batch-size",
        "8",
        "--lr",
        "3e-3",
        "--seed",
        "5",
        "--steps",
        "12",
        "--ckpt-every",
        "4",
        "--quiet",
    ]
    assert runner.invoke(app, [*args, "--run-dir", str(tmp_path / "full")]).exit_code == 0
    from mmkd.train.recipe import TrainRecipe

    real = TrainRecipe.save_checkpoint
    with pytest.MonkeyPatch.context() as mp:

        def crash_after_first(recipe):
            real(recipe)
            raise KeyboardInterrupt

        mp.setattr(TrainRecipe, "save_checkpoint", crash_after_first)
        res = runner.invoke(app, [*args, "--run-dir", str(tmp_path / "cut")])
    assert res.exit_code != 0 and "--resume --run-dir" in res.output
    for flag, value in [
        ("--lr", "1e-3"),
        ("--seed", "0"),
        ("--batch-size", "16"),
        ("--loss", "token_mse=1"),
        ("--steps", "20"),
    ]:
        bad = runner.invoke(
            app, ["--targets", str(store), "--run-dir", str(tmp_path / "cut"), "--resume", flag, value, "--quiet"]
        )
        assert bad.exit_code == 2 and f"--resume: {flag} " in bad.output and "Traceback" not in bad.output
    # the same value again is fine; what only changes how the run executes may differ
    res = runner.invoke(
        app,
        [
            "--targets",
            str(store),
            "--run-dir",
            str(tmp_path / "cut"),
            "--resume",
            "--lr",
            "3e-3",
            "--ckpt-every",
            "3",
            "--quiet",
        ],
    )
    assert res.exit_code == 0, res.output
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line)["step"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert rows == sorted(set(rows))  # no step logged twice


def test_resume_on_another_world_size_continues_and_an_older_plan_is_refused(tmp_path, store):
    cfg = TrainConfig(
        targets=store, depth=1, batch_size=8, steps=4, ckpt_every=2, run_dir=tmp_path / "r", progress=False
    )
    train(cfg)
    record = json.loads((tmp_path / "r" / "config.json").read_text())
    (tmp_path / "r" / "config.json").write_text(json.dumps({**record, "world_size": 2}))
    # the loader's state is global: the rest of the run is shared among this world size's ranks
    again = train(TrainConfig(targets=store, run_dir=tmp_path / "r", resume=True, progress=False))
    assert again.steps >= 4
    (tmp_path / "r" / "config.json").write_text(json.dumps(record))
    older = record["steps_per_epoch"] + 1  # an older plan's count of batches per epoch
    (tmp_path / "r" / "config.json").write_text(json.dumps({**record, "steps_per_epoch": older}))
    with pytest.raises(MmkdError, match="cannot continue exactly"):
        train(TrainConfig(targets=store, run_dir=tmp_path / "r", resume=True, progress=False))


def test_a_crafted_pickle_in_state_pt_is_refused_without_running(tmp_path, store):
    train(
        TrainConfig(targets=store, depth=1, batch_size=8, steps=2, ckpt_every=2, run_dir=tmp_path / "r", progress=False)
    )
    ckpt = latest_checkpoint(tmp_path / "r")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"optimizer": Evil()}, ckpt / "state.pt")
    with pytest.raises(MmkdError, match="state.pt: refused"):
        train(TrainConfig(targets=store, run_dir=tmp_path / "r", resume=True, progress=False))
    assert not marker.exists()


def test_a_state_without_a_key_is_a_one_line_error(tmp_path, store):
    train(
        TrainConfig(targets=store, depth=1, batch_size=8, steps=2, ckpt_every=2, run_dir=tmp_path / "r", progress=False)
    )
    ckpt = latest_checkpoint(tmp_path / "r")
    state = torch.load(ckpt / "state.pt", weights_only=True)
    del state["scheduler"]
    torch.save(state, ckpt / "state.pt")
    res = CliRunner().invoke(app, ["--targets", str(store), "--run-dir", str(tmp_path / "r"), "--resume", "--quiet"])
    assert res.exit_code == 2 and "missing scheduler" in res.output and "state.pt" in res.output
    assert "Traceback" not in res.output


def test_leftover_tmp_checkpoints_are_removed_and_do_not_count(tmp_path):
    model = torch.nn.Linear(2, 2)
    state = {"optimizer": {}, "scheduler": {}, "step": 0, "rng": []}
    (tmp_path / "checkpoints" / "step_00000009.tmp").mkdir(parents=True)
    for step in (1, 2, 3):
        write_checkpoint(tmp_path, step, model, {**state, "step": step})
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == [f"step_{s:08d}" for s in (2, 3)][-KEEP:]
    assert read_checkpoint(latest_checkpoint(tmp_path), model)["step"] == 3


@pytest.mark.parametrize("kind", ["vit", "beit", "multimodal"])
def test_no_weight_decay_on_cls_position_and_relative_position_tables(kind):
    from mmkd_core.students import create_student

    if kind == "multimodal":
        student = create_student(
            "multimodal",
            init="random",
            pooled_dim=8,
            width=32,
            num_heads=2,
            text_num_heads=2,
            img_size=32,
            patch_size=16,
            vocab_size=50,
        )
        expect = {"cls_token", "pos_embed"}
    else:
        student = create_student(
            kind,
            depth=1,
            init="random",
            target_dim=32,
            pooled_dim=8,
            img_size=32,
            patch_size=16,
            embed_dim=32,
            num_heads=2,
        )
        expect = {"model.cls_token"} | ({"model.pos_embed"} if kind == "vit" else set())
    names = {id(p): n for n, p in student.named_parameters()}
    groups = param_groups(student, 0.05)
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    decay = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert expect <= no_decay and decay and not (decay & no_decay)
    if kind == "beit":
        tables = {n for n in names.values() if "relative_position_bias_table" in n}
        assert tables and tables <= no_decay
    assert all(p.ndim >= 2 for g in groups if g["weight_decay"] > 0 for p in g["params"])


@pytest.mark.parametrize(
    "task, message",
    [
        ("mrcp:x", "choose retrieval"),
        ("mrpc", "mrpc:PATH"),
        ("mrpc:/nonexistent/msr.txt", "does not exist"),
        ("retrieval", "scores image-caption students"),
    ],
)
def test_eval_options_fail_before_the_first_step(tmp_path, store, task, message):
    res = CliRunner().invoke(
        app,
        [
            "--targets",
            str(store),
            "--depth",
            "1",
            "--steps",
            "2",
            "--eval",
            task,
            "--run-dir",
            str(tmp_path / "r"),
            "--quiet",
        ],
    )
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output
    assert latest_checkpoint(tmp_path / "r") is None if (tmp_path / "r").exists() else True
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_a_run_stopped_before_its_first_checkpoint_starts_over_with_clean_metrics(tmp_path, store, monkeypatch):
    from mmkd.train.recipe import TrainRecipe

    real = TrainRecipe.train_step
    calls = []

    def stop_at_third(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    cfg = TrainConfig(
        targets=store,
        depth=1,
        batch_size=8,
        steps=4,
        ckpt_every=100,
        log_every=1,
        run_dir=tmp_path / "r",
        progress=False,
    )
    monkeypatch.setattr(TrainRecipe, "train_step", stop_at_third)
    with pytest.raises(MmkdError, match="interrupted at step 2"):
        train(cfg)
    monkeypatch.setattr(TrainRecipe, "train_step", real)
    assert latest_checkpoint(tmp_path / "r") is None
    train(cfg)  # nothing to resume: the same command starts over
    steps = [json.loads(line)["step"] for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
