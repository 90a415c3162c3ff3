"""Zero-shot evaluation over the benchmark registry (data/benchmarks/tasks/*.json).

    report = evaluate_suite(model, tokenizer, ["cifar10", "voc2007", "colour"], [Path("~/benchmarks")],
                            out_dir, overlap=overlap_keys)

Per task: find the data (registry.locate), open it in whatever layout it is in (sources.py), encode
the images in batches through a DataLoader, score them against a text classifier (cached per model
and task) and compute the paper's metric for that task. A task whose data is missing is reported as
"not available" with where it was looked for and how to obtain it; a task whose data is broken fails
alone with its reason. Outputs in out_dir: results.json, results.csv, summary.md, results.png.

With an overlap index (dedup's overlap.parquet: benchmark test keys that have a near copy in the
training data) each task is also scored on its Clean and Overlap subsets, as in the paper's §5.

Precision (``precision="auto"``): resolved once per call by ``clip.precision.resolve_precision``
(bf16 where the device multiplies bf16 natively and, on a CPU, a probe finds it faster; else fp32),
printed as one ``[eval] precision: ...`` line and recorded in results.json (``precision``,
``precision_reason``). Only the towers run under autocast: image and text features are upcast to
fp32 before normalisation, and the classifier (prompt averaging), the logits and every metric are
fp32. The classifier cache is keyed by the resolved precision too. In fp32 the computation is
CLIP_benchmark's (same transform, same fp32 operations), so its metrics are reproduced exactly.

Speed (what differs from a plain per-image loop; in fp32 none of it changes a metric -- only the
text trimming moves the classifier, by ~5e-8):

* images: the DataLoader's items are uint8 pixels after the PIL resize and crop; float conversion
  and normalisation run once per batch (``clip.transform.EvalPreprocess``, bit-identical to
  ``eval_transform``), in the DataLoader worker when there are workers.
* text: every prompt of a task in batches of 256, each batch cut to its longest prompt
  (``clip.zeroshot.encode_prompts``), instead of one full-context batch per class.
* on a CPU in reduced precision the image tower takes each batch in cache-sized slices
  (``CPU_SLICE_BYTES``: 32 images for ViT-B-32), ~20 % faster there than whole batches of 256.
* ``compile``: the vision transformer's blocks through ``torch.compile``, which fuses the
  elementwise work eager autocast leaves between the matrix products (ViT-B-32 bf16: +12-22 %). It
  costs 10-30 s of compilation per process, so ``None`` (auto) turns it on only for a
  reduced-precision CPU task whose image encoding is large enough to repay that
  (``COMPILE_AUTO_MIN_TFLOP``; see ``_want_compile``).
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from data.common.files import atomic_path, atomic_write, atomic_write_json
from data.eval import metrics as M
from data.eval.registry import describe_missing, get_task, locate
from data.eval.sources import BenchmarkDataError, TaskData, open_task_data
from data.eval.wds import load_wds_benchmark

STATUS_RAN, STATUS_MISSING, STATUS_FAILED = "ran", "not_available", "failed"
# compile=None compiles the ViT blocks when a task's image encoding exceeds this many TFLOPs. Measured
# on a 2-core AVX512-BF16 CPU: compiling ViT-B-32's block takes ~30 s cold (~10 s from inductor's
# disk cache, i.e. any later process on the machine) and then saves ~18 % of ~33 ms per image in
# bf16, so it pays from ~5,000 images (~45 TFLOPs) cold and ~1,700 warm. ImageNet's 50,000: ~440.
COMPILE_AUTO_MIN_TFLOP = 50.0
# CPU, reduced precision: the image tower runs on slices of each batch whose largest activation (the MLP's
# hidden layer, tokens x 4*width) stays within this many bytes, so it stays in cache between the two
# matmuls that touch it. ViT-B-32 in bf16 on 2 cores (AVX512-BF16): 33 images/s in slices of 32 vs
# 27 in one batch of 256 (64: 28, 128: 26). fp32 showed no such effect (6.0-6.6 for 16..256) and is
# left in whole batches: the same computation as CLIP_benchmark's. A GPU always gets the whole batch.
CPU_SLICE_BYTES = 10 * 2**20


# ----------------------------------------------------------------------------- the periodic check
def _batches(bench, preprocess, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    pixels, labels = [], []
    for image, label in bench:
        pixels.append(preprocess.image(image))
        labels.append(label)
        if len(pixels) == batch_size:
            yield preprocess.batch(torch.from_numpy(np.stack(pixels))), torch.tensor(labels)
            pixels, labels = [], []
    if pixels:
        yield preprocess.batch(torch.from_numpy(np.stack(pixels))), torch.tensor(labels)


def score_model(model, tokenizer, root: Path, *, context_length: int, batch_size: int = 256,
                device: str | None = None, precision: str = "fp32") -> dict:
    """Top-1/top-5 of an in-memory model on one small classification set in the wds layout (the
    trainer's periodic held-out check). ``precision``: the trainer's resolved one ("fp32", "bf16",
    "fp16"; "auto" is resolved here); the metrics are computed from fp32 logits either way."""
    from clip.transform import EvalPreprocess
    from clip.zeroshot import evaluate_zeroshot

    device = device or str(next(model.parameters()).device)
    bench = load_wds_benchmark(root)
    preprocess = EvalPreprocess(_unwrap(model).config.vision.image_size)
    return evaluate_zeroshot(
        model, tokenizer, bench.classnames, bench.templates, _batches(bench, preprocess, batch_size),
        context_length=context_length, device=device, precision=precision,
    )  # fmt: skip


def _unwrap(model):
    return getattr(model, "module", model)  # DistributedDataParallel -> CLIP


# ----------------------------------------------------------------------------- model loading
def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the weights (names, shapes, bytes): keys the classifier cache and the report."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode() + str(tuple(t.shape)).encode())
        # the tensor's own bytes through the buffer protocol: no copy (ViT-B-32: 350 MB less to move)
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def load_model_for_eval(ref: str | Path, device: str = "cpu") -> tuple[Any, Any, str]:
    """(model, tokenizer, label) from a directory (model.safetensors + config.json + a tokenizer:
    tokenizer.json or OpenAI's bpe_simple_vocab_16e6.txt.gz, see ``clip.tokenizer.load_tokenizer``)
    or an MLflow model URI (``models:/witclip@champion``, ``runs:/...``) of a witclip pyfunc."""
    from clip.checkpoint import load_model
    from clip.tokenizer import load_tokenizer

    ref = str(ref)
    directory = Path(ref)
    if "://" in ref or ref.startswith("models:/") or ref.startswith("runs:/"):
        import mlflow

        local = Path(mlflow.artifacts.download_artifacts(ref))
        found = [p.parent for p in local.rglob("model.safetensors")]
        if not found:
            raise FileNotFoundError(f"{ref}: no model.safetensors in the logged model")
        directory = found[0]
    if not (directory / "model.safetensors").is_file():
        raise FileNotFoundError(f"{directory}: expected a model directory with model.safetensors, config.json "
                                "and tokenizer.json or bpe_simple_vocab_16e6.txt.gz (a train stage output, "
                                "an imported checkpoint) or a models:/ URI")
    tokenizer = load_tokenizer(directory)  # first: a missing tokenizer fails before the weights load
    model = load_model(directory).to(device).eval()
    return model, tokenizer, ref


# ----------------------------------------------------------------------------- encoding
class _Pixels(Dataset):
    """(uint8 [H, W, 3] pixels after the PIL stage of the eval transform, target) per sample."""

    def __init__(self, base: Dataset, preprocess) -> None:
        self.base, self.preprocess = base, preprocess

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[np.ndarray, Any]:
        image, target = self.base[i]
        return self.preprocess.image(image), target


class _Collate:
    """Stacks a batch's pixels and runs the eval transform's tensor stage on the whole batch (in the
    DataLoader worker when there are workers); targets: a LongTensor, a stacked float array, or the
    list of caption lists. A class, not a closure, so it pickles into spawned workers."""

    def __init__(self, preprocess) -> None:
        self.preprocess = preprocess

    def __call__(self, batch: list[tuple[np.ndarray, Any]]) -> tuple[torch.Tensor, Any]:
        images = self.preprocess.batch(torch.from_numpy(np.stack([b[0] for b in batch])))
        targets = [b[1] for b in batch]
        if isinstance(targets[0], (int, np.integer)):
            return images, torch.tensor(targets, dtype=torch.long)
        if isinstance(targets[0], np.ndarray):
            return images, torch.from_numpy(np.stack(targets))
        return images, targets  # captions: a list of lists


def vit_flops_per_image(model) -> float:
    """Multiply-adds x 2 of one image through a ViT tower (patch embedding, blocks, projection), from
    its config; 0.0 for a ResNet tower. ViT-B-32: 8.7 GFLOP, as FlopCounterMode counts it."""
    v = model.config.vision
    if v.is_resnet:
        return 0.0
    w, tokens, hidden = v.width, v.grid_size**2 + 1, int(v.width * v.mlp_ratio)
    per_layer = 2 * tokens * (4 * w * w + 2 * w * hidden) + 4 * tokens * tokens * w
    return float(v.layers * per_layer + 2 * (tokens - 1) * 3 * v.patch_size**2 * w + 2 * w * model.config.embed_dim)


def _slice_size(model, precision: str, device: str, batch_size: int) -> int:
    """Images per image-tower call (``CPU_SLICE_BYTES``): a multiple of 8 where possible, at most
    ``batch_size``; the whole batch in fp32, on a GPU and for a ResNet tower."""
    v = model.config.vision
    if precision == "fp32" or torch.device(device).type != "cpu" or v.is_resnet:
        return batch_size
    hidden_bytes = (v.grid_size**2 + 1) * int(v.width * v.mlp_ratio) * 2  # one image's MLP activation, 16-bit
    fits = CPU_SLICE_BYTES // hidden_bytes  # ViT-B-32: 34, ViT-B-16: 8, ViT-L-14: 4, tiny: 602
    return max(1, min(batch_size, fits // 8 * 8 or fits))


def _want_compile(compile: bool | None, model, n_images: int, precision: str, device: str) -> bool:
    """``compile`` when given; for None (auto): reduced precision on a CPU, a ViT tower, and at least
    COMPILE_AUTO_MIN_TFLOP of image encoding in the task. fp32 is never compiled automatically:
    its results are meant to be CLIP_benchmark's to the last bit, and inductor's fusions reorder
    float operations. A GPU is left eager by auto: there eager bf16 encodes faster than compiling."""
    if compile is not None:
        return bool(compile)
    if precision == "fp32" or torch.device(device).type != "cpu":
        return False
    return n_images * vit_flops_per_image(model) >= COMPILE_AUTO_MIN_TFLOP * 1e12


def _compiled_vision(model) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The vision tower with each transformer block wrapped in ``torch.compile``, leaving ``model``
    untouched: the tower and its Transformer are shallow copies (same parameters) whose block list
    holds the compiled wrappers. The blocks share one compiled graph (same code, parameters passed as
    inputs), so compiling one block's shape serves all. None for a tower without ViT blocks."""
    visual = getattr(model, "visual", None)
    transformer = getattr(visual, "transformer", None)
    if transformer is None or not hasattr(transformer, "resblocks"):
        return None

    def shallow(module: torch.nn.Module) -> torch.nn.Module:
        clone = copy.copy(module)
        clone._modules = dict(module._modules)  # its own child table: replacing a child leaves the original
        return clone

    tower, body = shallow(visual), shallow(transformer)
    body.resblocks = torch.nn.ModuleList([torch.compile(block) for block in transformer.resblocks])
    tower.transformer = body
    return tower


def encode_images(model, data: TaskData, *, batch_size: int, num_workers: int, device: str,
                  progress: bool = True, precision: str = "fp32",
                  compile: bool | None = False) -> tuple[torch.Tensor, list]:
    """L2-normalised fp32 image features [N, D] (in dataset order) and the targets, batched.
    ``precision``: a resolved one; the tower runs under its autocast, features are upcast to fp32
    before normalising. ``compile``: see ``_want_compile``; a compiled tower serves only batches of
    the first batch's shape (a short last batch runs eagerly instead of compiling again), and a
    compilation that fails falls back to eager with one printed line. On a CPU in reduced precision
    each batch goes through the tower in slices (``_slice_size``)."""
    from tqdm import tqdm

    from clip.precision import autocast
    from clip.transform import EvalPreprocess

    preprocess = EvalPreprocess(model.config.vision.image_size)
    loader = DataLoader(_Pixels(data.dataset, preprocess), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, collate_fn=_Collate(preprocess), persistent_workers=False)
    compiled = _compiled_vision(model) if _want_compile(compile, model, len(data.dataset), precision, device) else None
    compiled_shape = None
    step = _slice_size(model, precision, device, batch_size)

    def tower(images: torch.Tensor) -> torch.Tensor:
        nonlocal compiled, compiled_shape
        if compiled is not None and compiled_shape in (None, images.shape):
            try:
                out = compiled(images)
                compiled_shape = images.shape
                return out
            except Exception as exc:  # noqa: BLE001 - no C compiler, an unsupported op...: eager still works
                print(f"[eval] torch.compile failed, encoding eagerly: {type(exc).__name__}: "
                      f"{str(exc).splitlines()[0] if str(exc) else ''}")
                compiled = None
        return model.encode_image(images)

    feats, targets = [], []
    # one autocast context for the whole loop: autocast caches its bf16 copies of the weights until
    # the context exits, so they are cast once per task rather than once per batch (ViT-B-32: 88 M
    # parameters, ~5 % of a 64-image batch). no_grad, not inference_mode: autocast's cache only takes
    # weights that require grad, which inference mode hides from it (it re-casts them every batch).
    with torch.no_grad(), autocast(precision, device):
        for images, target in tqdm(loader, desc=data.task, unit="batch", disable=not progress, leave=False):
            images = images.to(device, non_blocking=True)
            for start in range(0, images.shape[0], step):
                out = tower(images[start:start + step])
                feats.append(F.normalize(out.float(), dim=-1).cpu())  # fp32 before normalising
            targets.append(target)
    return torch.cat(feats), targets


def encode_texts(model, tokenizer, texts: Sequence[str], device: str, batch_size: int = 256,
                 precision: str = "fp32") -> torch.Tensor:
    """[N, D] fp32 normalised caption embeddings, in order (``clip.zeroshot.encode_prompts``)."""
    from clip.zeroshot import encode_prompts

    return encode_prompts(model, tokenizer, texts, model.config.text.context_length, device, batch_size,
                          precision).cpu()


def classifier_for(model, tokenizer, classnames: Sequence[str], templates: Sequence[str], *, device: str,
                   model_fp: str, cache_dir: Path | None, precision: str = "fp32") -> torch.Tensor:
    """[D, C] fp32 zero-shot head, cached on disk per (model weights, class names, templates, precision)."""
    from clip.zeroshot import build_classifier

    key = hashlib.sha256(json.dumps([model_fp, list(classnames), list(templates), precision]).encode()).hexdigest()[:32]
    path = cache_dir / f"classifier-{key}.pt" if cache_dir else None
    if path is not None and path.is_file():
        return torch.load(path, weights_only=True)
    head = build_classifier(model, tokenizer, classnames, templates, model.config.text.context_length, device,
                            precision=precision).cpu()
    if path is not None:
        with atomic_path(path) as tmp:  # a temp name per writer: two evals at once never share one
            torch.save(head, tmp)
    return head


# ----------------------------------------------------------------------------- scoring
def _headline(task, data: TaskData, logits: np.ndarray, targets: np.ndarray) -> tuple[str, dict[str, float], str]:
    """(metric actually used, metric values incl. 'value', note) for classification/multilabel."""
    note = ""
    if data.type == "multilabel":
        m = M.voc_map_11point(logits, targets) if task.metric == "map_11point" else M.average_precision(logits, targets).mean()
        return task.metric, {"value": float(m), "map_11point": float(m)}, note
    labels = targets.astype(np.int64)
    n_classes = logits.shape[1]
    out = {"acc1": M.topk_accuracy(logits, labels, 1), "acc5": M.topk_accuracy(logits, labels, min(5, n_classes)),
           "mean_per_class_recall": M.mean_per_class_recall(logits, labels, n_classes)}
    metric = task.metric
    if metric == "map_11point":
        metric, note = "acc1", ("single-label data (e.g. CLIP_benchmark's object crops): scored top-1, "
                                "not the paper's multi-label 11-point mAP")
    if metric == "roc_auc":
        if n_classes != 2:
            raise BenchmarkDataError(f"{task.name}: ROC AUC needs 2 classes, the data has {n_classes}")
        out["roc_auc"] = M.roc_auc(logits[:, 1] - logits[:, 0], labels)
    if metric == "mean_top1_top5":
        out["mean_top1_top5"] = M.mean_top1_top5(logits, labels)
    out["value"] = float(out[metric])
    return metric, {k: float(v) for k, v in out.items()}, note


def _subsets(task, data: TaskData, logits: np.ndarray, targets: np.ndarray, overlap: set[str] | None) -> dict:
    """All / Clean / Overlap: the task's metric on every sample, on those without and with a near copy in
    the training data."""
    if overlap is None:
        return {}
    in_overlap = np.array([k in overlap for k in data.keys], dtype=bool)
    out = {}
    for name, mask in (("all", np.ones_like(in_overlap)), ("clean", ~in_overlap), ("overlap", in_overlap)):
        n = int(mask.sum())
        value = math.nan
        if n:
            try:
                value = _headline(task, data, logits[mask], targets[mask])[1]["value"]
            except (ValueError, BenchmarkDataError):  # e.g. one class only in a tiny subset
                value = math.nan
        out[name] = {"n": n, "value": value}
    return out


def run_task(model, tokenizer, task, data: TaskData, *, batch_size: int, num_workers: int, device: str,
             model_fp: str, cache_dir: Path | None, overlap: set[str] | None, progress: bool = True,
             predictions: Path | None = None, precision: str = "fp32", compile: bool | None = False) -> dict:
    t0 = time.perf_counter()
    feats, target_batches = encode_images(model, data, batch_size=batch_size, num_workers=num_workers,
                                          device=device, progress=progress, precision=precision,
                                          compile=compile)
    if data.type == "retrieval":
        captions = [c for batch in target_batches for c in batch]
        texts, owner = [], []
        for i, caps in enumerate(captions):
            texts += caps
            owner += [i] * len(caps)
        text_feats = encode_texts(model, tokenizer, texts, device, precision=precision)
        sim = (feats @ text_feats.T).numpy()
        values = M.compute_metric("recall_at_k", similarity=sim, text_to_image=np.array(owner), ks=(1, 5, 10))
        if predictions is not None:
            _save(predictions, similarity=sim, text_to_image=np.array(owner), keys=np.array(data.keys))
        result = {"metric": "recall_at_k", "value": values["value"], "metrics": values,
                  "note": "value = mean of image and text retrieval recall@1, @5, @10", "n": len(captions),
                  "n_texts": len(texts)}
    else:
        head = classifier_for(model, tokenizer, data.classnames, data.templates, device=device,
                              model_fp=model_fp, cache_dir=cache_dir, precision=precision)
        logits = (100.0 * feats @ head).numpy()
        targets = np.concatenate([t.numpy() for t in target_batches])
        if data.type == "classification" and (targets.min() < 0 or targets.max() >= logits.shape[1]):
            raise BenchmarkDataError(f"{data.path}: labels span {targets.min()}..{targets.max()} but there "
                                     f"are {logits.shape[1]} classes")
        if predictions is not None:
            _save(predictions, logits=logits, targets=targets, keys=np.array(data.keys))
        metric, values, note = _headline(task, data, logits, targets)
        result = {"metric": metric, "value": values["value"], "metrics": values, "note": note,
                  "n": int(len(targets)), "classes": int(logits.shape[1]),
                  "chance": 1.0 / logits.shape[1] if data.type == "classification" else None,
                  "subsets": _subsets(task, data, logits, targets, overlap)}
    result["seconds"] = round(time.perf_counter() - t0, 2)
    result["images_per_s"] = round(len(data.dataset) / max(result["seconds"], 1e-9), 1)
    return result


def _save(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)


def evaluate_suite(
    model,
    tokenizer,
    task_names: Sequence[str],
    data_roots: Sequence[Path],
    out_dir: Path,
    *,
    model_label: str = "",
    overlap: dict[str, set[str]] | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str | None = None,
    cache_dir: Path | None = None,
    progress: bool = True,
    save_predictions: bool = False,
    precision: str = "auto",
    compile: bool | None = None,
) -> dict[str, Any]:
    """Run every task (missing and broken ones are reported, not raised); write the reports; return them.
    ``save_predictions``: also write out_dir/predictions/<task>.npz (logits and targets, or the
    image-text similarity matrix), e.g. to recompute a metric elsewhere. ``precision``: "auto",
    "fp32", "bf16" or "fp16", resolved once for ``device`` (module docstring). ``compile``: True /
    False, or None to let ``_want_compile`` decide per task."""
    from clip.precision import resolve_precision

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
    choice = resolve_precision(precision, device)
    print(f"[eval] precision: {choice}")
    model_fp = model_fingerprint(model)
    roots = [Path(r) for r in data_roots]
    tasks: dict[str, dict] = {}
    for name in task_names:
        task = get_task(name)
        entry: dict[str, Any] = {"title": task.title, "group": task.group, "type": task.type,
                                 "paper_metric": task.metric, "paper": dict(task.paper) if task.paper else None}
        location = locate(task, roots)
        if location is None:
            entry.update(status=STATUS_MISSING, message=describe_missing(task, roots))
            print(f"[eval] {name}: {entry['message']}")
            tasks[name] = entry
            continue
        try:
            data = open_task_data(task, location)
            entry.update(layout=data.layout, path=str(data.path), data_hash=data.fingerprint,
                         data_hash_kind=data.fingerprint_kind)
            entry.update(run_task(model, tokenizer, task, data, batch_size=batch_size, num_workers=num_workers,
                                  device=device, model_fp=model_fp, cache_dir=cache_dir,
                                  overlap=(overlap or {}).get(name) if overlap is not None else None,
                                  progress=progress, precision=choice.precision, compile=compile,
                                  predictions=Path(out_dir) / "predictions" / f"{name}.npz" if save_predictions else None))
            entry["status"] = STATUS_RAN
            print(f"[eval] {name}: {entry['metric']} {entry['value']:.4f} on {entry['n']} samples "
                  f"({entry['images_per_s']:.0f} images/s)")
        except Exception as exc:  # noqa: BLE001 - one broken task must not stop the others
            message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            entry.update(status=STATUS_FAILED, message=message)
            print(f"[eval] {name}: FAILED {message}")
        tasks[name] = entry
    ran = {n: t for n, t in tasks.items() if t["status"] == STATUS_RAN}
    report = {
        "model": model_label,
        "model_hash": model_fp,
        "precision": choice.precision,
        "precision_reason": choice.reason,
        "tasks": tasks,
        "tasks_ran": len(ran),
        "tasks_total": len(tasks),
        "tasks_failed": sum(t["status"] == STATUS_FAILED for t in tasks.values()),
        "tasks_missing": sum(t["status"] == STATUS_MISSING for t in tasks.values()),
        "mean_score": float(np.mean([t["value"] for t in ran.values()])) if ran else math.nan,
        "data_roots": [str(r) for r in roots],
    }
    write_reports(report, Path(out_dir))
    return report


# ----------------------------------------------------------------------------- reports
def write_reports(report: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "results.json", out_dir / "results.csv", out_dir / "summary.md", out_dir / "results.png"]
    atomic_write_json(paths[0], report, default=float)
    table = io.StringIO(newline="")
    w = csv.writer(table)
    w.writerow(["task", "status", "metric", "value", "n", "clean", "overlap", "n_overlap", "data_hash", "message"])
    for name, t in report["tasks"].items():
        sub = t.get("subsets") or {}
        w.writerow([name, t["status"], t.get("metric", t["paper_metric"]), _num(t.get("value")), t.get("n", ""),
                    _num(sub.get("clean", {}).get("value")), _num(sub.get("overlap", {}).get("value")),
                    sub.get("overlap", {}).get("n", ""), t.get("data_hash", ""), t.get("message", t.get("note", ""))])
    atomic_write(paths[1], table.getvalue())
    lines = ["# Zero-shot results", "", f"Model: `{report['model']}` (weights sha256 {report['model_hash'][:12]})", "",
             f"Precision: {report.get('precision', 'fp32')} ({report.get('precision_reason', '')})", "",
             f"**{report['tasks_ran']} of {report['tasks_total']} tasks ran** ({report['tasks_missing']} not "
             f"available, {report['tasks_failed']} failed). Mean over the tasks that ran: "
             f"{_pct(report['mean_score'])}.", "",
             "| task | metric | score | n | chance | clean | overlap (n) | status |", "|---|---|---|---|---|---|---|---|"]
    for name, t in report["tasks"].items():
        sub = t.get("subsets") or {}
        ov = sub.get("overlap", {})
        lines.append(f"| {t['title']} | {t.get('metric', t['paper_metric'])} | {_pct(t.get('value'))} | {t.get('n', '')} | "
                     f"{_pct(t.get('chance'))} | {_pct(sub.get('clean', {}).get('value'))} | "
                     f"{_pct(ov.get('value'))} ({ov.get('n', '')}) | {t['status']} |")
    notes = [f"- {report['tasks'][n]['title']}: {t.get('message') or t.get('note')}"
             for n, t in report["tasks"].items() if t.get("message") or t.get("note")]
    if notes:
        lines += ["", "Notes:", *notes]
    atomic_write(paths[2], "\n".join(lines) + "\n")
    _bar_chart(report, paths[3])
    return paths


def _bar_chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ran = [(t["title"], 100 * t["value"]) for t in report["tasks"].values() if t["status"] == STATUS_RAN]
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(ran) + 2), 3.5))
    if ran:
        ax.bar([n for n, _ in ran], [v for _, v in ran], color="#4c72b0")
        ax.tick_params(axis="x", rotation=60)
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"zero-shot: {report['tasks_ran']} of {report['tasks_total']} tasks ran")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def _num(v: Any) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.6f}"


def _pct(v: Any) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}%"


def read_overlap(path: Path) -> dict[str, set[str]] | None:
    """dedup's overlap.parquet -> {benchmark: test keys with a near copy in the training data}."""
    import pandas as pd

    if not Path(path).is_file():
        return None
    df = pd.read_parquet(path)
    return {str(b): set(map(str, g["test_key"])) for b, g in df.groupby("benchmark")}
