"""Symmetric InfoNCE loss over image/text pairs, with cross-rank negatives under DDP."""

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
    world_size > 1 each rank scores its local rows against the features of the *global*
    batch (more negatives), so its positives sit at ``rank * local_batch + i``. All ranks
    must use the same local batch size.
    """

    def forward(
        self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
    ) -> torch.Tensor:
        rank, world = _world()
        n = image_features.shape[0]
        if world > 1:
            all_image = gather_with_grad(image_features)
            all_text = gather_with_grad(text_features)
        else:
            all_image, all_text = image_features, text_features
        logits_per_image = logit_scale * image_features @ all_text.T  # (n, world*n)
        logits_per_text = logit_scale * text_features @ all_image.T
        labels = torch.arange(n, device=image_features.device) + rank * n
        return 0.5 * (
            F.cross_entropy(logits_per_image.float(), labels)
            + F.cross_entropy(logits_per_text.float(), labels)
        )
