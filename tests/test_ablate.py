"""mmkd-ablate: a grid of students from one store, the teacher and each init scored beside them, resumable."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import WORDS, save_tiny_bert
from typer.testing import CliRunner

from mmkd.ablate import AblateConfig, ablate, jobs, parse_vary
from mmkd.ablate.cli import app
from mmkd.ablate.grid import run_name
from mmkd.ablate.report import (
    Table,
    build_rows,
    gap_closed,
    mean_spread,
    of_teacher,
    passes_sentence,
)
from mmkd.evaluate import evaluate_run
from mmkd.extract.config import ExtractConfig
from mmkd.extract.run import extract
from mmkd_core.errors import MmkdError
from mmkd_core.store import open_store

# the same two-by-two grid on the command line and in a file: loss (a value with commas: | separates) x init
VARY = ["loss=token_mse=1|token_mse=1,pooled_mse=1", "init=teacher,random"]
TRAIN = ["--steps", "2", "--batch-size", "16", "--depth", "1", "--ckpt-every", "1", "--lr", "1e-2"]
RUNS = {
    "init=teacher,loss=token_mse=1,seed=0",
    "init=random,loss=token_mse=1,seed=0",
    "init=teacher,loss=token_mse=1+pooled_mse=1,seed=0",
    "init=random,loss=token_mse=1+pooled_mse=1,seed=0",
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablate_store")
    bert = save_tiny_bert(root / "bert", layers=2)
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(WORDS, size=rng.integers(3, 10))) for _ in range(48)]
    (root / "s.txt").write_text("\n".join(lines) + "\n")
    out = root / "t.zarr"
    extract(
        ExtractConfig(
            teacher="bert",
            weights=str(bert),
            dataset="text",
            data_root=str(root / "s.txt"),
            out=out,
            dtype="float32",
            chunk_size=8,
            shard_size=16,
        ),
        show_progress=False,
    )
    return out


@pytest.fixture(scope="module")
def mrpc(tmp_path_factory):
    """MRPC's format, train and dev split; a pair's sentences share half their words, so models differ."""
    root = tmp_path_factory.mktemp("ablate_mrpc")
    rng = np.random.default_rng(1)
    header = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"
    rows = []
    for i in range(40):
        a = list(rng.choice(WORDS, size=6))
        b = [w if rng.random() < 0.5 else str(rng.choice(WORDS)) for w in a]
        rng.shuffle(b)
        rows.append(f"1\t{i}\t{i + 100}\t{' '.join(a)}\t{' '.join(b)}")
    (root / "msr_paraphrase_train.txt").write_text("\n".join([header, *rows[:24]]) + "\n")
    (root / "dev.tsv").write_text("\n".join([header, *rows[24:]]) + "\n")
    return root


def _cfg(store, mrpc, out, vary=VARY, train=TRAIN, **kw):
    return AblateConfig(
        targets=store,
        out=out,
        grid=parse_vary(vary),
        train_args=list(train),
        eval=[f"mrpc:{mrpc}"],
        progress=False,
        **kw,
    )


@pytest.fixture(scope="module")
def full(store, mrpc, tmp_path_factory):
    """The uninterrupted ablation."""
    out = tmp_path_factory.mktemp("ablate_full") / "abl"
    table = ablate(_cfg(store, mrpc, out))
    return out, table


def _table(out: Path) -> dict:
    """ablation.json without what is measured (times) or depends on how the ablation ran (resumed)."""
    data = json.loads((out / "ablation.json").read_text())
    for row in data["rows"]:
        row.pop("seconds"), row.pop("resumed")
    data.pop("directories"), data["teacher_passes"].pop("extract_seconds")
    for k in ("online_seconds_estimated", "seconds_per_pass"):
        data["teacher_passes"].pop(k)
    return data


def _mtimes(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_mtime_ns for p in directory.rglob("*") if p.is_file()}


def test_every_combination_is_trained_once_in_a_directory_named_after_it(full, store):
    out, table = full
    assert {p.name for p in out.iterdir() if p.is_dir()} == RUNS | {"teacher", "init"}
    # the loss does not decide the init: two init students, not four
    assert {p.name for p in (out / "init").iterdir()} == {"init=teacher,seed=0", "init=random,seed=0"}
    for name in RUNS:
        run = out / name
        record = json.loads((run / "config.json").read_text())
        settings = dict(kv.split("=", 1) for kv in name.replace("+", ",").split(",loss=")[0].split(","))
        assert record["train"]["init"] == settings["init"] and record["steps"] == 2
        assert record["train"]["loss"] == name.split("loss=")[1].rsplit(",seed", 1)[0].replace("+", ",")
        assert record["train"]["targets"] == str(store.resolve())
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [2]  # trained once: its two steps, logged at the end
        assert (run / "student" / "mmkd_student.json").is_file() and (run / "eval.json").is_file()
    assert [r.kind for r in table.rows] == ["teacher", "init", "init", "run", "run", "run", "run"]
    md = (out / "ablation.md").read_text()
    assert "| teacher |" in md and "| init |" in md and "| trained |" in md
    assert (out / "ablation.png").stat().st_size > 0 and (out / "ablation.csv").read_text().startswith("model,")


def test_the_table_holds_ratio_and_gap_of_each_row(full, mrpc):
    out, _ = full
    data = json.loads((out / "ablation.json").read_text())

    def score(path):
        result = json.loads((path / "eval.json").read_text())["results"]["mrpc"]
        metrics = result["metrics"]
        assert len(metrics) == 8 and result["headline"] == pytest.approx(sum(metrics.values()) / 8)
        return result["headline"]

    teacher = score(out / "teacher")
    rows = {(r["kind"], r["name"]): r for r in data["rows"]}
    assert rows[("teacher", "teacher")]["of_teacher"] == [1.0]
    for name in RUNS:
        s = score(out / name)
        init = score(out / "init" / f"init={name.split(',')[0].split('=')[1]},seed=0")
        row = rows[("run", name.removesuffix(",seed=0"))]
        assert row["headlines"]["mrpc"] == [s]
        assert row["of_teacher"] == [pytest.approx(s / teacher)]
        assert row["gap_closed"] == [pytest.approx((s - init) / (teacher - init))]
    assert rows[("init", "init=random")]["gap_closed"] == [0.0]
    # the numbers of a run are those mmkd-train --eval gives it
    run = out / sorted(RUNS)[0]
    direct = evaluate_run(run, open_store(json.loads((run / "config.json").read_text())["train"]["targets"]).attrs,
                          [f"mrpc:{mrpc}"])  # fmt: skip
    assert json.loads((run / "eval.json").read_text())["results"]["mrpc"]["metrics"] == {
        k: v for k, v in direct.items() if k != "mean"
    }
    # the teacher's scores differ from the students': the tiny task tells models apart
    assert len({r["headlines"]["mrpc"][0] for r in data["rows"]}) > 1


def test_gap_and_ratio_by_hand(store, mrpc, tmp_path):
    assert gap_closed(0.5, 0.2, 0.8) == pytest.approx(0.5)  # not 0.5/0.8, nor (0.5-0.2)/0.8
    assert of_teacher(0.6, 0.8) == pytest.approx(0.75)
    assert math.isnan(gap_closed(0.5, 0.8, 0.8)) and math.isnan(of_teacher(0.5, None))
    # from an init above the teacher the gap is downwards: half-way back is 50 %, beyond the init negative
    assert gap_closed(0.95, 0.96, 0.94) == pytest.approx(0.5) and gap_closed(0.97, 0.96, 0.94) == pytest.approx(-0.5)
    assert mean_spread([0.5, 0.75]) == (pytest.approx(0.625), pytest.approx(0.25 / math.sqrt(2)))
    # two seeds: each against the init of its own seed. Seed 0: (0.5-0.2)/(0.8-0.2) = 0.5, seed 1:
    # (0.7-0.4)/(0.8-0.4) = 0.75, mean 0.625; the gap of the means, (0.6-0.3)/(0.8-0.3), would be 0.6
    found = jobs(_cfg(store, mrpc, tmp_path / "hand", vary=["init=teacher"], repeat=2))
    headline = {"teacher": 0.8, "init=teacher,seed=0": 0.2, "init=teacher,seed=1": 0.4}
    headline |= {"init=teacher,seed=0#run": 0.5, "init=teacher,seed=1#run": 0.7}

    def record(h):
        return {"results": {"mrpc": {"metrics": {"mrpc/train/s1_to_s2_r1": h}, "headline": h}}, "seconds": {}}

    records = {str(found.teacher.directory): record(0.8)}
    records |= {str(j.directory): record(headline[j.directory.name]) for j in found.inits}
    records |= {str(j.directory): record(headline[j.directory.name + "#run"]) for j in found.runs}
    teacher, init, run = build_rows(found, records)
    assert run.gap_closed == [pytest.approx(0.5), pytest.approx(0.75)]
    assert mean_spread(run.gap_closed)[0] == pytest.approx(0.625)
    assert run.of_teacher == [pytest.approx(0.625), pytest.approx(0.875)]
    assert init.of_teacher == [pytest.approx(0.25), pytest.approx(0.5)] and init.gap_closed == [0.0, 0.0]

    # an init at or above the teacher is named in the notes (its runs' gap is downwards); one below is not
    passes = {"samples": 8, "views": 1, "made": 8, "extract_seconds": None, "online": 16, "runs": 2}

    def notes(rows):
        return Table(rows, [], ["mrpc"], {"mrpc": "mean"}, [], passes, {}, 2).notes()

    assert not any("at or above the teacher" in line for line in notes([teacher, init, run]))
    records |= {str(j.directory): record(0.9) for j in found.inits}
    above = [line for line in notes(build_rows(found, records)) if "at or above the teacher" in line]
    assert above == [
        "init init=teacher scores 0.9000, at or above the teacher's 0.8000: for its runs the gap (of 0.1000) "
        "is the way back to the teacher's score."
    ]
    # a teacher that cannot do the task (a text teacher, image-text retrieval): no ratio, no gap, the reason kept
    records[str(found.teacher.directory)] = {"results": {"mrpc": {"error": "embeds text only"}}, "seconds": {}}
    teacher, _, run = build_rows(found, records)
    assert teacher.errors == {"mrpc": "embeds text only"} and all(
        math.isnan(v) for v in run.of_teacher + run.gap_closed
    )


def test_an_interrupted_ablation_continues_and_gives_the_same_table(full, store, mrpc, tmp_path, monkeypatch):
    out = tmp_path / "abl"
    # first part of the grid: its runs finish
    ablate(_cfg(store, mrpc, out, vary=["loss=token_mse=1", "init=teacher,random"]))
    before = {name: _mtimes(out / name) for name in ("init=teacher,loss=token_mse=1,seed=0", "init", "teacher")}
    # the whole grid, killed inside the first run it trains, after that run's first checkpoint
    from mmkd.train.recipe import TrainRecipe

    real = TrainRecipe.save_checkpoint

    def killed_after_first(recipe):
        real(recipe)
        raise KeyboardInterrupt

    monkeypatch.setattr(TrainRecipe, "save_checkpoint", killed_after_first)
    with pytest.raises(KeyboardInterrupt):
        ablate(_cfg(store, mrpc, out))
    monkeypatch.setattr(TrainRecipe, "save_checkpoint", real)
    stopped = out / "init=teacher,loss=token_mse=1+pooled_mse=1,seed=0"
    assert (stopped / "checkpoints" / "step_00000001").is_dir() and not (stopped / "eval.json").exists()
    ablate(_cfg(store, mrpc, out))
    # finished directories were not touched; the stopped run continued from its checkpoint
    assert {name: _mtimes(out / name) for name in before} == before
    assert json.loads((stopped / "eval.json").read_text())["resumed_from_step"] == 1
    assert _table(out) == _table(full[0])
    assert "*" in (out / "ablation.md").read_text()  # the resumed run's time is marked


def test_a_grid_file_in_yaml_and_finished_runs_are_skipped(full, store, mrpc, tmp_path):
    out, _ = full
    grid = tmp_path / "grid.yaml"
    grid.write_text("loss:\n  - token_mse=1\n  - token_mse=1,pooled_mse=1\ninit: [teacher, random]\n")
    before = _mtimes(out)
    expected = _table(out)
    args = ["--targets", str(store), "--out", str(out), "--grid", str(grid), "--eval", f"mrpc:{mrpc}", "--quiet"]
    result = CliRunner().invoke(app, [*args, "--", *TRAIN], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert result.output.count("finished before") == 7 and "of teacher" in result.output
    assert "Teacher passes: 48 (48 samples × 1 view, once, at extraction:" in result.output
    after = _mtimes(out)
    assert {k: v for k, v in after.items() if not k.startswith("ablation.")} == {
        k: v for k, v in before.items() if not k.startswith("ablation.")
    }
    assert _table(out) == expected


def test_teacher_passes_against_an_online_ablation(full, store):
    out, table = full
    p = table.passes
    # 48 samples x 1 view once; online: 4 runs x 2 steps x 16 samples
    assert (p["made"], p["online"], p["runs"]) == (48, 128, 4)
    recorded = open_store(store).group.attrs["mmkd_extract_seconds"]
    assert recorded > 0 and p["extract_seconds"] == recorded
    assert p["online_seconds_estimated"] == pytest.approx(128 * recorded / 48)
    assert "the cache saved 80 passes" in passes_sentence(p)
    assert "not recorded" in passes_sentence({**p, "extract_seconds": None, "online_seconds_estimated": None})
    # two runs of 16 samples each: fewer than the store's 48 passes, which pay off from the third such run
    short = passes_sentence({**p, "online": 32, "runs": 2, "online_seconds_estimated": 1.0})
    assert "the cache made 16 more; it pays off from 3 such runs on" in short


def _error_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


@pytest.mark.parametrize(
    "args,needles",
    [
        (["--vary", "dpeth=1,2"], ["unknown key 'dpeth'", "did you mean 'depth'?"]),
        (["--vary", "depth=0,1"], ["--vary depth=0", "--depth 0: must be at least 1"]),
        (["--vary", "loss=token_mes=1"], ["--vary loss=token_mes=1", "did you mean 'token_mse'?"]),
        (["--vary", "lr=fast"], ["--vary lr=fast", "--lr"]),
        (["--vary", "seed=1,2"], ["'seed' cannot be varied", "--repeat"]),
        (["--vary", "depth"], ["expected KEY=VALUE"]),
        (["--vary", "depth=1,1"], ["depth=1 is listed twice"]),
        (["--", "--stepz", "2"], ["after --", "No such option: --stepz"]),
        (["--", "--seed", "3"], ["after --: --seed", "--repeat"]),
        (["--", "--run-dir", "x"], ["after --: --run-dir"]),
        (["--vary", "depth=1,2", "--", "--depth", "1"], ["give it in one place"]),
        (["--steps", "2"], ["--steps is an mmkd-train option: give it after --"]),
        (["--cluster", "local"], ["--cluster 'local'", "local:N"]),
        (["--eval", "zero-shot:cifar11"], ["unknown dataset 'cifar11'", "did you mean 'cifar10'?"]),
        (["--eval", "retrieval"], ["a text student cannot be scored on image-text"]),
    ],
)
def test_mistakes_are_one_line_before_anything_runs(store, mrpc, tmp_path, args, needles):
    base = ["--targets", str(store), "--out", str(tmp_path / "abl")]
    if "--eval" not in args:
        base += ["--eval", f"mrpc:{mrpc}"]
    line = _error_line(CliRunner().invoke(app, [*base, *args]))
    assert all(n in line for n in needles), line
    assert not (tmp_path / "abl").exists()


def test_a_grid_file_with_an_unknown_key_is_one_line(store, mrpc, tmp_path):
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"depht": [1, 2]}))
    args = ["--targets", str(store), "--out", str(tmp_path / "abl"), "--grid", str(grid), "--eval", f"mrpc:{mrpc}"]
    line = _error_line(CliRunner().invoke(app, args))
    assert "unknown key 'depht'" in line and "did you mean 'depth'?" in line


def test_a_directory_made_with_other_settings_is_refused(full, store, mrpc):
    out, _ = full
    train = [*TRAIN[:1], "3", *TRAIN[2:]]  # --steps 3
    with pytest.raises(MmkdError, match=r"was made with other settings \(train.steps: 2 there, 3 now\)"):
        ablate(_cfg(store, mrpc, out, train=train))


def test_run_names_are_readable_and_unique():
    assert run_name({"depth": "3", "init": "teacher", "loss": "token_mse=1"}, 0) == (
        "depth=3,init=teacher,loss=token_mse=1,seed=0"
    )
    assert run_name({"b": "1", "a": "2"}) == "a=2,b=1"  # the order of --vary does not rename runs
    odd = [run_name({"init-weights": v}) for v in ("a/b.pt", "a_b.pt", "a+b", "a,b")]
    assert len(set(odd)) == 4 and odd[3] == "init-weights=a+b" and odd[0].startswith("init-weights=a_b.pt-")
    long = run_name({"loss": "token_mse=1," * 20})
    assert len(long) <= 100 and long != run_name({"loss": "token_mse=1," * 21})


def test_as_tasks_of_a_running_dask_scheduler(full, store, mrpc, tmp_path):
    """--scheduler ADDRESS: each job a task (here on an in-process worker with one thread, to stay fast)."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster:
        train = [*TRAIN, "--loss", "token_mse=1,pooled_mse=1"]
        address = cluster.scheduler_address
        cfg = _cfg(store, mrpc, tmp_path / "abl", vary=["init=teacher"], train=train, scheduler=address)
        table = ablate(cfg)
    assert [r.kind for r in table.rows] == ["teacher", "init", "run"]
    # the in-process run of the same settings scores the same
    ours = json.loads((tmp_path / "abl" / "init=teacher,seed=0" / "eval.json").read_text())["results"]
    theirs = full[0] / "init=teacher,loss=token_mse=1+pooled_mse=1,seed=0" / "eval.json"
    assert ours["mrpc"]["metrics"] == json.loads(theirs.read_text())["results"]["mrpc"]["metrics"]


