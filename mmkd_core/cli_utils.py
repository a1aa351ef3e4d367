"""Moved to ``mmkd.app.cli``."""

from mmkd.app.cli import *  # noqa: F403  # SHIM: remove at integration
from mmkd.app.cli import CONTINUE_HINT, _fail, guarded, one_line  # noqa: F401  # SHIM: remove at integration
