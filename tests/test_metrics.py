"""Zero-shot metrics against scikit-learn, the VOC2007 devkit definition and brute-force loops."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.metrics import (
    average_precision_score,
    balanced_accuracy_score,
    roc_auc_score,
    top_k_accuracy_score,
)

from data.eval.metrics import (
    METRICS,
    average_precision,
    compute_metric,
    mean_per_class_recall,
    mean_top1_top5,
    retrieval_recall_at_k,
    roc_auc,
    topk_accuracy,
    voc11_average_precision,
    voc_map_11point,
)


def _classification(seed: int, n: int = 300, c: int = 12):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, size=n)
    logits = rng.normal(size=(n, c))
    logits[np.arange(n), labels] += rng.uniform(0, 2.5, size=n)  # better than chance, far from perfect
    return logits, labels


# --- top-k ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 2, 5, 11])
def test_topk_matches_sklearn(seed, k):
    logits, labels = _classification(seed)
    expected = top_k_accuracy_score(labels, logits, k=k, labels=np.arange(logits.shape[1]))
    assert topk_accuracy(logits, labels, k) == pytest.approx(expected, abs=1e-12)


def test_topk_k_at_least_num_classes_is_one():
    logits, labels = _classification(3, c=4)
    assert topk_accuracy(logits, labels, 4) == 1.0
    assert topk_accuracy(logits, labels, 9) == 1.0


def test_topk_ties_count_against_the_true_label():
    logits = np.zeros((6, 3))
    labels = np.array([0, 1, 2, 0, 1, 2])
    assert topk_accuracy(logits, labels, 1) == 0.0  # constant scores earn nothing
    assert topk_accuracy(logits, labels, 2) == 0.0
    assert topk_accuracy(logits, labels, 3) == 1.0


def test_topk_accepts_torch_tensors_including_bf16():
    torch = pytest.importorskip("torch")
    logits, labels = _classification(4)
    expected = topk_accuracy(logits, labels, 1)
    assert topk_accuracy(torch.tensor(logits), torch.tensor(labels), 1) == pytest.approx(expected)
    low = torch.tensor(logits).to(torch.bfloat16)
    assert topk_accuracy(low, torch.tensor(labels), 1) == pytest.approx(
        topk_accuracy(low.float().numpy(), labels, 1)
    )


@pytest.mark.parametrize(
    "logits, labels, k, match",
    [
        (np.array([[0.0, np.nan]]), np.array([0]), 1, "NaN"),
        (np.zeros((2, 3)), np.array([0, 3]), 1, "out of range"),
        (np.zeros((2, 3)), np.array([0]), 1, "entries"),
        (np.zeros(3), np.array([0, 1, 2]), 1, "2-d"),
        (np.zeros((2, 3)), np.array([0, 1]), 0, "positive"),
        (np.zeros((2, 3)), np.array([0.5, 1]), 1, "integer"),
    ],
)
def test_topk_rejects_bad_input(logits, labels, k, match):
    with pytest.raises(ValueError, match=match):
        topk_accuracy(logits, labels, k)


# --- mean per-class recall -------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mean_per_class_recall_matches_balanced_accuracy(seed):
    logits, labels = _classification(seed, c=9)
    preds = logits.argmax(axis=1)
    expected = balanced_accuracy_score(labels, preds)
    assert mean_per_class_recall(logits, labels, 9) == pytest.approx(expected, abs=1e-12)
    assert mean_per_class_recall(preds, labels, 9) == pytest.approx(expected, abs=1e-12)


def test_mean_per_class_recall_ignores_classes_absent_from_labels():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 6, size=200)  # classes 6..9 never occur
    preds = np.where(rng.random(200) < 0.6, labels, rng.integers(0, 10, size=200))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns that y_pred has classes not in y_true
        expected = balanced_accuracy_score(labels, preds)
    assert mean_per_class_recall(preds, labels, 10) == pytest.approx(expected, abs=1e-12)


def test_mean_per_class_recall_weights_classes_equally():
    labels = np.array([0] * 9 + [1])
    preds = np.zeros(10, dtype=int)  # always class 0: 90% top-1, 50% per-class
    assert mean_per_class_recall(preds, labels, 2) == pytest.approx(0.5)


def test_mean_per_class_recall_checks_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        mean_per_class_recall(np.zeros((3, 4)), np.array([0, 1, 2]), 5)


# --- average precision -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tied", [False, True])
def test_average_precision_matches_sklearn(seed, tied):
    rng = np.random.default_rng(seed)
    targets = (rng.random((150, 6)) < 0.3).astype(int)
    scores = rng.normal(size=(150, 6)) + targets
    if tied:
        scores = np.round(scores, 1)  # many tied scores: sklearn groups them into one threshold
    per_class = average_precision(scores, targets)
    assert per_class.shape == (6,)
    for c in range(6):
        assert per_class[c] == pytest.approx(average_precision_score(targets[:, c], scores[:, c]), abs=1e-12)
        assert average_precision(scores[:, c], targets[:, c]) == pytest.approx(per_class[c], abs=1e-15)


def test_average_precision_without_positives_is_zero_like_sklearn():
    scores = np.array([0.3, 0.1, 0.2])
    targets = np.zeros(3, dtype=int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = average_precision_score(targets, scores)
    assert average_precision(scores, targets) == expected == 0.0


# --- VOC2007 11-point AP ----------------------------------------------------------------------------


def test_voc11_hand_computed_example():
    # Ranked hits 1 0 1 0 1: recall 1/3 1/3 2/3 2/3 1, precision 1 1/2 2/3 1/2 3/5.
    # t = 0, .1, .2, .3 -> 1;  t = .4, .5, .6 -> 2/3;  t = .7, .8, .9, 1 -> 3/5.
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    targets = np.array([1, 0, 1, 0, 1])
    expected = (4 * 1.0 + 3 * (2 / 3) + 4 * 0.6) / 11
    assert voc11_average_precision(scores, targets) == pytest.approx(expected, abs=1e-12)
    # A 'difficult' sample (-1) is neither a hit nor a false alarm, wherever it ranks.
    scores_d = np.array([0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5])
    targets_d = np.array([-1, 1, -1, 0, 1, 0, 1])
    assert voc11_average_precision(scores_d, targets_d) == pytest.approx(expected, abs=1e-12)


def test_voc11_recall_levels_are_exact_tenths():
    # 10 positives; the 3rd is found at rank 4, so recall reaches exactly 0.3 there (precision 3/4).
    # A float step (0.1 * 3 = 0.30000000000000004) would skip that point; the definition does not.
    targets = np.array([1, 1, 0, 1] + [0] * 6 + [1] * 7)
    scores = -np.arange(targets.size, dtype=float)
    got = voc11_average_precision(scores, targets)
    assert got == pytest.approx(_voc11_reference(scores, targets), abs=1e-12)
    points = [1.0, 1.0, 1.0, 0.75] + [10 / 17] * 7  # t = 0 .. 0.2: p=1; t = 0.3: 3/4; later: the tail
    assert got == pytest.approx(sum(points) / 11, abs=1e-12)


def _voc11_reference(scores, targets):
    """The devkit's VOCevalcls.m, transcribed as plain loops (1 = positive, 0 = negative, -1 = difficult)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # Python's sort is stable
    n_pos = sum(1 for t in targets if t == 1)
    tp = fp = 0
    recall, precision = [], []
    for i in order:
        if targets[i] == 1:
            tp += 1
        elif targets[i] == 0:
            fp += 1
        recall.append(tp / n_pos)
        precision.append(tp / (tp + fp) if tp + fp else 0.0)
    ap = 0.0
    for step in range(11):
        t = step / 10
        candidates = [p for r, p in zip(recall, precision) if r >= t]
        ap += (max(candidates) if candidates else 0.0) / 11
    return ap


