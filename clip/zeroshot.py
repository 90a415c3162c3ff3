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
    batch_size: int = 256,
) -> torch.Tensor:
    """[embed_dim, C] matrix; column c = normalised mean of the normalised prompt embeddings.

    All class x template prompts go through the text tower in batches of `batch_size` prompts,
    whatever the class boundaries, so 1000 classes x 80 templates is ~300 forward passes, not 1000.
    """
    if not classnames or not templates:
        raise ValueError("build_classifier needs at least one class name and one template")
    model = _unwrap(model)
    was_training = model.training
    model.eval()
    prompts = [t.replace("{c}", name) for name in classnames for t in templates]  # class-major
    chunks = []
    for start in range(0, len(prompts), batch_size):
        tokens = tokenizer(prompts[start:start + batch_size], context_length).to(device)
        chunks.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
    model.train(was_training)
    per_prompt = torch.cat(chunks).view(len(classnames), len(templates), -1)
    return F.normalize(per_prompt.mean(dim=1), dim=-1).T.contiguous()


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
def predict_topk(
    model: CLIP, images: torch.Tensor, classifier: torch.Tensor, classnames: Sequence[str], k: int = 5
) -> list[list[tuple[str, float]]]:
    """Per image, the k most likely (class name, probability) pairs under the model's learned
    temperature, best first."""
    if classifier.shape[1] != len(classnames):
        raise ValueError(f"classifier has {classifier.shape[1]} columns but {len(classnames)} class names")
    probs = zeroshot_logits(model, images, classifier, scale=None).softmax(dim=-1).cpu()
    values, indices = probs.topk(min(k, len(classnames)), dim=-1)
    return [[(classnames[i], float(v)) for v, i in zip(vs.tolist(), ix.tolist())]
            for vs, ix in zip(values, indices)]


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
