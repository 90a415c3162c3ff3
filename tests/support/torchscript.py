"""Test-only TorchScript archives in OpenAI's layout (never imported by witclip itself).

`scripted_holder(sd)` is a scripted module tree whose state_dict is exactly `sd` (as OpenAI's releases,
which are TorchScript programs); `save_code_running_archive(sd, path)` adds a submodule with its own
``__setstate__``, which torch.jit.load runs while loading: the kind of archive witclip's weights-only
reader refuses and loads only when the file is pinned by hash or trusted. Running it is harmless: it
counts its loads in `Guard.loads`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn


class Holder(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Guard(nn.Module):
    """No weights; a TorchScript ``__setstate__`` (code run by torch.jit.load) that counts loads."""

    def __init__(self) -> None:
        super().__init__()
        self.loads = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def __getstate__(self) -> tuple[int, bool]:
        return (self.loads, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[int, bool]) -> None:
        self.loads = state[0] + 1
        self.training = state[1]


def holder_tree(sd: dict[str, torch.Tensor]) -> nn.Module:
    """An eager module tree whose state_dict has exactly ``sd``'s keys."""
    root = Holder()
    for key, value in sd.items():
        *path, leaf = key.split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, Holder())
            mod = getattr(mod, part)
        if value.is_floating_point():
            mod.register_parameter(leaf, nn.Parameter(value.clone(), requires_grad=False))
        else:  # OpenAI's integer entries (input_resolution, context_length, vocab_size)
            mod.register_buffer(leaf, value.clone())
    return root


def scripted_holder(sd: dict[str, torch.Tensor]) -> torch.jit.ScriptModule:
    """A scripted module tree whose state_dict has exactly ``sd``'s keys."""
    return torch.jit.script(holder_tree(sd))


def save_code_running_archive(sd: dict[str, torch.Tensor], path: Path) -> None:
    """A TorchScript archive with state_dict ``sd`` whose loading runs `Guard.__setstate__`."""
    root = holder_tree(sd)
    root.add_module("guard", Guard())  # no weights: the state_dict stays exactly sd
    torch.jit.save(torch.jit.script(root), str(path))