@pytest.mark.slow
def test_on_a_local_dask_cluster_with_seeds(full, store, mrpc, tmp_path):
    """--cluster local:2: each run a task on one of two worker processes (one thread each); two seeds per row."""
    out = tmp_path / "abl"
    vary = ["loss=token_mse=1|token_mse=1,pooled_mse=1"]
    table = ablate(_cfg(store, mrpc, out, vary=vary, repeat=2, cluster="local:2"))
    assert {p.name for p in out.iterdir() if p.is_dir()} >= {
        f"loss={loss},seed={s}" for loss in ("token_mse=1", "token_mse=1+pooled_mse=1") for s in (0, 1)
    }
    assert [len(r.seeds) for r in table.rows] == [1, 2, 2, 2]
    assert "±" in (out / "ablation.md").read_text()
    # seed 0 in a worker process (one thread) scores what the in-process run of the same settings scored
    ours = json.loads((out / "loss=token_mse=1,seed=0" / "eval.json").read_text())["results"]
    theirs = json.loads((full[0] / "init=teacher,loss=token_mse=1,seed=0" / "eval.json").read_text())["results"]
    assert ours["mrpc"]["metrics"] == pytest.approx(theirs["mrpc"]["metrics"])


@pytest.mark.slow
def test_the_console_script_killed_after_its_first_run_continues(full, store, mrpc, tmp_path):
    out = tmp_path / "abl"
    args = ["--targets", str(store), "--out", str(out), "--eval", f"mrpc:{mrpc}", "--quiet"]
    args += [a for v in VARY for a in ("--vary", v)]
    cmd = [sys.executable, "-m", "mmkd.ablate.cli", *args, "--", *TRAIN]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    first = out / "init=teacher,loss=token_mse=1,seed=0" / "eval.json"
    deadline = time.monotonic() + 300
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, output
    assert "run the same command again to continue" in output and "Traceback" not in output
    done = {p.parent.name: _mtimes(p.parent) for p in out.glob("*/eval.json") if p.parent.name in RUNS}
    assert first.parent.name in done and len(done) < len(RUNS)
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert {name: _mtimes(out / name) for name in done} == done
    assert _table(out) == _table(full[0])


