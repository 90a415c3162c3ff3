"""Zero-shot classification: class names -> prompt-ensembled text embeddings -> argmax."""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from .model import CLIP
from .tokenizer import CaptionTokenizer


def _unwrap(model: torch.nn.Module) -> CLIP:
    return getattr(model, "module", model)  # DistributedDataParallel -> CLIP


@torch.no_grad()
def build_classifier(
    model: CLIP,
    tokenizer: CaptionTokenizer,
    classnames: Sequence[str],
    templates: Sequence[str],
    context_length: int,
    device: str | torch.device,
) -> torch.Tensor:
    """[embed_dim, C] matrix; column c = normalised mean of the normalised prompt embeddings."""
    model = _unwrap(model)
    was_training = model.training
    model.eval()
    columns = []
    for name in classnames:
        tokens = tokenizer([t.replace("{c}", name) for t in templates], context_length).to(device)
        emb = F.normalize(model.encode_text(tokens).float(), dim=-1)
        columns.append(F.normalize(emb.mean(dim=0), dim=-1))
    model.train(was_training)
    return torch.stack(columns, dim=1)


@torch.no_grad()
def zeroshot_logits(
    model: CLIP, images: torch.Tensor, classifier: torch.Tensor, scale: float | None = 100.0
) -> torch.Tensor:
    """[B, C] logits. The default fixed 100 mirrors CLIP's scale ceiling (and CLIP_benchmark); pass
    scale=None to use the model's learned temperature, which gives calibrated probabilities."""
    model = _unwrap(model)
    features = F.normalize(model.encode_image(images).float(), dim=-1)
    factor = model.logit_scale.exp().item() if scale is None else scale
    return factor * features @ classifier


@torch.no_grad()
def evaluate_zeroshot(
    model: CLIP,
    tokenizer: CaptionTokenizer,
    classnames: Sequence[str],
    templates: Sequence[str],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    context_length: int,
    device: str | torch.device,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy and mean per-class recall over `batches` of (images, labels)."""
    model = _unwrap(model)
    was_training = model.training
    model.eval()
    classifier = build_classifier(model, tokenizer, classnames, templates, context_length, device)
    C = len(classnames)
    k = min(5, C)
    n = correct1 = correct5 = 0
    hits = torch.zeros(C, dtype=torch.long)
    counts = torch.zeros(C, dtype=torch.long)
    for images, labels in batches:
        logits = zeroshot_logits(model, images.to(device), classifier).cpu()
        labels = labels.cpu().long()
        topk = logits.topk(k, dim=-1).indices
        top1_ok = topk[:, 0] == labels
        correct1 += int(top1_ok.sum())
        correct5 += int((topk == labels[:, None]).any(dim=-1).sum())
        counts += torch.bincount(labels, minlength=C)
        hits += torch.bincount(labels[top1_ok], minlength=C)
        n += labels.numel()
    model.train(was_training)
    if n == 0:
        raise ValueError("evaluate_zeroshot got no samples")
    present = counts > 0  # recall is undefined for classes absent from the eval set
    metrics = {
        "acc1": correct1 / n,
        "mean_per_class_recall": float((hits[present] / counts[present]).mean()),
        "n": n,
    }
    if C >= 5:
        metrics["acc5"] = correct5 / n
    return metrics
