"""Moved to ``mmkd.extract.hardware`` (only extraction chooses a compute dtype from the hardware)."""

# SHIM: remove at integration
from mmkd.extract.hardware import (  # noqa: F401
    PROBE_THRESHOLD,
    Choice,
    auto_autocast,
    cpu_flags,
    emulation_warning,
    native_dtypes,
    probe_speedup,
)