@pytest.mark.parametrize("seed", range(5))
def test_voc11_matches_reference_loop(seed):
    rng = np.random.default_rng(seed)
    targets = rng.choice([1, 0, -1], p=[0.25, 0.65, 0.1], size=(80, 5))
    targets[0] = 1  # every class has a positive
    scores = np.round(rng.normal(size=(80, 5)) + (targets == 1), 1)  # with ties
    per_class = voc11_average_precision(scores, targets)
    for c in range(5):
        assert per_class[c] == pytest.approx(_voc11_reference(scores[:, c], targets[:, c]), abs=1e-12)
    assert voc_map_11point(scores, targets) == pytest.approx(per_class.mean(), abs=1e-12)


def test_voc_map_skips_classes_without_positives():
    rng = np.random.default_rng(9)
    targets = (rng.random((40, 3)) < 0.4).astype(int)
    targets[:, 2] = 0
    scores = rng.normal(size=(40, 3))
    per_class = voc11_average_precision(scores, targets)
    assert np.isnan(per_class[2])
    assert voc_map_11point(scores, targets) == pytest.approx(per_class[:2].mean())
    with pytest.raises(ValueError, match="no class has a positive"):
        voc_map_11point(scores, np.zeros_like(targets))


def test_voc11_perfect_ranking_is_one():
    targets = np.array([[1, 0], [1, 1], [0, 1], [0, 0]])
    scores = targets + 0.1 * np.arange(4)[:, None]
    assert voc_map_11point(scores, targets) == pytest.approx(1.0)


