"""Zero-shot evaluation speed on CPU: witclip's ``evaluate_suite`` vs CLIP_benchmark, each at its defaults.

    .venv/bin/python bench/eval.py                  # tiny: 3,000 images; ViT-B-32: 300 (~3 min idle)
    .venv/bin/python bench/eval.py --quick          # 600 + 120 images, fewer rounds: a smoke run
    .venv/bin/python bench/eval.py --workers 0,2    # comma-separated DataLoader worker counts (tiny)
    .venv/bin/python bench/eval.py --no-vit         # the tiny rows only
    .venv/bin/python bench/eval.py --compile        # also witclip with compile=True on ViT-B-32

(``make bench`` runs every script in bench/.)

Who runs how ("defaults" = what a user gets without asking for anything):

* witclip at its defaults: ``evaluate_suite(..., precision="auto")`` -- resolved by
  ``clip.precision.resolve_precision`` (bf16 autocast on a CPU with AVX512-BF16/AMX whose matmul
  probe finds bf16 faster, else fp32; the table says which and why), ``compile=None`` (auto:
  off at these sizes, see ``data.eval.suite.COMPILE_AUTO_MIN_TFLOP``).
  Batch 256 (``evaluate_suite``'s default).
* CLIP_benchmark at its defaults: ``metrics.zeroshot_classification.evaluate(..., amp=True)``, its
  default and its CLI's (``--no_amp`` turns it off): ``torch.autocast("cpu")``, whose CPU dtype is
  bf16, around the text tower, the image tower *and* its logits; batch 64, its CLI's
  ``--batch_size`` default (``--cb-batch-size``).
* the fp32 pair: ``precision="fp32"`` vs ``amp=False``, both at batch 256. Here the two must agree
  exactly: same transform, same batches, same fp32 operations, so acc1 / acc5 / mean per-class
  recall are compared with ``==``.

Workers: 0 on both sides (witclip's default; CLIP_benchmark's CLI default of 4 cannot read a
one-shard set, see below, and would oversubscribe a 2-core machine).

Data: the synthetic "colour" benchmark (6 classes, 7 prompt templates), JPEG at 64 px, written by
``data.eval.synthetic.build_synthetic_benchmark`` in CLIP_benchmark's webdataset layout
(``classnames.txt``, ``zeroshot_classification_templates.txt``, ``test/nshards.txt``, ``test/0.tar``
of ``<key>.jpg`` + ``<key>.cls``); both sides read the very same directory.

Models (both sides get the same object and the same tokenizer; CLIP_benchmark's tokenizer is
``lambda texts: tok(texts, context_length)``):

* ``tiny`` (64 px, 4+2 layers of width 128), its text tower sized for a BPE tokenizer trained
  (``clip.train_caption_tokenizer``) on the benchmark's prompts, then *fine-tuned for a few seconds*
  (``finetune``: 60 AdamW steps of 64 images, zero-shot classification on another rendering of the
  set, seed 1: top-1 ~0.35 where chance is 0.17) so that its predictions have margins: a random
  model's logits are so nearly tied that any rounding flips its top-1, which would make the
  bf16-vs-fp32 comparison meaningless.
* ``ViT-B-32`` with random weights (seed 0; ~88 M parameters, 77-token context), on 300 of the
  same 64 px images, so each one is upsampled to 224 px as MNIST's 28 px digits are for real users.
  Random weights: its top-1 differences between precisions are noise (near-tied logits) and are
  reported, not judged; its speed is what real ViT-B-32 weights get.

What is timed, per evaluation of the whole dataset, wall clock around the library's entry point
(classifier building included on both sides, nothing cached between evaluations):

* witclip: ``data.eval.suite.evaluate_suite(model, tok, ["colour"], [root], out_dir, ...)`` --
  precision resolution (the probe is measured once per process, in the untimed warm-up), registry
  lookup, opening and indexing the tar, the sha256 fingerprints of the weights and of the data, the
  text classifier (``cache_dir=None``: rebuilt every time), image encoding through a DataLoader, the
  metrics, and writing results.json/.csv/summary.md/results.png. Its own per-task figure
  (``images_per_s``: encoding + classifier + metrics only) is reported too.
* CLIP_benchmark: what its CLI does for a ``wds/`` dataset -- ``datasets.builder.build_dataset(
  "wds/colour", root=<dir>, transform=...)``, ``DataLoader(dataset.batched(batch_size),
  batch_size=None, num_workers=...)`` and ``zeroshot_classification.evaluate(model, dataloader,
  tokenizer, classnames, templates, "cpu", amp=...)``. clip_benchmark 1.6.2's ``accuracy`` helper
  ends in ``float()`` of a 1-element 1-d array, which NumPy >= 2.4 rejects, so when (and only when)
  it fails here it is swapped for an equivalent written here (same top-k definition, ``.item()``);
  the table says so when that happens.

Both use the same image transform (``clip.eval_transform(image_size)``, which witclip runs split in
two stages, bit-identically), worker count, ``torch.set_num_threads(cores)``;
tqdm bars are off on both sides. Within a round the order alternates (witclip, CLIP_benchmark,
CLIP_benchmark, witclip, ...) so machine noise hits both; images/s = images / wall seconds, median
over rounds. Rounds: tiny 3 to 6 at 0 workers (4 evaluations each: both pairs), 2 to 3 at each
further worker count (the default pair only); ViT-B-32 2 to 3 (the default pair; with ``--compile``
also the compile pair). Past a row's minimum, no round is begun that would end after that row's
share of ``--budget-s`` (240 s): tiny up to 45% of it, ViT-B-32 up to 97%.

``ratio`` (the headline) = witclip / CLIP_benchmark, both at their defaults, tiny, the first worker
count: medians of each side's rounds. ``ratio_paired`` = median over rounds of the ratio within a
round (the two evaluations run back to back, so slow phases of a shared machine cancel better);
``ratio_best`` = ratio of the fastest rounds. ``ratio_fp32`` = the same for the fp32 pair;
``vit_b_32_ratio`` for the ViT-B-32 row. On a busy machine these can disagree widely; the round
min..max column shows how noisy it was.

Ceilings, measured in the same run (before and after the rounds; the better of the two):
``clip.precision.measure_matmul(2048, 3)`` gives fp32 and bf16 square-matmul GFLOP/s on the same
threads. Image-encoding FLOPs per image come from ``torch.utils.flop_counter.FlopCounterMode`` on
one batch of 8. Two achieved rates are set against the ceilings: end to end (FLOPs x the
evaluation's images/s: everything else in the evaluation counts as lost time) and the image tower
alone (``encode_image`` on a random batch, best of 3, in witclip's resolved precision).

Correctness, first and untimed (it also warms up both code paths: imports, the probe, page cache):
in fp32 each side's own functions give its classifier and logits, which are compared directly, then
with the same classifier on both sides, and CLIP_benchmark's metric formulas are applied to
witclip's logits, so a metric difference can be traced to its cause. The timed rounds then check
that the metrics of each evaluation are stable across rounds and that the fp32 pair's are identical.

Workers: CLIP_benchmark's loader gives whole shards to DataLoader workers, and a worker left without
a shard raises "No samples found"; so for N > 1 workers both sides read a copy of the set re-split,
in order, into N shards (same samples, same bytes); with 0 workers both read the single shard.

The last line printed is one JSON object (``"bench": "eval"``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # CLIP_benchmark wraps its loops in tqdm; witclip gets progress=False
os.environ.setdefault("MPLBACKEND", "Agg")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import clip  # noqa: E402
from clip.precision import measure_matmul, resolve_precision  # noqa: E402

# CLIP_benchmark builds WebDataset(...) without shardshuffle; webdataset warns on every build
warnings.filterwarnings("ignore", message=r"WebDataset\(shardshuffle=\.\.\.\) is None")

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
DATASET = "colour"
IMAGE_SIZE = 64  # the JPEGs' size: tiny's input size; ViT-B-32 upsamples them to 224
METRICS = ("acc1", "acc5", "mean_per_class_recall")
SIDES = ("witclip", "clip_benchmark")
VIT = "ViT-B-32"

# samples per class (tiny, ViT-B-32); (min, max) rounds: tiny at the first worker count, tiny at each
# further one, ViT-B-32
PLAN = {"full": ((500, 50), (3, 6), (2, 3), (2, 3)), "quick": ((100, 20), (1, 2), (1, 1), (1, 1))}
BUDGET_S = 240.0
FINETUNE_STEPS = 60


# ----------------------------------------------------------------------------- setup
def _lines(path: Path) -> list[str]:
    return [s.strip() for s in path.read_text(encoding="utf-8").splitlines() if s.strip()]


def build_set(out_root: Path, samples_per_class: int, seed: int = 0) -> Path:
    from data.eval.synthetic import build_synthetic_benchmark

    return build_synthetic_benchmark(DATASET, out_root, seed, samples_per_class, IMAGE_SIZE)


def build_tokenizer(root: Path):
    classnames, templates = _lines(root / "classnames.txt"), _lines(root / "zeroshot_classification_templates.txt")
    return clip.train_caption_tokenizer([t.replace("{c}", c) for c in classnames for t in templates], 512)


def finetune(model, tok, train_root: Path, steps: int = FINETUNE_STEPS, seed: int = 1) -> tuple[float, float]:
    """``steps`` AdamW steps of zero-shot classification (cross-entropy of the image against the six
    class prompts, one random template each) on ``train_root``, a rendering of the set with another
    seed. Returns (first, last) loss. Only there to give the bench's model real margins."""
    from clip.transform import EvalPreprocess
    from data.eval.sources import WdsDataset

    ds = WdsDataset(train_root)
    classnames = _lines(train_root / "classnames.txt")
    templates = _lines(train_root / "zeroshot_classification_templates.txt")
    pre = EvalPreprocess(model.config.vision.image_size)
    images = pre.batch(torch.from_numpy(np.stack([pre.image(ds[i][0]) for i in range(len(ds))])))
    labels = torch.tensor([ds.target(i) for i in range(len(ds))])
    ctx = model.config.text.context_length
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(len(ds), (64,), generator=g)
        pick = torch.randint(len(templates), (len(classnames),), generator=g).tolist()
        text = F.normalize(model.encode_text(tok([templates[t].replace("{c}", c) for c, t in zip(classnames, pick)],
                                                 ctx)), dim=-1)
        image = F.normalize(model.encode_image(images[idx]), dim=-1)
        loss = F.cross_entropy(model.logit_scale.exp() * image @ text.T, labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.zero_grad(set_to_none=True)
    model.eval()
    return losses[0], losses[-1]


def reshard(src: Path, dst: Path, nshards: int) -> Path:
    """Copy the wds benchmark at `src` to `dst` with its samples split, in order, over `nshards` tars.
    CLIP_benchmark's loader hands whole shards to DataLoader workers (webdataset's split_by_worker)
    and a worker without a shard raises "No samples found", so N workers need >= N shards."""
    import shutil
    import tarfile

    dst.mkdir(parents=True)
    # dataset_info.json: the generator's "complete" marker, which witclip's registry requires of a synthetic set
    for name in ("classnames.txt", "zeroshot_classification_templates.txt", "dataset_info.json"):
        shutil.copyfile(src / name, dst / name)
    with tarfile.open(src / "test" / "0.tar") as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar if m.isfile()]
    keys = list(dict.fromkeys(m.name.partition(".")[0] for m, _ in members))
    per_shard = -(-len(keys) // nshards)
    shard_of = {k: i // per_shard for i, k in enumerate(keys)}
    (dst / "test").mkdir()
    tars = [tarfile.open(dst / "test" / f"{i}.tar", "w", format=tarfile.USTAR_FORMAT) for i in range(nshards)]
    for m, data in members:
        tars[shard_of[m.name.partition(".")[0]]].addfile(m, io.BytesIO(data))
    for t in tars:
        t.close()
    (dst / "test" / "nshards.txt").write_text(f"{nshards}\n")
    return dst


# ----------------------------------------------------------------------------- the two evaluations
def eval_witclip(model, tok, root: Path, out_dir: Path, *, batch_size: int, workers: int, precision: str = "auto",
                 compile: bool | None = None, save_predictions: bool = False) -> tuple[float, dict]:
    """(wall seconds, the task's entry of evaluate_suite's report, plus the report's precision)."""
    from data.eval.suite import evaluate_suite

    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # its "[eval] precision" and "[eval] colour" lines
        report = evaluate_suite(model, tok, [DATASET], [root.parent], out_dir, batch_size=batch_size,
                                num_workers=workers, device="cpu", cache_dir=None, progress=False,
                                save_predictions=save_predictions, precision=precision, compile=compile)
    dt = time.perf_counter() - t0
    entry = report["tasks"][DATASET]
    if entry.get("status") != "ran":
        raise RuntimeError(f"witclip's evaluate_suite did not run {DATASET}: {entry}")
    return dt, {**entry, "precision": report["precision"], "precision_reason": report["precision_reason"]}


def cb_dataloader(root: Path, transform, *, batch_size: int, workers: int):
    """CLIP_benchmark's dataset and loader for a wds/ dataset, built the way its CLI builds them."""
    from clip_benchmark.datasets.builder import build_dataset

    ds = build_dataset(f"wds/{DATASET}", root=str(root), transform=transform, split="test", download=False,
                       task="zeroshot_classification")
    loader = torch.utils.data.DataLoader(ds.batched(batch_size), batch_size=None, shuffle=False,
                                         num_workers=workers)
    return ds, loader


def _topk_accuracy(output: torch.Tensor, target: torch.Tensor, topk=(1,)) -> list[float]:
    """Fraction of rows whose target is among the k largest logits (torch.topk, largest first) -- the
    quantity clip_benchmark's ``accuracy`` computes, but turned into floats with ``.item()``."""
    top = output.topk(max(topk), dim=1, largest=True, sorted=True).indices
    hits = top == target.reshape(-1, 1)
    return [hits[:, :k].sum().item() / len(target) for k in topk]


def patch_clip_benchmark() -> str:
    """clip_benchmark 1.6.2's ``accuracy`` ends in ``float(<1-element 1-d ndarray>)``, which NumPy >= 2.4
    refuses (TypeError; deprecated since 1.25), so its ``evaluate`` cannot return on a set of >= 5
    classes. If that is so here, swap in ``_topk_accuracy`` (same definition); returns a note or ''."""
    from clip_benchmark.metrics import zeroshot_classification as zc

    try:
        zc.accuracy(torch.tensor([[0.0, 1.0]]), torch.tensor([1]), topk=(1,))
        return ""
    except TypeError as exc:
        zc.accuracy = _topk_accuracy
        return (f"clip_benchmark's metrics.zeroshot_classification.accuracy fails under NumPy {np.__version__} "
                f"({exc}); replaced by an equivalent that uses .item()")


def eval_clip_benchmark(model, tok, root: Path, *, batch_size: int = 64, workers: int = 0,
                        amp: bool = True) -> tuple[float, dict]:
    """(wall seconds, CLIP_benchmark's metrics dict). ``amp=True`` is its default, batch 64 its CLI's."""
    from clip_benchmark.metrics import zeroshot_classification

    ctx = model.config.text.context_length
    t0 = time.perf_counter()
    ds, loader = cb_dataloader(root, clip.eval_transform(model.config.vision.image_size),
                               batch_size=batch_size, workers=workers)
    metrics = zeroshot_classification.evaluate(model, loader, lambda texts: tok(texts, ctx), ds.classes,
                                               ds.templates, "cpu", amp=amp)
    return time.perf_counter() - t0, metrics


def _metrics(d: dict) -> dict[str, float]:
    return {k: float(d[k]) for k in METRICS}


# ----------------------------------------------------------------------------- the untimed cross-check
def cross_check(model, tok, root: Path, out_dir: Path, batch_size: int) -> dict:
    """In fp32, compare the two sides' intermediate results, each computed by that side's own
    functions: classifier, logits, labels, predictions; then isolate where logits differ (text side:
    prompt batching and trimming; image side: same classifier, different code path) and apply
    CLIP_benchmark's metric formulas to witclip's logits."""
    from clip_benchmark.metrics import zeroshot_classification as zc
    from sklearn.metrics import balanced_accuracy_score

    ctx = model.config.text.context_length
    _, entry = eval_witclip(model, tok, root, out_dir, batch_size=batch_size, workers=0, precision="fp32",
                            save_predictions=True)
    npz = np.load(out_dir / "predictions" / f"{DATASET}.npz")
    w_logits, w_targets = npz["logits"], npz["targets"]

    transform = clip.eval_transform(model.config.vision.image_size)
    ds, loader = cb_dataloader(root, transform, batch_size=batch_size, workers=0)
    tokfn = lambda texts: tok(texts, ctx)  # noqa: E731
    cb_head = zc.zero_shot_classifier(model, tokfn, ds.classes, ds.templates, "cpu", amp=False)
    cb_logits, cb_targets = (t.numpy() for t in zc.run_classification(model, cb_head, loader, "cpu", amp=False))
    w_head = clip.build_classifier(model, tok, ds.classes, ds.templates, ctx, "cpu")  # evaluate_suite's builder
    # CLIP_benchmark's image path with witclip's classifier: what is left is the image side
    _, loader = cb_dataloader(root, transform, batch_size=batch_size, workers=0)
    cb_logits_w_head = zc.run_classification(model, w_head, loader, "cpu", amp=False)[0].numpy()

    same_shape = w_logits.shape == cb_logits.shape

    def maxdiff(a, b) -> float | None:
        return float(np.abs(np.asarray(a) - np.asarray(b)).max()) if np.shape(a) == np.shape(b) else None

    out = {
        "classes_equal": list(ds.classes) == _lines(root / "classnames.txt"),
        "templates_equal": list(ds.templates) == _lines(root / "zeroshot_classification_templates.txt"),
        "targets_equal": same_shape and bool(np.array_equal(w_targets, cb_targets)),
        "classifier_max_abs_diff": maxdiff(w_head, cb_head),
        "logits_max_abs_diff": maxdiff(w_logits, cb_logits),
        "logits_bit_identical": same_shape and bool(np.array_equal(w_logits, cb_logits)),
        "logits_same_classifier_max_abs_diff": maxdiff(w_logits, cb_logits_w_head),
        "argmax_disagreements": int((w_logits.argmax(1) != cb_logits.argmax(1)).sum()) if same_shape else None,
    }
    acc1, acc5 = zc.accuracy(torch.from_numpy(w_logits), torch.from_numpy(w_targets.astype(np.int64)), topk=(1, 5))
    out["cb_formulas_on_witclip_logits"] = {
        "acc1": acc1, "acc5": acc5,
        "mean_per_class_recall": float(balanced_accuracy_score(w_targets, w_logits.argmax(1)))}
    out["witclip_reported"] = _metrics(entry["metrics"])
    top2 = np.sort(w_logits, axis=1)[:, -2:]  # exact ties: argmax and topk could order them differently
    out["top1_ties"] = int((top2[:, 0] == top2[:, 1]).sum())
    out["min_top1_margin"] = float((top2[:, 1] - top2[:, 0]).min())
    return out


# ----------------------------------------------------------------------------- ceilings
def flops_per_image(model) -> float:
    """Image-tower FLOPs per image, as FlopCounterMode counts one batch of 8 (fp32; the count does
    not depend on the dtype)."""
    from torch.utils.flop_counter import FlopCounterMode

    size = model.config.vision.image_size
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.encode_image(torch.randn(8, 3, size, size))
    return counter.get_total_flops() / 8


def tower_img_s(model, precision: str, batch: int, repeats: int = 3, compiled: bool = False) -> float:
    """The image tower alone on a random batch, the way evaluate_suite runs it (no_grad, one autocast
    context, the batch in its CPU slices; ``compiled``: its torch.compile'd blocks), best of
    ``repeats`` after a warm-up: the ceiling of what any data pipeline could feed it."""
    from clip.precision import autocast
    from data.eval.suite import _compiled_vision, _slice_size

    size = model.config.vision.image_size
    x = torch.randn(batch, 3, size, size)
    step = _slice_size(model, precision, "cpu", batch)
    tower = _compiled_vision(model) if compiled else model.visual
    best = float("inf")
    with torch.no_grad(), autocast(precision, "cpu"):
        tower(x[:step])
        for _ in range(repeats):
            t0 = time.perf_counter()
            for start in range(0, batch, step):
                tower(x[start:start + step])
            best = min(best, time.perf_counter() - t0)
    return batch / best


# ----------------------------------------------------------------------------- driver
def bench(pairs: dict[str, dict], n: int, *, rounds: tuple[int, int], deadline: float) -> dict:
    """Alternating timed rounds over ``pairs`` ({name: {"witclip": fn, "clip_benchmark": fn}}, each fn
    returning (seconds, metrics dict)): at least rounds[0], at most rounds[1], and no round begun that
    would (at the last round's pace) end past ``deadline`` (a time.perf_counter() value)."""
    order = [(p, s) for p in pairs for s in SIDES]
    img_s = {p: {s: [] for s in SIDES} for p in pairs}
    metrics = {p: {s: [] for s in SIDES} for p in pairs}
    internal = {p: [] for p in pairs}
    extra: dict[str, dict] = {}
    for r in range(rounds[1]):
        t_round = time.perf_counter()
        for p, s in (order if r % 2 == 0 else order[::-1]):
            dt, res = pairs[p][s]()
            img_s[p][s].append(n / dt)
            if s == "witclip":
                internal[p].append(float(res["images_per_s"]))
                extra[p] = {"precision": res["precision"], "precision_reason": res["precision_reason"]}
                metrics[p][s].append(_metrics(res["metrics"]))
            else:
                metrics[p][s].append(_metrics(res))
        now = time.perf_counter()
        if r + 1 >= rounds[0] and now + (now - t_round) > deadline:
            break
    out = {}
    for p in pairs:
        w, c = img_s[p]["witclip"], img_s[p]["clip_benchmark"]
        out[p] = {
            "img_s": {s: statistics.median(img_s[p][s]) for s in SIDES},
            "min_max": {s: (min(img_s[p][s]), max(img_s[p][s])) for s in SIDES},
            "rounds": len(w),
            "ratio": statistics.median(w) / statistics.median(c),
            "ratio_paired": statistics.median(a / b for a, b in zip(w, c)),
            "ratio_best": max(w) / max(c),
            "witclip_internal_img_s": statistics.median(internal[p]),
            "metrics": {s: metrics[p][s][0] for s in SIDES},
            "stable": {s: all(m == metrics[p][s][0] for m in metrics[p][s]) for s in SIDES},
            **extra[p],
        }
    return out


def _points(a: dict, b: dict) -> float:
    return round(100 * (a["acc1"] - b["acc1"]), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="600 + 120 images, 1-2 rounds: a smoke run")
    ap.add_argument("--samples-per-class", type=int, default=None, help="tiny's set")
    ap.add_argument("--rounds", type=int, default=None, help="exactly this many timed rounds in every row")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S,
                    help="seconds after which no further round is begun once a row's minimum is done")
    ap.add_argument("--workers", default="0", help="comma-separated DataLoader worker counts (tiny); the first "
                                                   "is the headline, further ones time the default pair only")
    ap.add_argument("--batch-size", type=int, default=256, help="witclip's, and both sides' in the fp32 pair")
    ap.add_argument("--cb-batch-size", type=int, default=64, help="CLIP_benchmark's in the default pairs (its CLI's)")
    ap.add_argument("--no-vit", action="store_true", help="skip the ViT-B-32 row")
    ap.add_argument("--compile", action="store_true", help="ViT-B-32 row: also witclip with compile=True")
    args = ap.parse_args()
    plan = PLAN["quick" if args.quick else "full"]
    (spc, spc_vit), rounds_first, rounds_more, rounds_vit = plan
    spc = args.samples_per_class or spc
    if args.rounds:
        rounds_first = rounds_more = rounds_vit = (args.rounds, args.rounds)
    worker_counts = [int(w) for w in args.workers.split(",") if w.strip()]
    bs, cb_bs = args.batch_size, args.cb_batch_size

    torch.set_num_threads(CORES)
    t_start = time.perf_counter()
    ceil = [measure_matmul(2048, 3)]
    choice = resolve_precision("auto", "cpu")
    summary: dict = {}
    with tempfile.TemporaryDirectory(prefix="witclip-bench-eval-") as tmp_name:
        tmp = Path(tmp_name)
        t0 = time.perf_counter()
        root = build_set(tmp / "benchmarks", spc)
        tok = build_tokenizer(root)
        torch.manual_seed(0)
        model = clip.create_model("tiny", vocab_size=tok.vocab_size)
        loss0, loss1 = finetune(model, tok, build_set(tmp / "train", 100, seed=1))
        t_build = time.perf_counter() - t0
        n = 6 * spc
        patch_note = patch_clip_benchmark()
        check = cross_check(model, tok, root, tmp / "check", bs)
        for amp, b in ((True, cb_bs), (False, bs)):  # warm-up: autocast's and oneDNN's first-call costs
            eval_clip_benchmark(model, tok, root, batch_size=b, workers=0, amp=amp)
        eval_witclip(model, tok, root, tmp / "warm", batch_size=bs, workers=0)

        out_dir = tmp / "out"
        rows: list[tuple[str, int, dict]] = []  # (model, workers, bench() result)
        share_tiny = 0.45 if not args.no_vit else 1.0
        for i, w in enumerate(worker_counts):
            data = root if w <= 1 else reshard(root, tmp / f"{w}-shards" / DATASET, w)
            pairs = {"default": {
                "witclip": lambda d=data, w=w: eval_witclip(model, tok, d, out_dir, batch_size=bs, workers=w),
                "clip_benchmark": lambda d=data, w=w: eval_clip_benchmark(model, tok, d, batch_size=cb_bs, workers=w)}}
            if i == 0:
                pairs["fp32"] = {
                    "witclip": lambda: eval_witclip(model, tok, root, out_dir, batch_size=bs, workers=0, precision="fp32"),
                    "clip_benchmark": lambda: eval_clip_benchmark(model, tok, root, batch_size=bs, workers=0, amp=False)}
            share = share_tiny * (0.75 if i == 0 else 0.75 + 0.25 * i / max(1, len(worker_counts) - 1))
            rows.append(("tiny", w, bench(pairs, n, rounds=rounds_first if i == 0 else rounds_more,
                                          deadline=t_start + share * args.budget_s)))
        tiny_flops = flops_per_image(model)
        tiny_tower = tower_img_s(model, choice.precision, bs)

        vit = None
        if not args.no_vit:
            vroot = build_set(tmp / "vit-benchmarks", spc_vit)
            vcheck_root = build_set(tmp / "vit-check", 10)
            torch.manual_seed(0)
            vmodel = clip.create_model(VIT, vocab_size=tok.vocab_size).eval()
            n_vit = 6 * spc_vit
            # fp32 must agree exactly here too (untimed, 60 images); also warms both paths up
            v_fp32 = {"witclip": _metrics(eval_witclip(vmodel, tok, vcheck_root, tmp / "vcheck", batch_size=bs,
                                                       workers=0, precision="fp32")[1]["metrics"]),
                      "clip_benchmark": _metrics(eval_clip_benchmark(vmodel, tok, vcheck_root, batch_size=bs,
                                                                     workers=0, amp=False)[1])}
            pairs = {"default": {
                "witclip": lambda: eval_witclip(vmodel, tok, vroot, out_dir, batch_size=bs, workers=0),
                "clip_benchmark": lambda: eval_clip_benchmark(vmodel, tok, vroot, batch_size=cb_bs, workers=0)}}
            if args.compile:
                pairs["compile"] = {
                    "witclip": lambda: eval_witclip(vmodel, tok, vroot, out_dir, batch_size=bs, workers=0, compile=True),
                    "clip_benchmark": lambda: eval_clip_benchmark(vmodel, tok, vroot, batch_size=cb_bs, workers=0)}
            res = bench(pairs, n_vit, rounds=rounds_vit, deadline=t_start + 0.97 * args.budget_s)
            vit = {"n": n_vit, "res": res, "fp32": v_fp32, "flops": flops_per_image(vmodel),
                   "tower": tower_img_s(vmodel, choice.precision, 64, repeats=2)}
            if args.compile:
                vit["tower_compiled"] = tower_img_s(vmodel, choice.precision, 64, repeats=2, compiled=True)
        ceil.append(measure_matmul(2048, 3))
        shard_mib = (root / "test" / "0.tar").stat().st_size / 2**20
    total = time.perf_counter() - t_start
    fp32_ceiling = max(c.fp32_gflops for c in ceil)
    bf16_ceiling = max(c.bf16_gflops for c in ceil)

    # ---- table
    head = rows[0][2]
    print(f"\nzero-shot eval on CPU: dataset {DATASET!r} ({n} JPEG images {IMAGE_SIZE}px, 6 classes x 7 templates, "
          f"one {shard_mib:.1f} MiB shard; inputs built in {t_build:.1f}s)")
    print(f"witclip at its defaults: precision auto -> {head['default']['precision']} "
          f"({head['default']['precision_reason']}); CLIP_benchmark at its defaults: amp=True "
          f"(torch.autocast('cpu') = bf16)")
    print(f"models: 'tiny' fine-tuned {FINETUNE_STEPS} steps (loss {loss0:.2f} -> {loss1:.2f}); "
          f"'{VIT}' random weights on {vit['n'] if vit else 0} of the images, upsampled to 224 px; "
          f"batch: witclip {bs}, CLIP_benchmark {cb_bs} (fp32 pair: both {bs}); {CORES} torch threads, "
          f"torch {torch.__version__}")
    if patch_note:
        print(f"note: {patch_note}")
    hdr = (f"{'model':<9} {'workers':>7} {'pair':<8} {'impl':<15} {'images/s':>9} {'round min..max':>16} "
           f"{'vs CB':>7}  {'paired':>7}   {'acc1':>8} {'acc5':>8} {'mpc_recall':>10}  stable")
    print(hdr)
    print("-" * len(hdr))
    table = [(m, w, res) for m, w, res in rows] + ([(VIT, 0, vit["res"])] if vit else [])
    for model_name, w, res in table:
        for pair, r in res.items():
            base = r["img_s"]["clip_benchmark"]
            for s in SIDES:
                lo, hi = r["min_max"][s]
                m = r["metrics"][s]
                label = s if s == "clip_benchmark" or pair != "default" else f"witclip ({r['precision']})"
                paired = f"{r['ratio_paired']:>6.3f}x" if s == "witclip" else ""
                print(f"{model_name:<9} {w:>7} {pair:<8} {label:<15} {r['img_s'][s]:>9.1f} "
                      f"{f'{lo:.1f}..{hi:.1f}':>16} {r['img_s'][s] / base:>6.3f}x  {paired:>7}   "
                      f"{m['acc1']:>8.5f} {m['acc5']:>8.5f} {m['mean_per_class_recall']:>10.6f}  {r['stable'][s]}")
            print(f"{'':<9} {'':>7} {'':<8} {'(witclip own)':<15} {r['witclip_internal_img_s']:>9.1f}   "
                  f"<- evaluate_suite's images_per_s: encoding + classifier + metrics only ({r['rounds']} rounds)")
    print("(pairs: default = witclip precision auto vs CLIP_benchmark amp=True; fp32 = precision fp32 vs "
          "amp=False; compile = witclip compile=True vs CLIP_benchmark default; paired = median within-round ratio)")

    tiny_def, tiny_fp32 = head["default"], head["fp32"]
    identical_fp32 = tiny_fp32["metrics"]["witclip"] == tiny_fp32["metrics"]["clip_benchmark"] \
        and all(tiny_fp32["stable"].values())
    print("\naccuracy (top-1 points):")
    print(f"  tiny: witclip {tiny_def['precision']} - CLIP_benchmark amp: "
          f"{_points(tiny_def['metrics']['witclip'], tiny_def['metrics']['clip_benchmark']):+.2f}; witclip "
          f"{tiny_def['precision']} - its fp32: {_points(tiny_def['metrics']['witclip'], tiny_fp32['metrics']['witclip']):+.2f}; "
          f"CLIP_benchmark amp - its fp32: "
          f"{_points(tiny_def['metrics']['clip_benchmark'], tiny_fp32['metrics']['clip_benchmark']):+.2f}; "
          f"fp32 metrics identical: {identical_fp32}")
    if vit:
        vd = vit["res"]["default"]
        print(f"  {VIT} (random weights: near-tied logits, differences are noise): witclip - CLIP_benchmark at "
              f"defaults {_points(vd['metrics']['witclip'], vd['metrics']['clip_benchmark']):+.2f}; fp32 metrics "
              f"identical on 60 images: {vit['fp32']['witclip'] == vit['fp32']['clip_benchmark']}")
    c = check
    print("\ncross-check (untimed, fp32, workers 0, each side's own functions):")
    print(f"  class names / templates / labels equal: {c['classes_equal']} / {c['templates_equal']} / "
          f"{c['targets_equal']}")
    print(f"  classifier max|diff| {c['classifier_max_abs_diff']:.3g} (witclip: all prompts in one batch cut "
          f"to the longest; CLIP_benchmark: one full-context batch per class)")
    print(f"  logits (100x) max|diff| {c['logits_max_abs_diff']:.3g} (bit-identical: {c['logits_bit_identical']}); "
          f"with the same classifier on both sides {c['logits_same_classifier_max_abs_diff']:.3g}")
    print(f"  argmax disagreements {c['argmax_disagreements']}, exact top-1 ties {c['top1_ties']}, "
          f"smallest top-1 margin {c['min_top1_margin']:.3g}")
    print(f"  CLIP_benchmark's formulas on witclip's logits: {c['cb_formulas_on_witclip_logits']}")
    print(f"  witclip's metrics:                           {c['witclip_reported']}")

    print(f"\nceilings (best of start/end of run): matmul 2048^2 fp32 {fp32_ceiling:.0f} GFLOP/s, "
          f"bf16 {bf16_ceiling:.0f} GFLOP/s")
    fr = {}
    for name, flops, e2e, tower in [("tiny", tiny_flops, tiny_def["img_s"]["witclip"], tiny_tower)] + (
            [(VIT, vit["flops"], vit["res"]["default"]["img_s"]["witclip"], vit["tower"])] if vit else []):
        a, t = flops * e2e / 1e9, flops * tower / 1e9
        fr[name] = {"gflop_per_image": flops / 1e9, "e2e_gflops": a, "tower_gflops": t}
        print(f"  {name:<9} {flops / 1e9:6.3f} GFLOP/image; witclip end to end {a:7.1f} GFLOP/s = "
              f"{a / bf16_ceiling:6.1%} of bf16, {a / fp32_ceiling:6.1%} of fp32; image tower alone "
              f"({choice.precision}, {tower:.0f} img/s) {t:7.1f} GFLOP/s = {t / bf16_ceiling:6.1%} of bf16, "
              f"{t / fp32_ceiling:6.1%} of fp32")
    if vit and "tower_compiled" in vit:
        t = vit["flops"] * vit["tower_compiled"] / 1e9
        print(f"  {VIT} image tower compiled ({choice.precision}, {vit['tower_compiled']:.0f} img/s, compilation "
              f"excluded) {t:7.1f} GFLOP/s = {t / bf16_ceiling:6.1%} of bf16")
    print(f"total wall time {total:.1f}s")

    summary = {
        "bench": "eval",
        "dataset": DATASET,
        "n": n,
        "batch_size": bs,
        "clip_benchmark_batch_size": cb_bs,
        "workers": rows[0][1],
        "threads": CORES,
        "precision": tiny_def["precision"],
        "precision_reason": tiny_def["precision_reason"],
        "witclip_img_s": round(tiny_def["img_s"]["witclip"], 1),
        "clip_benchmark_img_s": round(tiny_def["img_s"]["clip_benchmark"], 1),
        "ratio": round(tiny_def["ratio"], 4),
        "ratio_paired": round(tiny_def["ratio_paired"], 4),
        "ratio_best": round(tiny_def["ratio_best"], 4),
        "witclip_internal_img_s": round(tiny_def["witclip_internal_img_s"], 1),
        "witclip": tiny_def["metrics"]["witclip"],
        "clip_benchmark": tiny_def["metrics"]["clip_benchmark"],
        "acc1_diff_points": _points(tiny_def["metrics"]["witclip"], tiny_def["metrics"]["clip_benchmark"]),
        "witclip_acc1_vs_fp32_points": _points(tiny_def["metrics"]["witclip"], tiny_fp32["metrics"]["witclip"]),
        "clip_benchmark_acc1_vs_fp32_points": _points(tiny_def["metrics"]["clip_benchmark"],
                                                      tiny_fp32["metrics"]["clip_benchmark"]),
        "witclip_fp32_img_s": round(tiny_fp32["img_s"]["witclip"], 1),
        "clip_benchmark_fp32_img_s": round(tiny_fp32["img_s"]["clip_benchmark"], 1),
        "ratio_fp32": round(tiny_fp32["ratio"], 4),
        "ratio_fp32_paired": round(tiny_fp32["ratio_paired"], 4),
        "metrics_identical_fp32": identical_fp32,
        "witclip_fp32": tiny_fp32["metrics"]["witclip"],
        "logits_max_abs_diff_fp32": check["logits_max_abs_diff"],
        "matmul_fp32_gflops": round(fp32_ceiling, 1),
        "matmul_bf16_gflops": round(bf16_ceiling, 1),
        "gflop_per_image": round(fr["tiny"]["gflop_per_image"], 4),
        "e2e_frac_bf16_ceiling": round(fr["tiny"]["e2e_gflops"] / bf16_ceiling, 4),
        "tower_frac_bf16_ceiling": round(fr["tiny"]["tower_gflops"] / bf16_ceiling, 4),
        "seconds": round(total, 1),
    }
    for _, w, res in rows[1:]:
        r = res["default"]
        summary[f"witclip_img_s_workers{w}"] = round(r["img_s"]["witclip"], 1)
        summary[f"clip_benchmark_img_s_workers{w}"] = round(r["img_s"]["clip_benchmark"], 1)
        summary[f"ratio_workers{w}"] = round(r["ratio"], 4)
        summary[f"ratio_paired_workers{w}"] = round(r["ratio_paired"], 4)
    if vit:
        vd = vit["res"]["default"]
        summary.update({
            "vit_b_32_n": vit["n"],
            "vit_b_32_witclip_img_s": round(vd["img_s"]["witclip"], 2),
            "vit_b_32_clip_benchmark_img_s": round(vd["img_s"]["clip_benchmark"], 2),
            "vit_b_32_ratio": round(vd["ratio"], 4),
            "vit_b_32_ratio_paired": round(vd["ratio_paired"], 4),
            "vit_b_32_acc1_diff_points": _points(vd["metrics"]["witclip"], vd["metrics"]["clip_benchmark"]),
            "vit_b_32_metrics_identical_fp32": vit["fp32"]["witclip"] == vit["fp32"]["clip_benchmark"],
            "vit_b_32_gflop_per_image": round(fr[VIT]["gflop_per_image"], 3),
            "vit_b_32_e2e_frac_bf16_ceiling": round(fr[VIT]["e2e_gflops"] / bf16_ceiling, 4),
            "vit_b_32_e2e_frac_fp32_ceiling": round(fr[VIT]["e2e_gflops"] / fp32_ceiling, 4),
            "vit_b_32_tower_img_s": round(vit["tower"], 2),
            "vit_b_32_tower_frac_bf16_ceiling": round(fr[VIT]["tower_gflops"] / bf16_ceiling, 4),
        })
        if "compile" in vit["res"]:
            vc = vit["res"]["compile"]
            summary["vit_b_32_compiled_img_s"] = round(vc["img_s"]["witclip"], 2)
            summary["vit_b_32_compiled_ratio"] = round(vc["ratio"], 4)
            summary["vit_b_32_tower_compiled_img_s"] = round(vit["tower_compiled"], 2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
