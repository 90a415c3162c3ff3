"""Zero-shot classification: class names -> prompt-ensembled text embeddings -> argmax.

Precision: every function takes ``precision`` ("fp32" by default; "bf16" / "fp16" run the towers
under autocast, "auto" is resolved by ``clip.precision.resolve_precision`` for the device). Only the
towers' matrix products run in the reduced precision: their outputs are upcast to fp32 *before*
normalisation, and the prompt averaging, the classifier and the logits are fp32.

Text tower work: prompts are tokenized once, ordered by length and fed in batches cut to the
longest prompt of the batch (``trim_tokens``) rather than to the full context length. The text
tower is causal and pools at the end-of-text token, so positions after it cannot change the
result; with CLIP's 77-token context and ~10-token prompts this is most of the text tower's cost.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from .model import CLIP
from .precision import autocast, resolve_precision
from .tokenizer import CaptionTokenizer


def _unwrap(model: torch.nn.Module) -> CLIP:
    return getattr(model, "module", model)  # DistributedDataParallel -> CLIP


def _resolved(precision: str, device: str | torch.device) -> str:
    return resolve_precision(precision, device).precision


def trim_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """``tokens`` [B, L] cut after the last end-of-text token of the batch. The text tower pools at
    the EOT token (the highest id, so ``argmax``) under a causal mask: what follows it in a row is
    never seen by that position, so the cut changes no embedding (up to float rounding order)."""
    if tokens.numel() == 0:
        return tokens
    return tokens[:, : int(tokens.argmax(dim=-1).max()) + 1]


@torch.no_grad()
def encode_prompts(
    model: CLIP,
    tokenizer: CaptionTokenizer,
    prompts: Sequence[str],
    context_length: int,
    device: str | torch.device,
    batch_size: int = 256,
    precision: str = "fp32",
) -> torch.Tensor:
    """[N, embed_dim] fp32 L2-normalised text embeddings of ``prompts``, in their order (on ``device``).

    Prompts go through the text tower shortest first, ``batch_size`` at a time, each batch cut to
    its longest prompt (see the module docstring); the caller's train/eval mode is restored."""
    model = _unwrap(model)
    precision = _resolved(precision, device)
    embed_dim = model.text_projection.shape[1]
    if not prompts:
        return torch.zeros(0, embed_dim, device=device)
    was_training = model.training
    model.eval()
    tokens = tokenizer(list(prompts), context_length)
    order = torch.argsort(tokens.argmax(dim=-1), stable=True)  # by EOT position = by length
    out = torch.empty(len(prompts), embed_dim, device=device)
    with autocast(precision, device):
        for start in range(0, len(prompts), batch_size):
            rows = order[start:start + batch_size]
            feats = model.encode_text(trim_tokens(tokens[rows]).to(device))
            out[rows.to(device)] = F.normalize(feats.float(), dim=-1)  # fp32 before normalising
    model.train(was_training)
    return out


@torch.no_grad()
def build_classifier(
    model: CLIP,
    tokenizer: CaptionTokenizer,
    classnames: Sequence[str],
    templates: Sequence[str],
    context_length: int,
    device: str | torch.device,
    batch_size: int = 256,
    precision: str = "fp32",
) -> torch.Tensor:
    """[embed_dim, C] fp32 matrix; column c = normalised mean of the normalised prompt embeddings.

    All class x template prompts go through the text tower in batches of `batch_size` prompts,
    whatever the class boundaries, so 1000 classes x 80 templates is ~300 forward passes, not 1000.
    """
    if not classnames or not templates:
        raise ValueError("build_classifier needs at least one class name and one template")
    prompts = [t.replace("{c}", name) for name in classnames for t in templates]  # class-major
    per_prompt = encode_prompts(model, tokenizer, prompts, context_length, device, batch_size, precision)
    per_prompt = per_prompt.view(len(classnames), len(templates), -1)
    return F.normalize(per_prompt.mean(dim=1), dim=-1).T.contiguous()


@torch.no_grad()
def zeroshot_logits(
    model: CLIP, images: torch.Tensor, classifier: torch.Tensor, scale: float | None = 100.0,
    precision: str = "fp32",
) -> torch.Tensor:
    """[B, C] fp32 logits. The default fixed 100 mirrors CLIP's scale ceiling (and CLIP_benchmark); pass
    scale=None to use the model's learned temperature, which gives calibrated probabilities."""
    model = _unwrap(model)
    precision = _resolved(precision, images.device)
    with autocast(precision, images.device):
        image_features = model.encode_image(images)
    features = F.normalize(image_features.float(), dim=-1)  # fp32 before normalising
    factor = model.logit_scale.exp().item() if scale is None else scale
    return factor * features @ classifier.float()


@torch.no_grad()
def predict_topk(
    model: CLIP, images: torch.Tensor, classifier: torch.Tensor, classnames: Sequence[str], k: int = 5,
    precision: str = "fp32",
) -> list[list[tuple[str, float]]]:
    """Per image, the k most likely (class name, probability) pairs under the model's learned
    temperature, best first."""
    if classifier.shape[1] != len(classnames):
        raise ValueError(f"classifier has {classifier.shape[1]} columns but {len(classnames)} class names")
    probs = zeroshot_logits(model, images, classifier, scale=None, precision=precision).softmax(dim=-1).cpu()
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
    precision: str = "fp32",
) -> dict[str, float]:
    """Top-1 / top-5 accuracy and mean per-class recall over `batches` of (images, labels)."""
    model = _unwrap(model)
    precision = _resolved(precision, device)
    was_training = model.training
    model.eval()
    classifier = build_classifier(model, tokenizer, classnames, templates, context_length, device,
                                  precision=precision)
    C = len(classnames)
    k = min(5, C)
    n = correct1 = correct5 = 0
    hits = torch.zeros(C, dtype=torch.long)
    counts = torch.zeros(C, dtype=torch.long)
    # one autocast context around all batches: its cast copies of the weights are kept until it exits
    with autocast(precision, device):
        for images, labels in batches:
            logits = zeroshot_logits(model, images.to(device), classifier, precision=precision).cpu()
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
