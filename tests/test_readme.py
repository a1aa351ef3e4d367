"""The README's and the docs pages' code works as written: their Python blocks run in a folder holding what
they name, every mmkd command in their shell blocks is accepted by that command's own options, and every
relative link resolves (the docs pages are each linked from the README)."""

import importlib
import re
import shlex
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import timm
import torch
import typer
from conftest import save_tiny_bert

from mmkd.app.entry import STAGES as STAGE_MODULES
from mmkd.extract.added import settle
from mmkd.extract.config import ExtractConfig
from mmkd.extract.run import extract
from mmkd.train.config import TrainConfig
from mmkd.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
STAGES = ("mmkd-extract", "mmkd-train", "mmkd-eval", "mmkd-ablate", "mmkd-verify")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def _name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def _blocks(language: str) -> list[tuple[str, str]]:
    """(``page:block number``, code) of every fenced block in that language, README first."""
    found = []
    for page in PAGES:
        code = [c for lang, c in FENCE.findall(page.read_text()) if lang == language]
        found += [(f"{_name(page)}:{i + 1}", c) for i, c in enumerate(code)]
    return found


PYTHON = _blocks("python")
SHELL = _blocks("bash")


# ------------------------------------------------------------------------------------------------ shape


def test_the_readme_is_a_front_door():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    shell = " ".join(c for lang, c in FENCE.findall(text) if lang == "bash")
    for stage in STAGES:
        assert re.search(rf"^{stage}\b", shell, re.M), f"the README has no worked {stage} example"
    assert any(page.startswith("README.md") for page, _ in PYTHON)


def test_ci_runs_the_second_setup_command():
    """.ci/run runs the line after ``# 2.``: it must stay the install-and-test command."""
    lines = README.read_text().splitlines()
    (i,) = [i for i, line in enumerate(lines) if re.match(r"# 2\.", line)]
    assert "python -m pytest" in lines[i + 1]


# ------------------------------------------------------------------------------------------------ links


def _outside_code(text: str) -> str:
    """The page without fenced blocks and inline code spans (their brackets are not links)."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def _anchors(page: Path) -> set[str]:
    """The anchors GitHub makes for a page's headings: lower case, punctuation dropped, spaces as hyphens,
    a repeated heading numbered."""
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6} +(.+?) *$", FENCE.sub("", page.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
        yield slug if seen[slug] == 0 else f"{slug}-{seen[slug]}"


def _links(page: Path) -> list[tuple[Path, str]]:
    """Every relative link of a page as (target file, anchor)."""
    out = []
    for target in re.findall(r"\]\(([^)\s]+)\)", _outside_code(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        out.append(((page.parent / path).resolve() if path else page, anchor))
    return out


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_relative_links_resolve(page):
    for target, anchor in _links(page):
        assert target.exists(), f"{_name(page)} links to {target}, which does not exist"
        if anchor:
            assert anchor in set(_anchors(target)), f"{_name(page)} links to #{anchor}, not a heading of {target.name}"


def test_every_docs_page_is_linked_from_the_readme():
    assert DOCS
    linked = {target for target, _ in _links(README)}
    assert [_name(p) for p in DOCS if p.resolve() not in linked] == []


# ------------------------------------------------------------------------------------------------ code


@pytest.fixture(scope="module")
def folder(tmp_path_factory, minilm):
    """The stores and runs the pages' blocks name, at toy size."""
    root = tmp_path_factory.mktemp("readme")
    q = dict(show_progress=False)
    extract(ExtractConfig(dataset_options={"count": 24}, out=root / "minilm-l6-shapes-train.zarr"), **q)
    bert = save_tiny_bert(root / "bert", layers=2)
    (root / "s.txt").write_text("the cat sat on the mat\na dog ran far\nred circle\nblue square at the top\n" * 4)
    extract(
        ExtractConfig(
            teacher="bert", weights=str(bert), dataset="text", data_root=str(root / "s.txt"), out=root / "wordnet.zarr"
        ),
        **q,
    )
    # docs/store.md reads a second teacher of wordnet.zarr, mpnet-base: here a tiny BERT under that name
    added = ExtractConfig(add_teacher="bert", teacher_name="mpnet-base", weights=str(bert), out=root / "wordnet.zarr")
    extract(settle(added, given={"add_teacher", "teacher_name", "weights", "out"}), **q)
    torch.manual_seed(0)
    beit = root / "beit.pth"
    torch.save({"model": timm.create_model("beitv2_base_patch16_224", num_classes=0, **TINY_VIT).state_dict()}, beit)
    extract(
        ExtractConfig(
            teacher="beitv2",
            weights=str(beit),
            teacher_options=TINY_VIT,
            dataset="shapes",
            dataset_options={"count": 8, "resolution": 32},
            out=root / "imagenet.zarr",
        ),
        **q,
    )
    mm = {"width": 32, "num_heads": 2, "text_num_heads": 2}
    for store, run, kw in [
        ("minilm-l6-shapes-train.zarr", "minilm-l6-shapes-train", {"student_options": mm}),
        ("wordnet.zarr", "wordnet", {"depth": 1}),
        # docs/train.md's student of both teachers (the first is listed by its registry name here, bert)
        ("wordnet.zarr", "both", {"depth": 1, "teachers": "bert,mpnet-base", "teacher_weights": {"mpnet-base": 2}}),
        ("imagenet.zarr", "imagenet", {"student": "beit", "init": "random", "depth": 1}),
    ]:
        train(
            TrainConfig(targets=root / store, run_dir=root / "runs" / run, steps=1, batch_size=4, progress=False, **kw)
        )
    return root


