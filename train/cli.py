"""`mmkd-train`: parse options, build a TrainConfig, call `train` (and the evaluation it asks for)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer
from rich.table import Table

from mmkd_core.cli_utils import guarded, parse_options, setup_logging
from mmkd_core.errors import MmkdError
from mmkd_core.progress import console

from .config import TrainConfig
from .loop import train
from .report import final_report

app = typer.Typer(add_completion=False, help="Train a student from a target store; the teacher is never run.")


@app.command()
@guarded
def main_command(
    ctx: typer.Context,
    targets: Path = typer.Option(..., help="Store written by mmkd-extract."),
    student: str = typer.Option("auto", help="text, vit, beit, multimodal, or auto (from the store)."),
    depth: int = typer.Option(None, help="Student depth (image tower for multimodal); default half the teacher's."),
    init: str = typer.Option(
        None,
        help="random, teacher (its first blocks), or a teacher name whose checkpoint "
        "(--init-weights) gives the first blocks. Default: teacher; random for multimodal.",
    ),
    init_weights: str = typer.Option(None, help="Checkpoint for --init <teacher name>."),
    freeze_embeddings: bool = typer.Option(False, help="Freeze token/position embeddings copied from the teacher."),
    token_pred: str = typer.Option(
        "recipe",
        help="Student token prediction: recipe (own layers through the "
        "target recipe) or head (linear head on the last layer).",
    ),
    loss: str = typer.Option(
        None,
        help="Loss terms with weights, e.g. token_mse=1,pooled_mse=1 (default per "
        "student: text token_mse+pooled_mse, image token_mse, multimodal contrastive_kd+itc).",
    ),
    loss_option: list[str] = typer.Option(None, help="Loss option KEY=VALUE, e.g. temperature=0.05."),
    bank_size: int = typer.Option(
        0, help="Memory bank: teacher targets of this many other samples per epoch as extra contrastive_kd negatives."
    ),
    student_option: list[str] = typer.Option(None, help="Student option KEY=VALUE, e.g. width=192."),
    batch_size: int = typer.Option(None, help="Samples per step (default 64; multimodal 128)."),
    lr: float = typer.Option(None, help="Peak learning rate (default 5e-4; multimodal 1e-3)."),
    weight_decay: float = typer.Option(0.01, help="AdamW weight decay."),
    warmup: float = typer.Option(0.05, help="Warmup steps, or a fraction of all steps when < 1."),
    epochs: float = typer.Option(None, help="Passes over the store (default 1; multimodal 12)."),
    steps: int = typer.Option(None, help="Total steps (overrides --epochs)."),
    grad_clip: float = typer.Option(1.0, help="Max gradient norm (0: off)."),
    autocast: str = typer.Option("none", help="none or bfloat16."),
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
        help="Evaluate at the end: retrieval (image-text, held-out), "
        "mrpc:PATH, qqp:PATH. Default: retrieval for image-caption stores.",
    ),
    verify_views: bool = typer.Option(
        False,
        "--verify-views",
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
    if result.rank != 0:
        return
    table = Table(title=f"run {result.run_dir}", show_header=False)
    table.add_row("steps", f"{result.steps:,}")
    table.add_row("time", f"{result.seconds:.1f} s")
    table.add_row("final loss", f"{result.final_loss:.4f}")
    console.print(table)
    final_report(cfg, result)


# CLI parameters whose TrainConfig field has another name
FIELDS = {"student_option": "student_options", "loss_option": "loss_options", "quiet": "progress"}


def _given(ctx: typer.Context) -> set[str]:
    """TrainConfig fields set on the command line: on --resume each must equal the run's recorded value."""
    # by name: typer may bring its own copy of click, whose ParameterSource is another enum
    return {FIELDS.get(p, p) for p in ctx.params if getattr(ctx.get_parameter_source(p), "name", None) == "COMMANDLINE"}


def _nproc(argv: list[str]) -> tuple[int, list[str]]:
    """``--nproc N`` taken out of the arguments: (N, the rest)."""
    n, rest, i = 1, [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--nproc" and i + 1 < len(argv):
            n, i = argv[i + 1], i + 2
            continue
        if a.startswith("--nproc="):
            n = a.partition("=")[2]
        else:
            rest.append(a)
        i += 1
    try:
        return int(n), rest
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
