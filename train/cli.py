"""`mmkd-train`: parse options, build a TrainConfig, call `train` (and the evaluation it asks for)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import typer

from mmkd.evaluate import RUN_TASKS
from mmkd_core.cli_utils import (
    Command,
    choice,
    choices,
    config_option,
    did_you_mean,
    guarded,
    parse_options,
    read_config,
    setup_logging,
)
from mmkd_core.errors import MmkdError
from mmkd_core.losses import LOSSES, parse_loss_spec
from mmkd_core.progress import console
from mmkd_core.teachers import TEACHERS

from .config import AUTOCAST, STUDENT_KINDS, TrainConfig
from .loop import train
from .report import report

INITS = ("teacher", "random", "data2vec2")
TOKEN_PREDS = ("recipe", "head")
# the registries' names as the options' choices: --help, completion and errors list the same names
Student = choices(STUDENT_KINDS)
Init = choices((*INITS, *TEACHERS.names()))
TokenPred = choices(TOKEN_PREDS)
Autocast = choices(AUTOCAST)

EXAMPLES = """Examples:

  mmkd-train --targets minilm-l6-shapes-train.zarr             # the embedded default: a multimodal student
  mmkd-train --targets wordnet.zarr --depth 3 --loss token_mse=1,pooled_mse=1 --eval mrpc:glue/MRPC
  mmkd-train --targets imagenet.zarr --student beit --depth 6 --data-root /data/imagenet --workers 2
  mmkd-train --targets wordnet.zarr --run-dir runs/wordnet --resume   # continue an interrupted run exactly
  mmkd-train --config runs/wordnet/config.json --run-dir runs/again   # a recorded run, repeated
  mmkd-train --nproc 2 --targets wordnet.zarr                       # DDP: 2 ranks on this machine"""

app = typer.Typer(help="Train a student from a target store; the teacher is never run.")


def _loss(value: str) -> str:
    """--loss: every term a registered loss (a near miss is named)."""
    for name in parse_loss_spec(value):
        if name not in LOSSES:
            known = LOSSES.names()
            raise MmkdError(f"--loss: unknown term {name!r}{did_you_mean(name, known)} (known: {', '.join(known)})")
    return value


def _eval_task(value: str) -> str:
    """--eval: the task's name checked here, for the near miss; TrainConfig checks the rest (paths)."""
    name = value.partition(":")[0]
    if name not in RUN_TASKS:
        raise MmkdError(
            f"--eval {value!r}: unknown task{did_you_mean(name, RUN_TASKS)} (choose retrieval, mrpc:PATH or qqp:PATH)"
        )
    return value


# TrainConfig fields (a recorded run's config.json) that are CLI options of another name
FROM_FIELDS = {"student_options": "student_option", "loss_options": "loss_option"}


def _from_record(data: dict[str, Any]) -> dict[str, Any]:
    """A config file's keys as options: a recorded run's ``config.json`` gives its ``train`` section (what it
    was run with, resolved) and its number of ranks; TrainConfig's field names read as their options."""
    if isinstance(data.get("train"), dict):
        data = {**data["train"], "nproc": data.get("world_size")}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name == "progress":  # the field behind --quiet
            out["quiet"] = None if value is None else not value
        else:
            out[FROM_FIELDS.get(name, key)] = value
    return out