# --- ROC AUC -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tied", [False, True])
def test_roc_auc_matches_sklearn(seed, tied):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=250)
    scores = rng.normal(size=250) + 0.8 * labels
    if tied:
        scores = np.floor(scores * 2)  # a handful of distinct values, many ties across classes
    assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_roc_auc_all_tied_is_one_half_and_needs_both_classes():
    assert roc_auc(np.ones(6), np.array([0, 1, 0, 1, 1, 0])) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="both"):
        roc_auc(np.arange(4.0), np.ones(4, dtype=int))


# --- mean of top-1 and top-5 ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_mean_top1_top5(seed):
    logits, labels = _classification(seed, c=20)
    classes = np.arange(20)
    top1 = top_k_accuracy_score(labels, logits, k=1, labels=classes)
    top5 = top_k_accuracy_score(labels, logits, k=5, labels=classes)
    expected = (top1 + top5) / 2
    assert mean_top1_top5(logits, labels) == pytest.approx(expected, abs=1e-12)


# --- retrieval ------------------------------------------------------------------------------------------


def _retrieval(seed: int, n_images: int = 40):
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 6, size=n_images)  # 1..5 captions per image
    text_to_image = rng.permutation(np.repeat(np.arange(n_images), counts))
    sim = rng.normal(size=(n_images, text_to_image.size))
    sim[text_to_image, np.arange(text_to_image.size)] += 1.5
    return sim, text_to_image


def _retrieval_reference(sim, text_to_image, ks):
    n_images, n_texts = sim.shape
    out = {}
    for k in ks:
        hits = 0
        for t in range(n_texts):  # text -> image
            ranked = sorted(range(n_images), key=lambda i: -sim[i, t])
            hits += text_to_image[t] in ranked[:k]
        out[f"image_retrieval_recall@{k}"] = hits / n_texts
        hits = 0
        for i in range(n_images):  # image -> text
            ranked = sorted(range(n_texts), key=lambda t: -sim[i, t])
            hits += any(text_to_image[t] == i for t in ranked[:k])
        out[f"text_retrieval_recall@{k}"] = hits / n_images
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_retrieval_recall_matches_brute_force(seed):
    sim, t2i = _retrieval(seed)
    got = retrieval_recall_at_k(sim, t2i, ks=(1, 5, 10))
    expected = _retrieval_reference(sim, t2i, (1, 5, 10))
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


def test_retrieval_recall_in_small_chunks(monkeypatch):
    import data.eval.metrics as metrics

    sim, t2i = _retrieval(7)
    whole = retrieval_recall_at_k(sim, t2i)
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 50)  # several texts per chunk, many chunks
    assert retrieval_recall_at_k(sim, t2i) == whole


