"""Scores of the zero-shot suite, in plain numpy (torch tensors are accepted and converted).

Every function returns fractions in [0, 1] (the paper prints percentages). Each one matches the
usual reference implementation on untied inputs, and the tests check them against scikit-learn:

    topk_accuracy           sklearn top_k_accuracy_score
    mean_per_class_recall   sklearn balanced_accuracy_score (mean recall over the classes present)
    average_precision       sklearn average_precision_score (non-interpolated, ties grouped)
    voc11_average_precision VOC2007 devkit 11-point interpolated AP (VOCevalcls.m)
    roc_auc                 sklearn roc_auc_score (Mann-Whitney statistic, ties count one half)
    retrieval_recall_at_k   CLIP_benchmark's recall@k in both directions

Ties in rank-based scores are broken against the true item: a label (or image, or caption) is in
the top k only when fewer than k *other* candidates score at least as high. A model that outputs
constant scores therefore gets 0 (a ≥ rule), never a free 100% (a > rule); on untied scores both
rules agree with argsort/topk.

`compute_metric(name, **arrays)` dispatches on the metric names of the benchmark registry and
returns the headline number under "value" plus its components (acc1, acc5, ...).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

METRICS = ("acc1", "mean_per_class_recall", "map_11point", "roc_auc", "mean_top1_top5", "recall_at_k")

# Rank computations compare a chunk of rows against their true scores; this bounds the boolean
# temporary (elements), so a 5k x 25k retrieval matrix is scored in ~16 MiB slices.
_CHUNK_ELEMENTS = 1 << 24


def _array(x: Any, name: str) -> np.ndarray:
    """numpy view of an array-like or a (possibly bf16, possibly CUDA) torch tensor."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.double()  # numpy has no bfloat16
        x = x.numpy()
    try:
        return np.asarray(x)
    except Exception as exc:  # noqa: BLE001 - ragged lists and the like
        raise ValueError(f"{name}: not an array ({exc})") from None


def _scores(x: Any, name: str, ndim: int) -> np.ndarray:
    a = _array(x, name)
    if a.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d array, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name}: empty")
    if not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        raise ValueError(f"{name}: expected numbers, got dtype {a.dtype}")
    a = a.astype(np.float64, copy=False)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: contains NaN or infinity")
    return a


def _labels(x: Any, name: str, n: int, num_classes: int | None = None) -> np.ndarray:
    a = _array(x, name)
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-d array, got shape {a.shape}")
    if a.shape[0] != n:
        raise ValueError(f"{name}: {a.shape[0]} entries for {n} rows of scores")
    if a.dtype == bool:
        a = a.astype(np.int64)
    if not np.issubdtype(a.dtype, np.integer):
        if np.issubdtype(a.dtype, np.floating) and np.all(np.isfinite(a)) and np.all(a == np.round(a)):
            a = a.astype(np.int64)
        else:
            raise ValueError(f"{name}: expected integer labels, got dtype {a.dtype}")
    a = a.astype(np.int64, copy=False)
    if a.size and a.min() < 0:
        raise ValueError(f"{name}: negative label {int(a.min())}")
    if num_classes is not None and a.size and a.max() >= num_classes:
        raise ValueError(f"{name}: label {int(a.max())} out of range for {num_classes} classes")
    return a