def test_help_shows_examples():
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "mmkd-ablate --targets" in result.output and "--vary" in result.output


def test_a_grid_file_that_is_a_list_is_the_union_of_its_grids(store, mrpc, tmp_path):
    """One factor at a time: a base run and variants of it, not their product; a run two entries give is
    planned once, and --vary applies to every entry."""
    from mmkd.ablate.grid import merge_grids, read_grid

    grid = tmp_path / "grid.yaml"
    grid.write_text("- {}\n- {loss: [token_mse=1, 'token_mse=1,pooled_mse=1']}\n- {init: random}\n- {init: teacher}\n")
    cfg = _cfg(store, mrpc, tmp_path / "abl", vary=[])
    cfg.grid = read_grid(grid)
    assert {j.directory.name for j in jobs(cfg).runs} == {
        "seed=0",
        "loss=token_mse=1,seed=0",
        "loss=token_mse=1+pooled_mse=1,seed=0",
        "init=random,seed=0",
        "init=teacher,seed=0",
    }  # the product of the entries would have 2 x 2 runs with both keys; {} is not given twice
    cfg.grid = merge_grids(parse_vary(["warmup=0.1,0.2"]), read_grid(grid))
    names = {j.directory.name for j in jobs(cfg).runs}
    assert len(names) == 10 and "init=random,warmup=0.2,seed=0" in names
    # trained and tabulated: ablation.json records the list
    grid.write_text("- {}\n- {init: random}\n")
    cfg.grid = read_grid(grid)
    table = ablate(cfg)
    assert [r.kind for r in table.rows] == ["teacher", "init", "init", "run", "run"]
    assert json.loads((tmp_path / "abl" / "ablation.json").read_text())["grid"] == [{}, {"init": ["random"]}]
    grid.write_text("- {loss: token_mse=1}\n- 3\n")
    with pytest.raises(MmkdError, match="--grid .*: expected a list of mappings of option names to values, found int"):
        read_grid(grid)


