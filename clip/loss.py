"""Contrastive losses over image/text pairs (symmetric InfoNCE, SigLIP), with cross-rank
negatives under DDP."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from all ranks along dim 0; gradients flow back to every rank's copy."""
    import torch.distributed._functional_collectives as fc

    if hasattr(fc, "all_gather_single_autograd"):
        # newer torch: differentiable functional collective that replaces the deprecated
        # torch.distributed.nn.functional.all_gather. wait_tensor materialises the result.
        return fc.wait_tensor(fc.all_gather_single_autograd(x.contiguous(), 0, dist.group.WORLD))
    from torch.distributed.nn.functional import all_gather  # autograd-aware (older torch)

    return torch.cat(all_gather(x), dim=0)


class ClipLoss(nn.Module):
    """Cross-entropy in both directions over the scaled cosine-similarity matrix.

    Inputs are L2-normalised features (as returned by ``CLIP.forward``). With
    world_size > 1 the features of every rank are gathered (with gradient) so that every
    sample is scored against the *global* batch (more negatives). All ranks must use the
    same local batch size. Two ways to build the logits under DDP:

    * ``local_loss=False`` (default, full matrix): every rank computes the whole
      ``(world*n, world*n)`` logit matrix of the gathered features, with labels
      ``arange(world*n)``; the loss on every rank is the global-batch loss.
    * ``local_loss=True`` (local rows x global columns): each rank scores only its own
      ``n`` image features against all gathered text features (and its own text features
      against all gathered image features), so its positives sit at ``rank * n + i``.
      Cheaper (``n x world*n`` logits); the mean of the per-rank losses is the
      global-batch loss.

    In both modes the gradient is the global-batch gradient once DDP averages it across
    ranks (the gather's backward sums every rank's contribution into each rank's
    features). With world_size == 1 the two modes are identical.
    """

    def __init__(self, local_loss: bool = False) -> None:
        super().__init__()
        self.local_loss = local_loss

    def forward(
        self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
    ) -> torch.Tensor:
        rank, world = _world()
        # fp32 logits and loss under autocast too: the products are tiny, the softmax is not forgiving
        image_features, text_features, logit_scale = _fp32(image_features, text_features, logit_scale)
        n = image_features.shape[0]
        if world > 1:
            all_image = gather_with_grad(image_features)
            all_text = gather_with_grad(text_features)
        else:
            all_image, all_text = image_features, text_features
        with _no_autocast(image_features):
            if self.local_loss or world == 1:
                logits_per_image = logit_scale * image_features @ all_text.T  # (n, world*n)
                logits_per_text = logit_scale * text_features @ all_image.T
                labels = torch.arange(n, device=image_features.device) + rank * n
            else:
                logits_per_image = logit_scale * all_image @ all_text.T  # (world*n, world*n)
                logits_per_text = logits_per_image.T
                labels = torch.arange(world * n, device=image_features.device)
            return 0.5 * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels))


class SigLipLoss(nn.Module):
    """Pairwise sigmoid loss of SigLIP (Zhai et al., 2023, arXiv:2303.15343).

    ``logits = logit_scale * img @ txt.T + logit_bias``; every image/text pair is an
    independent binary problem, positive (label +1) on the diagonal and negative (-1)
    elsewhere: ``loss = -sum(log_sigmoid(label * logits)) / n`` with ``n`` the *local*
    batch size, as in the paper. ``logit_scale`` and ``logit_bias`` are passed in like
    ClipLoss's ``logit_scale`` (already exponentiated scale; the paper initialises them to
    10 and -10). Inputs are L2-normalised features.

    With world_size > 1 the text features of all ranks are gathered (with gradient) and
    each rank sums the terms of its own ``n`` images against all ``world*n`` texts (its
    positives at ``rank * n + i``), still divided by the local ``n``. Every pair of the
    global batch is then counted exactly once over the ranks; once DDP averages the
    gradients they equal those of the single-process loss on the global batch (whose
    value is the mean of the per-rank losses). All ranks must use the same local batch.
    """

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor,
    ) -> torch.Tensor:
        rank, world = _world()
        image_features, text_features, logit_scale, logit_bias = _fp32(
            image_features, text_features, logit_scale, logit_bias)
        n = image_features.shape[0]
        all_text = gather_with_grad(text_features) if world > 1 else text_features
        with _no_autocast(image_features):
            logits = logit_scale * image_features @ all_text.T + logit_bias
        signs = -torch.ones_like(logits)
        idx = torch.arange(n, device=logits.device)
        signs[idx, idx + rank * n] = 1.0
        return -F.logsigmoid(signs * logits).sum() / n


def _fp32(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Upcast half/bfloat16 tensors (autocast) to float32; leave float32/float64 alone."""
    return tuple(x.to(torch.promote_types(x.dtype, torch.float32)) for x in tensors)


def _no_autocast(like: torch.Tensor):
    """Autocast off for the logit products: under autocast a matmul of fp32 inputs still runs in bf16."""
    return torch.autocast(like.device.type, enabled=False)
