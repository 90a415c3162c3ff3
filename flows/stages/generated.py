"""The benchmarks a run generates rather than downloads: the synthetic zero-shot sets (colour, shape,
count) rendered from `eval.seed`, which dedup decontaminates against and eval scores on, and the held-out
set of the trainer's periodic check (another seed, so it is neither trained on nor the final eval)."""

from __future__ import annotations

from pathlib import Path

from flows.stages.spec import StageContext

HELDOUT_BENCHMARK = "colour"  # the periodic mid-training check
HELDOUT_SAMPLES_PER_CLASS = 20


def synthetic_names(benchmarks: list[str]) -> list[str]:
    """The synthetic tasks among eval.benchmarks, in their order."""
    from data.eval.synthetic import SYNTHETIC_BENCHMARKS

    return [name for name in benchmarks if name in SYNTHETIC_BENCHMARKS]


def synthetic_benchmarks(ctx: StageContext) -> dict[str, Path]:
    """{name: root} of the synthetic tasks among eval.benchmarks, generated (idempotently) under
    <work_dir>/benchmarks from eval.seed at web.image_size."""
    from data.eval.synthetic import build_synthetic_benchmark

    e = ctx.cfg.eval
    return {
        name: build_synthetic_benchmark(name, ctx.work_dir / "benchmarks", seed=e.seed,
                                        samples_per_class=e.samples_per_class, image_size=ctx.cfg.web.image_size)
        for name in synthetic_names(e.benchmarks)
    }


def heldout_benchmark(ctx: StageContext) -> Path:
    """The periodic check's set: HELDOUT_BENCHMARK rendered from eval.seed + 1."""
    from data.eval.synthetic import build_synthetic_benchmark

    return build_synthetic_benchmark(HELDOUT_BENCHMARK, ctx.work_dir / "benchmarks" / "heldout",
                                     seed=ctx.cfg.eval.seed + 1, samples_per_class=HELDOUT_SAMPLES_PER_CLASS,
                                     image_size=ctx.cfg.web.image_size)
