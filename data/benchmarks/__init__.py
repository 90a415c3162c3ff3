"""Zero-shot benchmarks: synthetic held-out sets and the CLIP_benchmark webdataset reader."""

from data.benchmarks.synthetic import (
    SYNTHETIC_BENCHMARKS,
    SyntheticBenchmark,
    build_synthetic_benchmark,
    build_synthetic_benchmarks,
)
from data.benchmarks.wds import WdsBenchmark, load_wds_benchmark

__all__ = [
    "SYNTHETIC_BENCHMARKS",
    "SyntheticBenchmark",
    "WdsBenchmark",
    "build_synthetic_benchmark",
    "build_synthetic_benchmarks",
    "load_wds_benchmark",
]
