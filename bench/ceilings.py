"""Matmul ceilings for the benchmarks: the best a square matmul reaches in bf16 and in fp32 on this
process's threads (``clip.precision.measure_matmul``), against which a benchmark sets its achieved FLOP/s.

    ceil = MatmulCeilings()       # measures once
    ...                           # timed work
    ceil.measure()                # again between phases: a busy moment only lowers a best-of,
    ceil.bf16, ceil.fp32          # so the highest measurement is the ceiling
    print(ceil.describe())
"""

from __future__ import annotations

from clip.precision import ProbeResult, measure_matmul


class MatmulCeilings:
    def __init__(self, size: int = 2048, repeats: int = 5) -> None:
        self.size, self.repeats = size, repeats
        self.samples: list[ProbeResult] = []
        self.measure()

    def measure(self) -> None:
        self.samples.append(measure_matmul(self.size, self.repeats))

    @property
    def bf16(self) -> float:
        return max(s.bf16_gflops for s in self.samples)

    @property
    def fp32(self) -> float:
        return max(s.fp32_gflops for s in self.samples)

    def describe(self) -> str:
        each = {k: ", ".join(f"{getattr(s, f'{k}_gflops'):.0f}" for s in self.samples) for k in ("bf16", "fp32")}
        return (f"matmul ceilings ({self.size}^2, best of {self.repeats}, highest of {len(self.samples)} "
                f"measurements): bf16 {self.bf16:.0f} GFLOP/s ({each['bf16']}), fp32 {self.fp32:.0f} GFLOP/s "
                f"({each['fp32']})")