@pytest.mark.parametrize("where,code", PYTHON, ids=[where for where, _ in PYTHON])
def test_python_block_runs(folder, monkeypatch, where, code):
    monkeypatch.chdir(folder)
    exec(compile(code, f"{where} python block", "exec"), {})


def _stage_command(name: str):
    """The click command behind a console script: the typer app of the module its entry point names."""
    (ep,) = entry_points(group="console_scripts", name=name)
    module = STAGE_MODULES[ep.attr] if ep.module == "mmkd.app.entry" else ep.module  # the early-signal entry
    apps = [v for v in vars(importlib.import_module(module)).values() if isinstance(v, typer.Typer)]
    assert len(apps) == 1, f"{module} (the {name} entry point) should hold one typer app"
    return typer.main.get_command(apps[0])


def _invocations(code: str) -> list[tuple[str, list[str]]]:
    """Each mmkd command of a shell block with its arguments. Continued lines are joined, ``$(which
    mmkd-x)`` is ``mmkd-x``, a command is cut at ``&&``, ``;`` or ``|``, and a quoted argument that is itself
    a command (``sbatch --wrap '...'``) is read too."""
    code = re.sub(r"\$\(which (mmkd-\w+)\)", r"\1", code.replace("\\\n", " "))
    found = []
    for line in code.splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        words, current = list(lex), None
        for w in words:
            if w in STAGES and current is None:
                current = (w, [])
                found.append(current)
            elif re.fullmatch(r"[;&|()]+", w):
                current = None
            elif current is not None:
                current[1].append(w)
            if " " in w and w.split()[0] in STAGES:
                found += _invocations(w)
    return found


def _option_names(command) -> set[str]:
    return {o for p in command.params for o in (*p.opts, *p.secondary_opts)} | {"--help"}


def _check_names(stage: str, args: list[str], where: str) -> None:
    known = _option_names(_stage_command(stage))
    unknown = [a for a in args if a.startswith("-") and a not in ("-", "--") and a.split("=")[0] not in known]
    assert not unknown, f"{where}: {stage} has no option {unknown[0]}"


def _check(stage: str, args: list[str], where: str, capsys) -> None:
    """The command line as the command reads it: every name, value and ``--config`` file, nothing run.
    ``...`` stands for arguments left out, so such a line is checked for its option names only."""
    if stage == "mmkd-ablate" and "--" in args:
        i = args.index("--")
        args, train_args = args[:i], args[i + 1 :]
        _check_names("mmkd-train", train_args, where)
    if "..." in args:
        _check_names(stage, [a for a in args if a != "..."], where)
        return
    capsys.readouterr()
    try:
        _stage_command(stage).make_context(stage, list(args))
    except (SystemExit, Exception) as e:  # the command says why, then exits (typer.Exit)
        said = capsys.readouterr()
        pytest.fail(f"{where}: {stage} {shlex.join(args)}\n{(said.err + said.out).strip() or repr(e)}")


def test_the_pages_show_every_stage():
    stages = {stage for _, code in SHELL for stage, _ in _invocations(code)}
    assert stages == set(STAGES)


@pytest.mark.parametrize("where,code", SHELL, ids=[where for where, _ in SHELL])
def test_shell_block_commands_parse(folder, monkeypatch, capsys, where, code):
    """The folder holds what the commands name (``--config runs/wordnet/config.json``, ``--model runs/...``):
    the stores and runs the fixture made, and every run directory a page's ``--run-dir`` makes."""
    monkeypatch.chdir(folder)
    for _, c in SHELL:
        for stage, args in _invocations(c):
            for option, value in zip(args, args[1:], strict=False):
                if stage == "mmkd-train" and option == "--run-dir" and "://" not in value:
                    (folder / value).mkdir(parents=True, exist_ok=True)
    for stage, args in _invocations(code):
        _check(stage, args, where, capsys)
    for path in re.findall(r"(?<![\w/.])((?:benchmarks|scripts)/[\w./-]+)", code):
        assert (ROOT / path).exists(), f"{where} names {path}, which is not in the repository"