def test_retrieval_rejects_images_without_captions():
    sim = np.zeros((3, 2))
    with pytest.raises(ValueError, match="no caption"):
        retrieval_recall_at_k(sim, np.array([0, 1]))


# --- compute_metric ---------------------------------------------------------------------------------------


def _arrays_for(metric: str) -> dict:
    logits, labels = _classification(11, n=60, c=8)
    if metric in ("acc1", "mean_top1_top5"):
        return {"logits": logits, "labels": labels}
    if metric == "mean_per_class_recall":
        return {"logits": logits, "labels": labels, "num_classes": 8}
    if metric == "map_11point":
        targets = (np.random.default_rng(1).random((60, 8)) < 0.3).astype(int)
        targets[0] = 1
        return {"scores": logits + targets, "targets": targets}
    if metric == "roc_auc":
        return {"logits": logits[:, :2], "labels": (labels % 2)}
    if metric == "recall_at_k":
        sim, t2i = _retrieval(3, n_images=12)
        return {"similarity": sim, "text_to_image": t2i}
    raise AssertionError(metric)


@pytest.mark.parametrize("metric", METRICS)
def test_compute_metric_covers_every_metric(metric):
    out = compute_metric(metric, **_arrays_for(metric))
    assert 0.0 <= out["value"] <= 1.0
    assert all(isinstance(v, float) for v in out.values())
    if metric != "recall_at_k":
        assert out[metric] == out["value"]


def test_compute_metric_components():
    logits, labels = _classification(12, c=8)
    out = compute_metric("acc1", logits=logits, labels=labels)
    assert out["acc1"] == topk_accuracy(logits, labels, 1) and out["acc5"] == topk_accuracy(logits, labels, 5)
    assert "acc5" not in compute_metric("acc1", logits=logits[:, :4], labels=labels % 4)
    out = compute_metric("mean_top1_top5", logits=logits, labels=labels)
    assert out["value"] == pytest.approx((out["acc1"] + out["acc5"]) / 2)
    binary = (labels % 2).astype(int)
    two = logits[:, :2]
    assert compute_metric("roc_auc", logits=two, labels=binary)["value"] == pytest.approx(
        roc_auc_score(binary, two[:, 1] - two[:, 0])
    )
    assert compute_metric("roc_auc", scores=two[:, 1], labels=binary)["value"] == pytest.approx(
        roc_auc_score(binary, two[:, 1])
    )
    sim, t2i = _retrieval(4, n_images=10)
    out = compute_metric("recall_at_k", similarity=sim, text_to_image=t2i, ks=(1, 3))
    assert set(out) == {"value", "image_retrieval_recall@1", "image_retrieval_recall@3",
                        "text_retrieval_recall@1", "text_retrieval_recall@3"}
    assert out["value"] == pytest.approx(np.mean([v for k, v in out.items() if k != "value"]))


def test_compute_metric_map_reports_both_aps():
    rng = np.random.default_rng(13)
    targets = (rng.random((50, 4)) < 0.4).astype(int)
    targets[0] = 1
    scores = rng.normal(size=(50, 4)) + targets
    out = compute_metric("map_11point", scores=scores, targets=targets)
    assert out["value"] == pytest.approx(voc_map_11point(scores, targets))
    sklearn_map = np.mean([average_precision_score(targets[:, c], scores[:, c]) for c in range(4)])
    assert out["map"] == pytest.approx(sklearn_map)


@pytest.mark.parametrize(
    "name, arrays, match",
    [
        ("top1", {}, "unknown metric"),
        ("acc1", {"logits": np.zeros((2, 3))}, "missing"),
        ("acc1", {"logits": np.zeros((2, 3)), "labels": [0, 1], "extra": 1}, "unexpected"),
        ("roc_auc", {"labels": [0, 1]}, "exactly one"),
        ("roc_auc", {"logits": np.zeros((2, 3)), "labels": [0, 1]}, "2 columns"),
    ],
)
def test_compute_metric_errors(name, arrays, match):
    with pytest.raises(ValueError, match=match):
        compute_metric(name, **arrays)