def test_an_entry_with_train_false_scores_its_inits_only(store, mrpc, tmp_path):
    """The free truncations of a teacher beside the distilled students: an entry marked ``train: false``
    builds, exports and scores its students at their initialisation and trains nothing."""
    from mmkd.ablate.grid import read_grid

    grid = tmp_path / "grid.yaml"
    grid.write_text(
        "- {train: false, student-option: [{init_blocks: first}, {init_blocks: last}]}\n"
        "- {student-option: {init_blocks: last}}\n"
    )
    cfg = _cfg(store, mrpc, tmp_path / "abl", vary=[])
    cfg.grid = read_grid(grid)
    found = jobs(cfg)
    assert [j.directory.name for j in found.runs] == ["student-option=init_blocks=last,seed=0"]
    assert sorted(j.directory.name for j in found.inits) == [
        "student-option=init_blocks=first,seed=0",
        "student-option=init_blocks=last,seed=0",
    ]
    table = ablate(cfg)
    assert [r.kind for r in table.rows] == ["teacher", "init", "init", "run"]
    out = tmp_path / "abl"
    assert (out / "init" / "student-option=init_blocks=first,seed=0" / "eval.json").is_file()
    assert not (out / "student-option=init_blocks=first,seed=0").exists()
    grid.write_text("- {train: [true, false]}\n")
    cfg.grid = read_grid(grid)
    with pytest.raises(MmkdError, match="train=true,false: give one value, true or false"):
        jobs(cfg)


def test_a_directory_stamped_before_the_teachers_option_is_still_this_ablations(full, store, mrpc):
    """Options added to mmkd-train later (--teachers, --teacher-weight) are left out of a directory's request
    at the values that train as before, so an ablation stamped by an earlier version continues."""
    out, _ = full
    found = jobs(_cfg(store, mrpc, out))
    for job in [*found.inits, *found.runs]:
        assert "teachers" not in job.request["train"] and "teacher_weights" not in job.request["train"]
        job.check_directory()  # the stamps of the full ablation hold no such keys either
