"""mmkd-ablate moved to its own folder, ``mmkd.ablate``."""

from ..ablate.cli import app, main  # noqa: F401  # SHIM: remove at integration
