"""Zero-shot evaluation of a trained model on benchmarks in the CLIP_benchmark webdataset layout."""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from data.benchmarks.synthetic import build_synthetic_benchmark
from data.benchmarks.wds import load_wds_benchmark


def _batches(bench, transform, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    images, labels = [], []
    for image, label in bench:
        images.append(transform(image))
        labels.append(label)
        if len(images) == batch_size:
            yield torch.stack(images), torch.tensor(labels)
            images, labels = [], []
    if images:
        yield torch.stack(images), torch.tensor(labels)


def score_model(model, tokenizer, root: Path, *, context_length: int, batch_size: int = 256,
                device: str | None = None) -> dict:
    """Zero-shot metrics of an in-memory model on one benchmark root (CLIP_benchmark layout)."""
    from clip.transform import eval_transform
    from clip.zeroshot import evaluate_zeroshot

    device = device or str(next(model.parameters()).device)
    bench = load_wds_benchmark(root)
    transform = eval_transform(model.config.vision.image_size)
    return evaluate_zeroshot(
        model, tokenizer, bench.classnames, bench.templates, _batches(bench, transform, batch_size),
        context_length=context_length, device=device,
    )  # fmt: skip


def evaluate_benchmarks(
    model_dir: Path, bench_roots: dict[str, Path], *, batch_size: int = 256, device: str | None = None
) -> dict[str, dict]:
    """Score the model saved in `model_dir` (model + tokenizer.json) on each benchmark; metrics per name."""
    from clip.checkpoint import load_model
    from clip.tokenizer import CaptionTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(model_dir).to(device)
    tokenizer = CaptionTokenizer.load(Path(model_dir) / "tokenizer.json")
    results: dict[str, dict] = {}
    for name, root in bench_roots.items():
        t0 = time.perf_counter()
        metrics = score_model(model, tokenizer, root, context_length=model.config.text.context_length,
                              batch_size=batch_size, device=device)
        info_path = Path(root) / "dataset_info.json"
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        n_classes = len(load_wds_benchmark(root).classnames)
        metrics.update(
            classes=n_classes,
            chance=1.0 / n_classes,
            seconds=round(time.perf_counter() - t0, 2),
            dataset=str(root),
            generator_seed=info.get("seed"),
        )
        results[name] = metrics
    return results


def evaluate_synthetic(
    train_dir: Path,
    bench_dir: Path,
    out_dir: Path,
    *,
    benchmarks: list[str],
    samples_per_class: int,
    image_size: int,
    seed: int,
    batch_size: int = 256,
) -> dict:
    """Generate the held-out synthetic benchmarks (never served), score the trained model, write reports."""
    roots = {
        name: build_synthetic_benchmark(
            name, bench_dir, seed=seed, samples_per_class=samples_per_class, image_size=image_size
        )
        for name in benchmarks
    }
    results = evaluate_benchmarks(train_dir, roots, batch_size=batch_size)
    mean_acc1 = sum(r["acc1"] for r in results.values()) / len(results)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"benchmarks": results, "mean_acc1": mean_acc1, "model_dir": str(train_dir)}
    (out_dir / "results.json").write_text(json.dumps(report, indent=2))
    with open(out_dir / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["benchmark", "classes", "n", "acc1", "chance", "mean_per_class_recall"])
        for name, r in results.items():
            w.writerow([name, r["classes"], r["n"], f"{r['acc1']:.4f}", f"{r['chance']:.4f}",
                        f"{r['mean_per_class_recall']:.4f}"])  # fmt: skip
    lines = ["# Zero-shot results", "", "| benchmark | classes | n | top-1 | chance |", "|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['classes']} | {r['n']} | {100 * r['acc1']:.1f}% | {100 * r['chance']:.1f}% |")
    lines += ["", f"Mean top-1: {100 * mean_acc1:.1f}%", ""]
    (out_dir / "summary.md").write_text("\n".join(lines))
    counts: dict = {"mean_acc1": mean_acc1}
    for name, r in results.items():
        counts[f"{name}_acc1"] = r["acc1"]
        counts[f"{name}_chance"] = r["chance"]
    return counts