def _true_label_ranks(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """For each row, how many other columns score at least as high as the true one."""
    n, c = scores.shape
    ranks = np.empty(n, dtype=np.int64)
    step = max(1, _CHUNK_ELEMENTS // max(c, 1))
    for start in range(0, n, step):
        block = scores[start : start + step]
        true = block[np.arange(block.shape[0]), labels[start : start + step]]
        ranks[start : start + step] = (block >= true[:, None]).sum(axis=1) - 1
    return ranks


def topk_accuracy(logits: Any, labels: Any, k: int) -> float:
    """Fraction of rows whose true label is among the k highest scores (logits [N, C], labels [N])."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    scores = _scores(logits, "logits", 2)
    y = _labels(labels, "labels", scores.shape[0], scores.shape[1])
    return float(np.mean(_true_label_ranks(scores, y) < k))


def mean_per_class_recall(logits_or_preds: Any, labels: Any, num_classes: int | None = None) -> float:
    """Mean over the classes present in `labels` of the fraction of their samples predicted right.

    Takes logits [N, C] (prediction = argmax, first index on ties) or predicted labels [N].
    Equals sklearn's balanced_accuracy_score; classes absent from `labels` do not count.
    """
    x = _array(logits_or_preds, "logits_or_preds")
    if x.ndim == 2:
        scores = _scores(x, "logits", 2)
        if num_classes is not None and num_classes != scores.shape[1]:
            raise ValueError(f"num_classes={num_classes} but logits have {scores.shape[1]} columns")
        num_classes = scores.shape[1]
        preds = scores.argmax(axis=1)
    elif x.ndim == 1:
        if x.size == 0:
            raise ValueError("logits_or_preds: empty")
        preds = _labels(x, "preds", x.shape[0])
    else:
        raise ValueError(f"logits_or_preds: expected [N, C] logits or [N] predictions, got shape {x.shape}")
    y = _labels(labels, "labels", preds.shape[0], num_classes)
    size = max(int(y.max()) + 1, num_classes or 0)
    correct = np.bincount(y, weights=(preds == y).astype(np.float64), minlength=size)
    total = np.bincount(y, minlength=size)
    present = total > 0
    return float(np.mean(correct[present] / total[present]))


def _binary_targets(x: Any, name: str, shape: tuple[int, ...], allow_ignore: bool) -> np.ndarray:
    a = _array(x, name)
    if a.shape != shape:
        raise ValueError(f"{name}: shape {a.shape} does not match scores {shape}")
    allowed = (-1, 0, 1) if allow_ignore else (0, 1)
    if a.dtype == bool:
        return a.astype(np.int64)
    if not np.all(np.isin(a, allowed)):
        bad = np.unique(a[~np.isin(a, allowed)])[:5]
        raise ValueError(f"{name}: values must be in {allowed}, found {bad.tolist()}")
    return a.astype(np.int64)


def _average_precision_1d(s: np.ndarray, y: np.ndarray) -> float:
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    # One operating point per distinct score: tied samples enter together.
    last_of_group = np.r_[np.flatnonzero(np.diff(s_sorted)), s.size - 1]
    tps = np.cumsum(y_sorted)[last_of_group]
    if tps[-1] == 0:
        return 0.0  # no positives: sklearn returns 0 (and warns)
    precision = tps / (last_of_group + 1)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def average_precision(scores: Any, targets: Any) -> float | np.ndarray:
    """Non-interpolated average precision, sum over thresholds of (R_n - R_{n-1}) * P_n.

    scores/targets [N] give a float; [N, C] give one AP per column (an array of C). Targets are
    0/1; a column without positives scores 0, as in sklearn's average_precision_score.
    """
    return _per_column(_average_precision_1d, scores, targets, allow_ignore=False)


def _per_column(fn: Any, scores: Any, targets: Any, allow_ignore: bool) -> float | np.ndarray:
    """fn(scores, targets) on [N] inputs, or one value per column of [N, C] inputs."""
    a = _array(scores, "scores")
    if a.ndim not in (1, 2):
        raise ValueError(f"scores: expected [N] or [N, C], got shape {a.shape}")
    s = _scores(a, "scores", a.ndim)
    y = _binary_targets(targets, "targets", s.shape, allow_ignore=allow_ignore)
    if s.ndim == 1:
        return fn(s, y)
    return np.array([fn(s[:, c], y[:, c]) for c in range(s.shape[1])])


_RECALL_LEVELS = np.arange(11) / 10.0  # exactly 0, 0.1, ..., 1 (i/10, not a float step)


def _voc11_1d(s: np.ndarray, y: np.ndarray) -> float:
    keep = y != -1  # 'difficult': neither a hit nor a false alarm, as in the devkit
    s, y = s[keep], y[keep]
    if not np.any(y == 1):
        return float("nan")
    order = np.argsort(-s, kind="stable")  # the devkit's sort(-out) is stable as well
    hits = y[order] == 1
    tp = np.cumsum(hits)
    fp = np.cumsum(~hits)
    recall = tp / tp[-1]
    precision = tp / (tp + fp)
    ap = 0.0
    for t in _RECALL_LEVELS:
        reached = recall >= t
        ap += precision[reached].max() if reached.any() else 0.0
    return float(ap / len(_RECALL_LEVELS))


def voc11_average_precision(scores: Any, targets: Any) -> float | np.ndarray:
    """VOC2007 11-point interpolated AP: mean over t in {0, 0.1, ..., 1} of max precision at recall >= t.

    Samples are ranked by score (stable on ties, like the devkit). Targets: 1 positive, 0 negative,
    -1 ignored ('difficult'; the devkit's ground truth spells these 1, -1 and 0). scores/targets [N]
    give a float, [N, C] one AP per column; a class without positives gives NaN.
    """
    return _per_column(_voc11_1d, scores, targets, allow_ignore=True)


def voc_map_11point(scores: Any, targets: Any) -> float:
    """Mean 11-point AP over the classes (columns) that have at least one positive."""
    s = _scores(scores, "scores", 2)
    per_class = voc11_average_precision(s, targets)
    if np.all(np.isnan(per_class)):
        raise ValueError("targets: no class has a positive sample; mAP is undefined")
    return float(np.nanmean(per_class))


def _average_ranks(s: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their positions."""
    order = np.argsort(s, kind="mergesort")
    s_sorted = s[order]
    starts_group = np.r_[True, s_sorted[1:] != s_sorted[:-1]]
    group = np.cumsum(starts_group) - 1
    starts = np.flatnonzero(starts_group)
    ends = np.r_[starts[1:], s.size]
    mean_rank = (starts + 1 + ends) / 2.0
    ranks = np.empty(s.size, dtype=np.float64)
    ranks[order] = mean_rank[group]
    return ranks


def roc_auc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve for binary labels, as the Mann-Whitney U statistic.

    AUC = P(score of a random positive > score of a random negative) + 0.5 * P(tie), which is
    exactly the trapezoidal area sklearn's roc_auc_score computes. Needs both classes present.
    """
    s = _scores(scores, "scores", 1)
    y = _labels(labels, "labels", s.shape[0], 2)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("labels: ROC AUC needs both positive and negative samples")
    ranks = _average_ranks(s)
    u = ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def mean_top1_top5(logits: Any, labels: Any) -> float:
    """(top-1 + top-5) / 2, the paper's Kinetics-700 score."""
    return (topk_accuracy(logits, labels, 1) + topk_accuracy(logits, labels, 5)) / 2.0


def retrieval_recall_at_k(
    similarity: Any, text_to_image: Sequence[int] | Any, ks: Iterable[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@k both ways for similarity [n_images, n_texts], text_to_image[t] = image of caption t.

    text_retrieval_recall@k (image -> text): an image is a hit when any of its captions is in its
    top k texts. image_retrieval_recall@k (text -> image): a caption is a hit when its image is in
    its top k images. (CLIP_benchmark's names: the retrieved modality comes first.)
    """
    sim = _scores(similarity, "similarity", 2)
    n_images, n_texts = sim.shape
    t2i = _labels(text_to_image, "text_to_image", n_texts, n_images)
    ks = list(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks!r}")
    captions_per_image = np.bincount(t2i, minlength=n_images)
    if np.any(captions_per_image == 0):
        missing = np.flatnonzero(captions_per_image == 0)
        raise ValueError(f"text_to_image: {missing.size} image(s) have no caption (first: {missing[:5].tolist()})")

    text_ranks = np.empty(n_texts, dtype=np.int64)  # rank of the true image among images, per text
    caption_ranks = np.empty(n_texts, dtype=np.int64)  # rank of the caption among texts, in its image's row
    step = max(1, _CHUNK_ELEMENTS // max(n_images, n_texts))
    for start in range(0, n_texts, step):
        cols = np.arange(start, min(start + step, n_texts))
        owners = t2i[cols]
        true = sim[owners, cols]
        text_ranks[cols] = (sim[:, cols] >= true[None, :]).sum(axis=0) - 1
        caption_ranks[cols] = (sim[owners, :] >= true[:, None]).sum(axis=1) - 1
    best_caption_rank = np.full(n_images, np.iinfo(np.int64).max)
    np.minimum.at(best_caption_rank, t2i, caption_ranks)

    out: dict[str, float] = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = float(np.mean(text_ranks < k))
        out[f"text_retrieval_recall@{k}"] = float(np.mean(best_caption_rank < k))
    return out


_NEEDS = {
    "acc1": ({"logits", "labels"}, set()),
    "mean_per_class_recall": ({"labels"}, {"logits", "preds", "num_classes"}),
    "map_11point": ({"targets"}, {"scores", "logits"}),
    "roc_auc": ({"labels"}, {"scores", "logits"}),
    "mean_top1_top5": ({"logits", "labels"}, set()),
    "recall_at_k": ({"similarity", "text_to_image"}, {"ks"}),
}


def _check_arrays(name: str, arrays: dict[str, Any], one_of: tuple[str, ...] = ()) -> None:
    required, optional = _NEEDS[name]
    missing = sorted(required - arrays.keys())
    unexpected = sorted(arrays.keys() - required - optional)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if unexpected:
            parts.append(f"unexpected {unexpected}")
        raise ValueError(
            f"metric {name!r} takes {sorted(required)}"
            + (f" and optionally {sorted(optional)}" if optional else "")
            + f": {'; '.join(parts)}"
        )
    if one_of and sum(k in arrays for k in one_of) != 1:
        raise ValueError(f"metric {name!r} needs exactly one of {list(one_of)}")


def compute_metric(name: str, **arrays: Any) -> dict[str, float]:
    """Score one task: {"value": headline, <component>: ...}, all fractions in [0, 1].

    acc1                   logits [N, C], labels [N]            -> acc1 (+ acc5 when C > 5)
    mean_per_class_recall  logits [N, C] or preds [N], labels   -> mean_per_class_recall, acc1
    map_11point            scores (or logits) [N, C], targets [N, C] in {1, 0, -1}
                                                                -> map_11point, map (non-interpolated)
    roc_auc                scores [N] (positive-class score) or logits [N, 2], labels [N] in {0, 1}
                                                                -> roc_auc (+ acc1 from logits)
    mean_top1_top5         logits [N, C], labels [N]            -> mean_top1_top5, acc1, acc5
    recall_at_k            similarity [n_images, n_texts], text_to_image [n_texts], ks=(1, 5, 10)
                                                                -> {image,text}_retrieval_recall@k;
                                                                   value = their mean
    """
    if name not in _NEEDS:
        raise ValueError(f"unknown metric {name!r}; expected one of {list(METRICS)}")
    if name == "acc1":
        _check_arrays(name, arrays)
        scores = _scores(arrays["logits"], "logits", 2)
        acc1 = topk_accuracy(scores, arrays["labels"], 1)
        out = {"value": acc1, "acc1": acc1}
        if scores.shape[1] > 5:
            out["acc5"] = topk_accuracy(scores, arrays["labels"], 5)
        return out
    if name == "mean_per_class_recall":
        _check_arrays(name, arrays, one_of=("logits", "preds"))
        x = arrays["logits"] if "logits" in arrays else arrays["preds"]
        value = mean_per_class_recall(x, arrays["labels"], arrays.get("num_classes"))
        a = _array(x, "logits_or_preds")
        preds = _scores(a, "logits", 2).argmax(axis=1) if a.ndim == 2 else _labels(a, "preds", a.shape[0])
        y = _labels(arrays["labels"], "labels", preds.shape[0])
        return {"value": value, "mean_per_class_recall": value, "acc1": float(np.mean(preds == y))}
    if name == "map_11point":
        _check_arrays(name, arrays, one_of=("scores", "logits"))
        scores = _scores(arrays["scores"] if "scores" in arrays else arrays["logits"], "scores", 2)
        targets = _binary_targets(arrays["targets"], "targets", scores.shape, allow_ignore=True)
        value = voc_map_11point(scores, targets)
        aps = []
        for c in range(scores.shape[1]):
            keep = targets[:, c] != -1
            if np.any(targets[keep, c] == 1):
                aps.append(_average_precision_1d(scores[keep, c], targets[keep, c]))
        return {"value": value, "map_11point": value, "map": float(np.mean(aps))}
    if name == "roc_auc":
        _check_arrays(name, arrays, one_of=("scores", "logits"))
        out = {}
        if "logits" in arrays:
            logits = _scores(arrays["logits"], "logits", 2)
            if logits.shape[1] != 2:
                raise ValueError(f"logits: roc_auc needs 2 columns (negative, positive), got {logits.shape[1]}")
            positive = logits[:, 1] - logits[:, 0]  # monotone in the softmax probability of class 1
            out["acc1"] = topk_accuracy(logits, arrays["labels"], 1)
        else:
            positive = arrays["scores"]
        value = roc_auc(positive, arrays["labels"])
        return {"value": value, "roc_auc": value, **out}
    if name == "mean_top1_top5":
        _check_arrays(name, arrays)
        scores = _scores(arrays["logits"], "logits", 2)
        acc1 = topk_accuracy(scores, arrays["labels"], 1)
        acc5 = topk_accuracy(scores, arrays["labels"], 5)
        value = (acc1 + acc5) / 2.0
        return {"value": value, "mean_top1_top5": value, "acc1": acc1, "acc5": acc5}
    # recall_at_k
    _check_arrays(name, arrays)
    recalls = retrieval_recall_at_k(arrays["similarity"], arrays["text_to_image"], arrays.get("ks", (1, 5, 10)))
    return {"value": float(np.mean(list(recalls.values()))), **recalls}
