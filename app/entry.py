"""The console scripts' entry points. Each installs its interrupt handlers before anything heavy is imported
(torch, transformers, zarr and dask take a second or more), so Ctrl-C or SIGTERM at any instant ends as
the same one line as later in the run, with exit code 128 + the signal; the command's own handlers
(:func:`mmkd.app.cli.guarded`) take over once it starts."""

from __future__ import annotations

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


def extract() -> None:
    """``mmkd-extract``."""
    _early_handlers()
    from mmkd.extract.cli import main

    main()


def train() -> None:
    """``mmkd-train``."""
    _early_handlers()
    from mmkd.train.cli import main

    main()


def evaluate() -> None:
    """``mmkd-eval``."""
    _early_handlers()
    from mmkd.evaluate.cli import main

    main()


def ablate() -> None:
    """``mmkd-ablate``."""
    _early_handlers()
    from mmkd.ablate.cli import main

    main()


if __name__ == "__main__":  # python -m mmkd.app.entry <stage> ...
    stage = sys.argv.pop(1) if len(sys.argv) > 1 else ""
    {"extract": extract, "train": train, "eval": evaluate, "ablate": ablate}[stage]()
