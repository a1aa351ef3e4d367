"""Which reduced-precision compute dtypes this machine runs natively, and which one a teacher should use.

Two machines of one kind can differ underneath: on an AMD EPYC host with AVX2 only, bf16 autocast ran
MiniLM 7x *slower* than float32 (oneDNN emulates bf16 there), on a host with AMX 1.5x faster. So the
teacher's compute dtype comes from the hardware, never from a constant:

- CUDA: ``torch.cuda.is_bf16_supported()`` (Ampere and later). Without it float32: float16 would be native
  but its range overflows in some teachers (the store refuses non-finite targets), so it is never chosen
  automatically, only when asked for.
- CPU: a capability check first (oneDNN's own bf16 test, the /proc/cpuinfo flags ``amx_bf16`` /
  ``avx512_bf16``); where it says native, a short timed probe (the teacher's feed-forward matmul at its
  width, bf16 against float32, ~150 ms) confirms it. bf16 is chosen only when the probe finds it at
  least ``PROBE_THRESHOLD`` times faster (why that value: beside it).
- Anything else (mps, xla): float32 (``auto`` never picks float16, for the reason above).

The probe's answer is kept per process and (device, width): every run in one process agrees.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path

import torch

# bf16 must beat float32 by this factor in the probe's kernel. Native bf16 runs the kernel about 2x faster
# or more (this project's loaded 2-core AVX512-BF16 host: 1.3-5x between probes, median ~2.2, giving MiniLM's
# whole forward pass 1.3-2.0x); emulated bf16 runs it several times slower (MiniLM: 7x slower overall). 1.2
# sits well inside that gap, so timing noise on a shared machine does not flip the answer between two runs,
# and under it what is left for the forward pass (autocast casts the weights at every call; softmax, norms
# and the float32 target math do not speed up) would not pay for bf16's small loss of precision.
PROBE_THRESHOLD = 1.2
PROBE_REPEATS = 5
PROBE_FLOPS = 1.5e8  # per product: a few ms in float32 on 2 current cores, ~150 ms the whole probe
PROBE_ROWS = (128, 2048)  # tokens per product: at least a small batch's, at most a large one's


@dataclass(frozen=True)
class Choice:
    """A resolved compute dtype and why it was chosen.

    Attributes:
        autocast: ``none`` (float32), ``bfloat16`` or ``float16``: what the store records.
        reason: One short phrase for the run's summary, e.g. ``auto: avx512_bf16, probe 1.5x``.
    """

    autocast: str
    reason: str

    def __str__(self) -> str:
        name = "float32" if self.autocast == "none" else self.autocast
        return f"{name} ({self.reason})" if self.reason else name


def cpu_flags() -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none: macOS, Windows)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def native_dtypes(device: str | torch.device) -> tuple[set[str], str]:
    """The reduced-precision autocast dtypes ``device`` runs natively, and the evidence in a few words.

    Returns:
        ({"bfloat16", "float16"} or a subset, evidence such as ``avx512_bf16`` or ``avx2 only``).
    """
    kind = torch.device(device).type
    if kind == "cuda" and not torch.cuda.is_available():  # a client without GPUs sending work to GPU workers
        return set(), "no CUDA device in this process"
    if kind == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        name = torch.cuda.get_device_name(torch.device(device))
        return ({"bfloat16", "float16"} if bf16 else {"float16"}), name
    if kind == "mps":  # Apple GPUs: float16 throughout, bfloat16 only on recent macOS
        return {"float16"}, kind
    if kind != "cpu":
        return set(), kind
    flags = cpu_flags()
    native = set()
    # oneDNN also says yes to AVX-512 without bf16 instructions, which it emulates: the flags decide
    # (oneDNN alone only where there are no flags to read)
    bf16_flags = [f for f in ("amx_bf16", "avx512_bf16", "bf16") if f in flags]  # bf16: Arm v8.6
    if _mkldnn("_is_mkldnn_bf16_supported") and (bf16_flags or not flags):
        native.add("bfloat16")
    fp16_flags = [f for f in ("amx_fp16", "avx512_fp16", "asimdhp") if f in flags]
    if _mkldnn("_is_mkldnn_fp16_supported") and (fp16_flags or not flags):
        native.add("float16")
    evidence = bf16_flags[:1] or fp16_flags[:1] or [f"{torch.backends.cpu.get_cpu_capability().lower()} only"]
    return native, evidence[0]


def _mkldnn(test: str) -> bool:
    """oneDNN's own answer (False where this torch has no oneDNN or no such test)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and getattr(torch.ops.mkldnn, test)())
    except (AttributeError, RuntimeError):
        return False


def probe_speedup(device: str | torch.device, width: int, dtype: torch.dtype = torch.bfloat16) -> float:
    """float32 time over ``dtype`` time of the teacher's feed-forward matmul at ``width``.

    (rows, width) @ (width, 4 width), rows for ~``PROBE_FLOPS`` per product (``PROBE_ROWS``): each dtype warmed
    up once, then timed ``PROBE_REPEATS`` times, interleaved, and the fastest kept (the least disturbed by
    other processes on a shared machine). The operands are cast beforehand: the probe times the kernel,
    which is what native and emulated hardware differ in (autocast's casts cost the same on both).
    """
    device = torch.device(device)
    rows = int(min(PROBE_ROWS[1], max(PROBE_ROWS[0], PROBE_FLOPS / (8 * width * width))))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, width, generator=gen).to(device)
    w = torch.randn(4 * width, width, generator=gen).to(device)
    operands = {torch.float32: (x, w), dtype: (x.to(dtype), w.to(dtype))}

    def once(d: torch.dtype) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        torch.nn.functional.linear(*operands[d])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    times: dict[torch.dtype, list[float]] = {torch.float32: [], dtype: []}
    with torch.inference_mode():
        once(torch.float32), once(dtype)
        for _ in range(PROBE_REPEATS):
            for d in times:
                times[d].append(once(d))
    return min(times[torch.float32]) / max(min(times[dtype]), 1e-9)


@functools.cache
def auto_autocast(device: str, width: int) -> Choice:
    """The teacher compute dtype ``--autocast auto`` resolves to on ``device`` for a teacher ``width`` wide."""
    kind = torch.device(device).type
    native, evidence = native_dtypes(device)
    if "bfloat16" not in native:
        return Choice("none", f"auto: {evidence}, no native bf16")
    if kind == "cuda":
        return Choice("bfloat16", f"auto: {evidence}")
    speedup = probe_speedup(device, max(int(width), 1))
    if speedup >= PROBE_THRESHOLD:
        return Choice("bfloat16", f"auto: {evidence}, probe {speedup:.1f}x")
    return Choice("none", f"auto: {evidence}, probe {speedup:.2f}x < {PROBE_THRESHOLD}x")


def emulation_warning(autocast: str, device: str) -> str | None:
    """One line when a forced compute dtype is not native on ``device`` (it runs, usually much slower)."""
    if autocast not in ("bfloat16", "float16"):
        return None
    native, evidence = native_dtypes(device)
    if autocast in native:
        return None
    return (
        f"--autocast {autocast}: {torch.device(device).type} here ({evidence}) has no native {autocast}; it is "
        "emulated and usually slower than float32 (--autocast auto picks what runs natively)"
    )
