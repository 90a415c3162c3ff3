"""Zero-shot evaluation throughput on CPU: witclip's ``evaluate_suite`` vs CLIP_benchmark, same run.

    .venv/bin/python bench/eval.py                  # 3,000 images; 0 and 2 DataLoader workers (~2 min)
    .venv/bin/python bench/eval.py --quick          # 600 images, fewer rounds: a smoke run
    .venv/bin/python bench/eval.py --workers 0      # comma-separated DataLoader worker counts

(``make bench`` runs every script in bench/.)

Data: the synthetic "colour" benchmark (6 classes, 7 prompt templates) written by
``data.eval.synthetic.build_synthetic_benchmark`` into a temporary directory, in
CLIP_benchmark's webdataset layout (``classnames.txt``, ``zeroshot_classification_templates.txt``,
``test/nshards.txt``, one ``test/0.tar`` of ``<key>.jpg`` + ``<key>.cls``). Both sides read that
very directory.

Model: witclip's ``tiny`` config with *random* weights (``torch.manual_seed(0)``; no checkpoint is
loaded), its text tower sized for a BPE tokenizer trained (``clip.train_caption_tokenizer``) on the
benchmark's own prompts (class names x templates). The same model object and the same tokenizer
serve both sides; CLIP_benchmark gets it as ``lambda texts: tok(texts, context_length)``.

What is timed, per evaluation of the whole dataset, wall clock around the library's entry point
(classifier building included on both sides, nothing cached between evaluations):

* witclip: ``data.eval.suite.evaluate_suite(model, tok, ["colour"], [root], out_dir, ...)`` --
  registry lookup, opening and indexing the tar, the sha256 fingerprints of the weights and of the
  data, the text classifier (``cache_dir=None``: rebuilt every time), image encoding through a
  DataLoader, the metrics, and writing results.json/.csv/summary.md/results.png. Its own
  per-task figure (``images_per_s``: encoding + classifier + metrics only) is reported too.
* CLIP_benchmark: what its CLI does for a ``wds/`` dataset -- ``datasets.builder.build_dataset(
  "wds/colour", root=<dir>, transform=...)``, ``DataLoader(dataset.batched(batch_size),
  batch_size=None, num_workers=...)`` and ``metrics.zeroshot_classification.evaluate(model,
  dataloader, tokenizer, classnames, templates, "cpu", amp=False)``. clip_benchmark 1.6.2's
  ``accuracy`` helper ends in ``float()`` of a 1-element 1-d array, which NumPy >= 2.4 rejects, so
  when (and only when) it fails here it is swapped for an equivalent written here (same top-k
  definition, ``.item()``); the table says so when that happens.

Both use the same image transform (``clip.eval_transform(image_size)``), batch size, worker count,
``torch.set_num_threads(cores)`` and fp32 (``amp=False``: no autocast); tqdm bars are disabled on
both sides. Timed rounds alternate the order (witclip, CLIP_benchmark, CLIP_benchmark, witclip,
...) so machine noise hits both; images/s = images / wall seconds, median over rounds. Rounds: 4
to 6 at 0 workers, 2 to 3 at each further count; past the minimum, no round is begun that would
end after the time budget (``--budget-s``, 150 s from the start; the first worker count may use
65% of it), so a busy shared machine gets fewer rounds rather than a run of many minutes.

``ratio`` = witclip / CLIP_benchmark of those medians at the pipeline's default worker count (0,
the first of ``--workers``); ``ratio_paired`` = median over rounds of the ratio within a round (the
two evaluations of a round run back to back, so slow phases of a shared machine cancel better);
``ratio_best`` = ratio of the fastest rounds. On a busy machine the three can disagree widely; the
round min..max column shows how noisy it was.

Workers: CLIP_benchmark's loader gives whole shards to DataLoader workers, and a worker left without
a shard raises "No samples found"; so for N > 1 workers both sides read a copy of the set re-split,
in order, into N shards (same samples, same bytes); with 0 workers both read the generator's single
shard.

Correctness, first and untimed (it also warms up both code paths: imports, page cache): each side's
own functions give its classifier and logits, which are compared directly, then with the same
classifier on both sides, and CLIP_benchmark's metric formulas are applied to witclip's logits, so a
metric difference can be traced to its cause. The timed rounds then check that acc1, acc5 and mean
per-class recall of both sides are *identical* (exact float equality) and stable across rounds.

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

import clip  # noqa: E402

# CLIP_benchmark builds WebDataset(...) without shardshuffle; webdataset warns on every build
warnings.filterwarnings("ignore", message=r"WebDataset\(shardshuffle=\.\.\.\) is None")

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
DATASET = "colour"
METRICS = ("acc1", "acc5", "mean_per_class_recall")
IMPLS = ("witclip", "clip_benchmark")

# samples per class; (min, max) timed rounds at the first worker count and at each further one
PLAN = {"full": (500, (4, 6), (2, 3)), "quick": (100, (2, 2), (1, 1))}
BUDGET_S = 150.0  # past this (from the start), no further round is begun once the minimum is done


# ----------------------------------------------------------------------------- setup
def _lines(path: Path) -> list[str]:
    return [s.strip() for s in path.read_text(encoding="utf-8").splitlines() if s.strip()]


def build_inputs(tmp: Path, samples_per_class: int, seed: int = 0):
    """(dataset dir, classnames, templates, model, tokenizer) -- the model has random weights."""
    from data.eval.synthetic import build_synthetic_benchmark

    image_size = clip.get_config("tiny").vision.image_size
    root = build_synthetic_benchmark(DATASET, tmp / "benchmarks", seed, samples_per_class, image_size)
    classnames, templates = _lines(root / "classnames.txt"), _lines(root / "zeroshot_classification_templates.txt")
    prompts = [t.replace("{c}", c) for c in classnames for t in templates]
    tok = clip.train_caption_tokenizer(prompts, 512)
    torch.manual_seed(seed)
    model = clip.create_model("tiny", vocab_size=tok.vocab_size).eval()
    return root, classnames, templates, model, tok


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
def eval_witclip(model, tok, root: Path, out_dir: Path, *, batch_size: int, workers: int,
                 save_predictions: bool = False) -> tuple[float, dict]:
    """(wall seconds, the task's entry of evaluate_suite's report)."""
    from data.eval.suite import evaluate_suite

    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # its one "[eval] colour: ..." line per call
        report = evaluate_suite(model, tok, [DATASET], [root.parent], out_dir, batch_size=batch_size,
                                num_workers=workers, device="cpu", cache_dir=None, progress=False,
                                save_predictions=save_predictions)
    dt = time.perf_counter() - t0
    entry = report["tasks"][DATASET]
    if entry.get("status") != "ran":
        raise RuntimeError(f"witclip's evaluate_suite did not run {DATASET}: {entry}")
    return dt, entry


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


def eval_clip_benchmark(model, tok, root: Path, *, batch_size: int, workers: int) -> tuple[float, dict]:
    """(wall seconds, CLIP_benchmark's metrics dict)."""
    from clip_benchmark.metrics import zeroshot_classification

    ctx = model.config.text.context_length
    t0 = time.perf_counter()
    ds, loader = cb_dataloader(root, clip.eval_transform(model.config.vision.image_size),
                               batch_size=batch_size, workers=workers)
    metrics = zeroshot_classification.evaluate(model, loader, lambda texts: tok(texts, ctx), ds.classes,
                                               ds.templates, "cpu", amp=False)
    return time.perf_counter() - t0, metrics


def _metrics(d: dict) -> dict[str, float]:
    return {k: float(d[k]) for k in METRICS}


# ----------------------------------------------------------------------------- the untimed cross-check
def cross_check(model, tok, root: Path, out_dir: Path, batch_size: int) -> dict:
    """Compare the two sides' intermediate results, each computed by that side's own functions:
    classifier, logits, labels, predictions; then isolate where logits differ (text side: prompt
    batching; image side: same classifier, different code path) and apply CLIP_benchmark's metric
    formulas to witclip's logits."""
    from clip_benchmark.metrics import zeroshot_classification as zc
    from sklearn.metrics import balanced_accuracy_score

    ctx = model.config.text.context_length
    _, entry = eval_witclip(model, tok, root, out_dir, batch_size=batch_size, workers=0, save_predictions=True)
    npz = np.load(out_dir / "predictions" / f"{DATASET}.npz")
    w_logits, w_targets = npz["logits"], npz["targets"]

    transform = clip.eval_transform(model.config.vision.image_size)
    ds, loader = cb_dataloader(root, transform, batch_size=batch_size, workers=0)
    tokfn = lambda texts: tok(texts, ctx)  # noqa: E731
    cb_head = zc.zero_shot_classifier(model, tokfn, ds.classes, ds.templates, "cpu", amp=False)
    cb_logits, cb_targets = (t.numpy() for t in zc.run_classification(model, cb_head, loader, "cpu", amp=False))
    w_head = clip.build_classifier(model, tok, ds.classes, ds.templates, ctx, "cpu")  # evaluate.py's builder
    # witclip's builder fed one class's prompts per text batch, as CLIP_benchmark feeds them
    w_head_per_class = clip.build_classifier(model, tok, ds.classes, ds.templates, ctx, "cpu",
                                             batch_size=len(ds.templates))
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
        "classifier_per_class_batches_max_abs_diff": maxdiff(w_head_per_class, cb_head),
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
    gap = top2[:, 1] - top2[:, 0]
    out["min_top1_margin"] = float(gap.min())
    return out


# ----------------------------------------------------------------------------- driver
def bench(root: Path, model, tok, out_dir: Path, *, n: int, batch_size: int, workers: int,
          rounds: tuple[int, int], deadline: float) -> dict:
    """Alternating timed rounds: at least rounds[0], at most rounds[1], and no round begun that would
    (at the last round's pace) end past `deadline` (a time.perf_counter() value)."""
    runs = {
        "witclip": lambda: eval_witclip(model, tok, root, out_dir, batch_size=batch_size, workers=workers),
        "clip_benchmark": lambda: eval_clip_benchmark(model, tok, root, batch_size=batch_size, workers=workers),
    }
    metrics: dict[str, list[dict]] = {k: [] for k in IMPLS}
    img_s: dict[str, list[float]] = {k: [] for k in IMPLS}
    internal: list[float] = []
    for r in range(rounds[1]):
        t_round = time.perf_counter()
        order = IMPLS if r % 2 == 0 else IMPLS[::-1]
        for k in order:
            dt, res = runs[k]()
            img_s[k].append(n / dt)
            if k == "witclip":
                internal.append(float(res["images_per_s"]))
                metrics[k].append(_metrics(res["metrics"]))
            else:
                metrics[k].append(_metrics(res))
        now = time.perf_counter()
        if r + 1 >= rounds[0] and now + (now - t_round) > deadline:
            break
    stable = {k: all(m == metrics[k][0] for m in metrics[k]) for k in IMPLS}
    return {
        "workers": workers,
        "img_s": {k: statistics.median(v) for k, v in img_s.items()},
        "min_max": {k: (min(v), max(v)) for k, v in img_s.items()},
        "rounds": img_s["witclip"],
        "ratio_paired": statistics.median(w / c for w, c in zip(img_s["witclip"], img_s["clip_benchmark"])),
        "witclip_internal_img_s": statistics.median(internal),
        "metrics": {k: metrics[k][0] for k in IMPLS},
        "stable": stable,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="600 images, 2 rounds: a smoke run")
    ap.add_argument("--samples-per-class", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None, help="exactly this many timed rounds at every worker count")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S,
                    help="seconds after which no further round is begun once the minimum is done")
    ap.add_argument("--workers", default="0,2",
                    help="comma-separated DataLoader worker counts; the first is the headline")
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args()
    spc, rounds, rounds_more = PLAN["quick" if args.quick else "full"]
    spc = args.samples_per_class or spc
    if args.rounds:
        rounds = rounds_more = (args.rounds, args.rounds)
    worker_counts = [int(w) for w in args.workers.split(",") if w.strip()]

    torch.set_num_threads(CORES)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="witclip-bench-eval-") as tmp_name:
        tmp = Path(tmp_name)
        t0 = time.perf_counter()
        root, classnames, templates, model, tok = build_inputs(tmp, spc)
        t_build = time.perf_counter() - t0
        n = len(classnames) * spc
        out_dir = tmp / "out"
        patch_note = patch_clip_benchmark()
        check = cross_check(model, tok, root, tmp / "check", args.batch_size)
        results = []
        for i, w in enumerate(worker_counts):
            data = root if w <= 1 else reshard(root, tmp / f"{w}-shards" / DATASET, w)
            # the first (headline) worker count may use up to 65% of the budget, the others share the rest
            share = 1.0 if len(worker_counts) == 1 else 0.65 + 0.35 * i / (len(worker_counts) - 1)
            results.append(bench(data, model, tok, out_dir, n=n, batch_size=args.batch_size, workers=w,
                                 rounds=rounds if i == 0 else rounds_more,
                                 deadline=t_start + share * args.budget_s))
            results[-1]["shards"] = max(w, 1)
        shard_mib = (root / "test" / "0.tar").stat().st_size / 2**20
    total = time.perf_counter() - t_start

    # ---- table
    print(f"\nzero-shot eval on CPU: dataset {DATASET!r} ({n} JPEG images {model.config.vision.image_size}px, "
          f"{len(classnames)} classes x {len(templates)} templates, one {shard_mib:.1f} MiB shard, "
          f"built in {t_build:.1f}s)")
    print(f"model: witclip 'tiny', random weights (seed 0), vocab {tok.vocab_size}; batch {args.batch_size}, "
          f"{CORES} torch threads, fp32, torch {torch.__version__}")
    print("alternating timed rounds: " + ", ".join(f"{len(r['rounds'])} at {r['workers']} workers" for r in results))
    if patch_note:
        print(f"note: {patch_note}")
    hdr = (f"{'workers':>7} {'shards':>6} {'impl':<15} {'images/s':>9} {'round min..max':>16} {'vs CB':>7}   "
           f"{'acc1':>8} {'acc5':>8} {'mpc_recall':>10}  stable")
    print(hdr)
    print("-" * len(hdr))
    for res in results:
        base = res["img_s"]["clip_benchmark"]
        for k in IMPLS:
            lo, hi = res["min_max"][k]
            m = res["metrics"][k]
            print(f"{res['workers']:>7} {res['shards']:>6} {k:<15} {res['img_s'][k]:>9.0f} {f'{lo:.0f}..{hi:.0f}':>16} "
                  f"{res['img_s'][k] / base:>6.3f}x   {m['acc1']:>8.5f} {m['acc5']:>8.5f} "
                  f"{m['mean_per_class_recall']:>10.6f}  {res['stable'][k]}")
        print(f"{'':>7} {'':>6} {'(witclip own)':<15} {res['witclip_internal_img_s']:>9.0f}   "
              "<- evaluate_suite's images_per_s: encoding+classifier+metrics only")
        print(f"{'':>7} {'':>6} {'(paired ratio)':<15} {'':>9} {'':>16} {res['ratio_paired']:>6.3f}x  "
              "<- median over rounds of witclip/CLIP_benchmark within a round")
        best = res["min_max"]["witclip"][1] / res["min_max"]["clip_benchmark"][1]
        print(f"{'':>7} {'':>6} {'(best ratio)':<15} {'':>9} {'':>16} {best:>6.3f}x  "
              "<- fastest witclip round / fastest CLIP_benchmark round")
    c = check
    print("\ncross-check (untimed, workers 0, each side's own functions):")
    print(f"  class names / templates / labels equal: {c['classes_equal']} / {c['templates_equal']} / "
          f"{c['targets_equal']}")
    print(f"  classifier max|diff| {c['classifier_max_abs_diff']:.3g}; with witclip's builder fed one class's "
          f"prompts per batch (as CLIP_benchmark does) {c['classifier_per_class_batches_max_abs_diff']:.3g}")
    print(f"  logits (100x) max|diff| {c['logits_max_abs_diff']:.3g} (bit-identical: {c['logits_bit_identical']}); "
          f"with the same classifier on both sides {c['logits_same_classifier_max_abs_diff']:.3g}")
    print(f"  argmax disagreements {c['argmax_disagreements']}, exact top-1 ties {c['top1_ties']}, "
          f"smallest top-1 margin {c['min_top1_margin']:.3g}")
    print(f"  CLIP_benchmark's formulas on witclip's logits: {check['cb_formulas_on_witclip_logits']}")
    print(f"  witclip's metrics:                           {check['witclip_reported']}")
    head = results[0]
    w_m, cb_m = head["metrics"]["witclip"], head["metrics"]["clip_benchmark"]
    identical = all(r["metrics"]["witclip"] == r["metrics"]["clip_benchmark"] for r in results) \
        and all(all(r["stable"].values()) for r in results)
    if not identical:
        diffs = {k: w_m[k] - cb_m[k] for k in METRICS}
        print(f"  METRICS DIFFER (witclip - CLIP_benchmark): {diffs}")
    print(f"total wall time {total:.1f}s")

    summary = {
        "bench": "eval",
        "dataset": DATASET,
        "n": n,
        "batch_size": args.batch_size,
        "workers": head["workers"],
        "threads": CORES,
        "witclip_img_s": round(head["img_s"]["witclip"], 1),
        "clip_benchmark_img_s": round(head["img_s"]["clip_benchmark"], 1),
        "ratio": round(head["img_s"]["witclip"] / head["img_s"]["clip_benchmark"], 4),
        "ratio_paired": round(head["ratio_paired"], 4),
        "ratio_best": round(head["min_max"]["witclip"][1] / head["min_max"]["clip_benchmark"][1], 4),
        "witclip_internal_img_s": round(head["witclip_internal_img_s"], 1),
        "witclip": w_m,
        "clip_benchmark": cb_m,
        "metrics_identical": identical,
        "logits_max_abs_diff": check["logits_max_abs_diff"],
        "seconds": round(total, 1),
    }
    for res in results[1:]:
        w = res["workers"]
        summary[f"witclip_img_s_workers{w}"] = round(res["img_s"]["witclip"], 1)
        summary[f"clip_benchmark_img_s_workers{w}"] = round(res["img_s"]["clip_benchmark"], 1)
        summary[f"ratio_workers{w}"] = round(res["img_s"]["witclip"] / res["img_s"]["clip_benchmark"], 4)
        summary[f"ratio_paired_workers{w}"] = round(res["ratio_paired"], 4)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
