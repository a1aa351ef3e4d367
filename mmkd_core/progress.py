"""Moved to ``mmkd.app.progress``."""

from mmkd.app.progress import *  # noqa: F403  # SHIM: remove at integration
from mmkd.app.progress import console, progress_bar, silence_foreign_bars  # noqa: F401  # SHIM: remove at integration