@app.command(cls=Command, epilog=EXAMPLES)
@guarded
def main_command(
    ctx: typer.Context,
    config: Path = config_option(_from_record),
    targets: str = typer.Option(..., metavar="PATH|URL", help="Store written by mmkd-extract (a path or a URL)."),
    student: Student = typer.Option(
        "auto",
        parser=choice("--student", "student kind", STUDENT_KINDS),
        metavar="NAME",
        help=f"Student kind: {', '.join(STUDENT_KINDS)} (auto: from the store).",
    ),
    depth: int = typer.Option(None, help="Student depth (image tower for multimodal); default half the teacher's."),
    init: Init = typer.Option(
        None,
        parser=choice("--init", "init", INITS, TEACHERS),
        metavar="NAME",
        help="teacher (its first blocks; for text students evenly spaced ones ending at the top, see --student-option "
        "init_blocks), random, data2vec2 (fairseq's data2vec 2.0 image checkpoint in "
        "--init-weights: a post-norm data2vec2 student), or a teacher name whose checkpoint (--init-weights) "
        f"gives the blocks: {', '.join(TEACHERS.names())}. Default: teacher; random for multimodal.",
    ),
    init_weights: str = typer.Option(None, help="Checkpoint for --init <teacher name> or --init data2vec2."),
    init_image: str = typer.Option(
        None,
        metavar="NAME",
        help="Multimodal: seed the image tower from this image teacher's first blocks (teacher: the store's).",
    ),
    init_image_weights: str = typer.Option(None, help="Checkpoint for --init-image."),
    init_text: str = typer.Option(
        None,
        metavar="NAME",
        help="Multimodal: seed the text tower from this BERT-like teacher's first layers (it must read the "
        "captions' tokenizer).",
    ),
    init_text_weights: str = typer.Option(None, help="Checkpoint for --init-text."),
    freeze_embeddings: bool = typer.Option(False, help="Freeze token/position embeddings copied from the teacher."),
    token_pred: TokenPred = typer.Option(
        "recipe",
        parser=choice("--token-pred", "token prediction", TOKEN_PREDS),
        metavar="NAME",
        help="Student token prediction: recipe (own layers through the target recipe) or head (linear head on "
        "the last layer).",
    ),
    loss: str = typer.Option(
        None,
        parser=_loss,
        metavar="TERM=W,...",
        help=f"Loss terms with weights, e.g. token_mse=1,pooled_mse=1; terms: {', '.join(LOSSES.names())} "
        "(default per student: text pooled_cosine+contrastive_kd, image token_mse, multimodal contrastive_kd+itc).",
    ),
    loss_option: list[str] = typer.Option(None, help="Loss option KEY=VALUE, e.g. temperature=0.05."),
    bank_size: int = typer.Option(
        0, help="Memory bank: teacher targets of this many other samples per epoch as extra contrastive_kd negatives."
    ),
    student_option: list[str] = typer.Option(None, help="Student option KEY=VALUE, e.g. width=192."),
    batch_size: int = typer.Option(None, help="Samples per step (default 64; text and multimodal 128)."),
    lr: float = typer.Option(None, help="Peak learning rate (default 5e-4; text 2e-4; multimodal 1e-3)."),
    weight_decay: float = typer.Option(0.01, help="AdamW weight decay."),
    warmup: float = typer.Option(0.05, help="Warmup steps, or a fraction of all steps when < 1."),
    epochs: float = typer.Option(None, help="Passes over the store (default 1; multimodal 20)."),
    steps: int = typer.Option(None, help="Total steps (overrides --epochs)."),
    grad_clip: float = typer.Option(1.0, help="Max gradient norm (0: off)."),
    autocast: Autocast = typer.Option(
        "none",
        parser=choice("--autocast", "compute dtype", AUTOCAST),
        metavar="NAME",
        help=f"Student compute dtype: {', '.join(AUTOCAST)}.",
    ),
    workers: int = typer.Option(0, help="DataLoader processes."),
    nproc: int = typer.Option(
        1,
        help="Train with N DDP ranks on this machine (torchrun started for you); "
        "or launch `torchrun --nproc-per-node N $(which mmkd-train) ...` yourself.",
    ),
    seed: int = typer.Option(0, help="Seed of init, data order and views."),
    run_dir: Path = typer.Option(None, help="Output directory (default runs/<store name>)."),
    resume: bool = typer.Option(False, help="Continue the run in --run-dir from its last checkpoint."),
    ckpt_every: int = typer.Option(500, help="Checkpoint every N steps."),
    log_every: int = typer.Option(10, help="Log metrics every N steps."),
    data_root: str = typer.Option(
        None, help="Source data, for students that read images (default: where the store was extracted from)."
    ),
    device: str = typer.Option("cpu", help="torch device."),
    eval: list[str] = typer.Option(
        None,
        parser=_eval_task,
        metavar="TASK",
        help="Evaluate at the end: retrieval (image-text, held-out), mrpc:PATH, qqp:PATH (repeatable). "
        "Default: retrieval for image-caption stores.",
    ),
    verify_views: bool = typer.Option(
        False,
        help="Re-render every stored view and compare it with its checksum before training (default: a sample of 64).",
    ),
    quiet: bool = typer.Option(False, help="No progress bar."),
    verbose: bool = typer.Option(False, help="Log what happens."),
) -> None:
    """Train a student from cached targets."""
    setup_logging(verbose)
    if nproc > 1 and "WORLD_SIZE" not in os.environ:  # main() launches the ranks; only a library call lands here
        raise MmkdError("--nproc: start ranks through the mmkd-train command, or call it under torchrun")
    cfg = TrainConfig(
        targets=targets,
        student=student,
        depth=depth,
        student_options=parse_options(student_option, "--student-option"),
        init=init,
        init_weights=init_weights,
        init_image=init_image,
        init_image_weights=init_image_weights,
        init_text=init_text,
        init_text_weights=init_text_weights,
        freeze_embeddings=freeze_embeddings,
        token_pred=token_pred,
        loss=loss,
        loss_options=parse_options(loss_option, "--loss-option"),
        bank_size=bank_size,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        warmup=warmup,
        epochs=epochs,
        steps=steps,
        grad_clip=grad_clip,
        autocast=autocast,
        workers=workers,
        seed=seed,
        run_dir=run_dir,
        resume=resume,
        ckpt_every=ckpt_every,
        log_every=log_every,
        data_root=data_root,
        device=device,
        eval=list(eval or []),
        progress=not quiet,
        verify_views=verify_views,
    )
    result = train(cfg, given=_given(ctx))
    if result.rank == 0:
        report(cfg, result)


