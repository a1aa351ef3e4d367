"""The console scripts' entry points. Each installs its interrupt handlers before anything heavy is imported
(torch, transformers, zarr and dask take a second or more), so Ctrl-C or SIGTERM at any instant ends as
the same one line as later in the run, with exit code 128 + the signal; the command's own handlers
(:func:`mmkd.app.cli.guarded`) take over once it starts."""

from __future__ import annotations

import importlib
import os
import signal
import sys

MESSAGE = "error: interrupted; run the same command again to continue\n"


def _interrupted(signum: int, frame: object) -> None:
    # nothing has been written yet: leave at once, without Python's teardown (which would print the
    # traceback of an import half done)
    try:
        os.write(2, MESSAGE.encode())
    finally:
        os._exit(128 + signum)


def _early_handlers() -> None:
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, _interrupted)


# each console script's function here -> the module whose ``main`` runs its command
STAGES = {
    "extract": "mmkd.extract.cli",
    "train": "mmkd.train.cli",
    "evaluate": "mmkd.evaluate.cli",
    "ablate": "mmkd.ablate.cli",
    "verify": "mmkd.extract.verify_cli",
}


def _run(stage: str) -> None:
    _early_handlers()
    main = importlib.import_module(STAGES[stage]).main
    if "LOCAL_RANK" not in os.environ:
        main()
        return
    # a torchrun rank: once the command has finished (its process group left, its files closed), leave without
    # Python's teardown, in which a library's native threads could abort the process ("terminate called without
    # an active exception") while the other ranks still exit, and torchrun would report a finished run as failed
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def extract() -> None:
    """``mmkd-extract``."""
    _run("extract")


def train() -> None:
    """``mmkd-train``."""
    _run("train")


def evaluate() -> None:
    """``mmkd-eval``."""
    _run("evaluate")


def ablate() -> None:
    """``mmkd-ablate``."""
    _run("ablate")


def verify() -> None:
    """``mmkd-verify``."""
    _run("verify")


if __name__ == "__main__":  # python -m mmkd.app.entry <stage> ...
    _run(sys.argv.pop(1) if len(sys.argv) > 1 else "")
