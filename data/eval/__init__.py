"""The eval stage: the benchmark registry as data (`registry.py`, `tasks/`, `classnames/`, `templates/`),
readers (`sources.py`, `wds.py`), metrics (`metrics.py`), the zero-shot suite (`suite.py`), the
generated synthetic benchmarks (`synthetic.py`) and the converter to the wds layout (`convert.py`)."""

from data.eval.synthetic import (
    SYNTHETIC_BENCHMARKS,
    SyntheticBenchmark,
    build_synthetic_benchmark,
    build_synthetic_benchmarks,
)
from data.eval.wds import WdsBenchmark, load_wds_benchmark

__all__ = [
    "SYNTHETIC_BENCHMARKS",
    "SyntheticBenchmark",
    "WdsBenchmark",
    "build_synthetic_benchmark",
    "build_synthetic_benchmarks",
    "load_wds_benchmark",
]