# CLI parameters whose TrainConfig field has another name
FIELDS = {"student_option": "student_options", "loss_option": "loss_options", "quiet": "progress"}


def _given(ctx: typer.Context) -> set[str]:
    """TrainConfig fields set on the command line or in its --config file (the file fills the command's
    default map): on --resume each must equal the run's recorded value."""
    # by name: typer may bring its own copy of click, whose ParameterSource is another enum
    given = ("COMMANDLINE", "DEFAULT_MAP")
    return {FIELDS.get(p, p) for p in ctx.params if getattr(ctx.get_parameter_source(p), "name", None) in given}


def _nproc(argv: list[str]) -> tuple[int, list[str]]:
    """``--nproc N`` taken out of the arguments: (N, the rest). Without it, N comes from the --config file
    (a recorded run's number of ranks), else 1."""
    n, rest, i, config = None, [], 0, None
    while i < len(argv):
        a = argv[i]
        if a in ("--nproc", "--config") and i + 1 < len(argv):
            if a == "--nproc":
                n = argv[i + 1]
            else:
                config = argv[i + 1]
                rest += argv[i : i + 2]
            i += 2
            continue
        if a.startswith("--nproc="):
            n = a.partition("=")[2]
        else:
            rest.append(a)
            if a.startswith("--config="):
                config = a.partition("=")[2]
        i += 1
    if n is None and config is not None:
        n = _from_record(read_config(Path(config))).get("nproc")
    try:
        return int(1 if n is None else n), rest
    except ValueError:
        raise MmkdError(f"--nproc {n!r}: expected a number of ranks") from None


def main() -> None:
    """The console script: with ``--nproc N`` (N > 1) it runs itself under torchrun with N ranks."""
    try:
        n, rest = _nproc(sys.argv[1:])
    except MmkdError as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False)
        raise SystemExit(2) from None
    if n > 1 and "WORLD_SIZE" not in os.environ:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(n),
            "-m",
            "mmkd.train.cli",
            *rest,
        ]
        os.execv(sys.executable, cmd)  # torchrun takes this process's place: signals reach it and its ranks
    app()


if __name__ == "__main__":
    main()
