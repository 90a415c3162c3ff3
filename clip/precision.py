"""Which numeric precision to run CLIP in on a device: chosen from the hardware and measured.

    choice = resolve_precision("auto", torch.device("cpu"))
    choice.precision   # "bf16" or "fp32"
    choice.reason      # one line saying why, for logs and MLflow

``auto`` picks bf16 autocast where the device multiplies bf16 matrices natively and fp32 elsewhere:

* CUDA: bf16 when ``torch.cuda.is_bf16_supported()`` (Ampere and later); fp16 is never chosen for
  the user (it needs a loss scaler and overflows where bf16 does not), only honoured when asked for.
* CPU: the CPU must report a bf16 matrix instruction set (AMX-BF16 or AVX512-BF16, as torch's
  own ``torch.cpu`` checks see it) *and* a short matmul probe on this process's threads must find
  bf16 at least ``MIN_PROBE_SPEEDUP`` times as fast as fp32. The flag alone is not enough: a CPU
  may report AVX512-BF16 and still run bf16 no faster (emulation, a VM without AMX state, a
  library built without the kernels). The probe runs once per process (~0.1 s) and is cached.

``WITCLIP_BF16_PROBE=slower`` (or ``faster``) forces the probe's answer without measuring: it
simulates a CPU without (or with) fast bf16, e.g. to check the fp32 fallback. Any other value is an
error.

Autocast only changes the matrix products inside the towers; callers keep losses, logits, the
temperature and metrics in fp32 (``clip.loss`` and ``clip.zeroshot`` upcast features first).
"""

from __future__ import annotations

import functools
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import ContextManager

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
MIN_PROBE_SPEEDUP = 1.3  # bf16 matmul throughput / fp32 needed to choose bf16 on a CPU
PROBE_SIZE = 1024  # square matmul: large enough to reach the kernels' steady speed, ~10 ms in fp32
PROBE_ENV = "WITCLIP_BF16_PROBE"


@dataclass(frozen=True)
class ProbeResult:
    """A CPU's bf16 vs fp32 matmul throughput (GFLOP/s), or a forced answer (``forced`` set)."""

    fp32_gflops: float
    bf16_gflops: float
    forced: str = ""

    @property
    def speedup(self) -> float:
        return self.bf16_gflops / self.fp32_gflops if self.fp32_gflops > 0 else 0.0

    @property
    def bf16_faster(self) -> bool:
        if self.forced:
            return self.forced == "faster"
        return self.speedup >= MIN_PROBE_SPEEDUP

    def describe(self) -> str:
        if self.forced:
            return f"probe forced by {PROBE_ENV}={self.forced}"
        return (f"probe: bf16 {self.bf16_gflops:.0f} vs fp32 {self.fp32_gflops:.0f} GFLOP/s "
                f"({self.speedup:.1f}x, needs {MIN_PROBE_SPEEDUP}x)")


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str  # "fp32" | "bf16" | "fp16"
    requested: str  # what the config or flag said ("auto", ...)
    reason: str

    def __str__(self) -> str:
        return f"{self.precision} ({self.reason})"


def cpu_bf16_instructions() -> list[str]:
    """The bf16 matrix instruction sets torch sees on this CPU: a subset of ['amx_bf16', 'avx512_bf16']."""
    found = []
    cpu = getattr(torch, "cpu", None)
    for name, check in (("amx_bf16", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported")):
        fn = getattr(cpu, check, None)
        try:
            if fn is not None and fn():
                found.append(name)
        except RuntimeError:  # a torch built without the CPU feature probes
            pass
    return found


def _matmul_gflops(dtype: torch.dtype, size: int, repeats: int) -> float:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=g).to(dtype)
    b = torch.randn(size, size, generator=g).to(dtype)
    with torch.no_grad():
        torch.mm(a, b)  # warm-up: first call picks and primes the kernel
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e9


def measure_matmul(size: int = PROBE_SIZE, repeats: int = 3) -> ProbeResult:
    """Best-of-``repeats`` square matmul throughput in fp32 and bf16 on the current torch threads."""
    return ProbeResult(fp32_gflops=_matmul_gflops(torch.float32, size, repeats),
                       bf16_gflops=_matmul_gflops(torch.bfloat16, size, repeats))


@functools.lru_cache(maxsize=1)
def cpu_bf16_probe() -> ProbeResult:
    """The process-wide probe: measured once, or forced by ``WITCLIP_BF16_PROBE``."""
    forced = os.environ.get(PROBE_ENV, "").strip().lower()
    if forced:
        if forced not in ("faster", "slower"):
            raise ValueError(f"{PROBE_ENV}={forced!r}: expected 'faster' or 'slower' (or unset to measure)")
        return ProbeResult(0.0, 0.0, forced=forced)
    return measure_matmul()


def resolve_precision(precision: str, device: torch.device | str) -> PrecisionChoice:
    """The precision to run in on ``device``; ``auto`` is decided as the module docstring says."""
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return PrecisionChoice(precision, precision, "as configured")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return PrecisionChoice("bf16", "auto", f"auto: {torch.cuda.get_device_name(device)} supports bf16")
        return PrecisionChoice("fp32", "auto", "auto: this GPU has no bf16 support")
    if device.type != "cpu":
        return PrecisionChoice("fp32", "auto", f"auto: no bf16 rule for device type {device.type!r}")
    instructions = cpu_bf16_instructions()
    probe = cpu_bf16_probe()
    if not instructions and not probe.forced:
        return PrecisionChoice("fp32", "auto", "auto: the CPU reports neither AMX-BF16 nor AVX512-BF16")
    has = ", ".join(instructions) or "no bf16 instructions"
    if probe.bf16_faster:
        return PrecisionChoice("bf16", "auto", f"auto: CPU has {has}; {probe.describe()}")
    return PrecisionChoice("fp32", "auto", f"auto: bf16 is not faster on this CPU ({has}; {probe.describe()})")


def autocast(precision: str, device: torch.device | str) -> ContextManager:
    """The autocast context for a resolved precision (a no-op for fp32)."""
    device = torch.device(device)
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
