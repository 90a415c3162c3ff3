"""CLIP: a ViT image tower and a causal text transformer trained into one embedding space.

Parameter names follow OpenAI's released state_dict exactly (``visual.conv1.weight``,
``transformer.resblocks.0.attn.in_proj_weight``, ``text_projection``, ...) so their
checkpoints can be loaded later without a key-renaming table. Internally we run
batch-first and use ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# configs


@dataclass
class VisionConfig:
    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class TextConfig:
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0


ACTIVATIONS = ("gelu", "quick_gelu")


@dataclass
class CLIPConfig:
    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    act: str = "quick_gelu"  # OpenAI checkpoints were trained with QuickGELU
    init_logit_scale: float = math.log(1 / 0.07)

    def __post_init__(self) -> None:
        if self.act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {ACTIVATIONS}, got {self.act!r}")
        for name, tower in (("vision", self.vision), ("text", self.text)):
            if tower.width % tower.heads:
                raise ValueError(f"{name}.width {tower.width} not divisible by heads {tower.heads}")
        if self.vision.image_size % self.vision.patch_size:
            raise ValueError("vision.image_size must be a multiple of vision.patch_size")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CLIPConfig":
        d = dict(d)
        d.pop("name", None)  # named config files may carry their own name
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown CLIPConfig keys: {sorted(unknown)}")
        vision = VisionConfig(**d.pop("vision", {}))
        text = TextConfig(**d.pop("text", {}))
        return cls(vision=vision, text=text, **d)


# -----------------------------------------------------------------------------
# building blocks


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back: keeps fp16/bf16 weights numerically stable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """sigmoid approximation of GELU used by the original CLIP."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def make_activation(name: str) -> nn.Module:
    return QuickGELU() if name == "quick_gelu" else nn.GELU()


class Attention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's packed parameter layout
    (``in_proj_weight`` [3*width, width]) but computed with scaled_dot_product_attention."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        # (B, L, D) -> (B, heads, L, head_dim)
        q, k, v = (t.view(B, L, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out_proj(y.transpose(1, 2).reshape(B, L, D))


class ResidualBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, act: str):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, hidden)),
            ("gelu", make_activation(act)),
            ("c_proj", nn.Linear(hidden, width)),
        ]))

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal=causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, act: str):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.ModuleList(
            [ResidualBlock(width, heads, mlp_ratio, act) for _ in range(layers)]
        )

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, causal=causal)
        return x

    @torch.no_grad()
    def init_weights(self) -> None:
        # OpenAI's scheme: residual-output projections shrink with depth so the
        # residual stream's variance stays ~constant at init.
        attn_std = self.width**-0.5
        proj_std = self.width**-0.5 * (2 * self.layers) ** -0.5
        fc_std = (2 * self.width) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.zeros_(block.attn.in_proj_bias)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.out_proj.bias)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.zeros_(block.mlp.c_fc.bias)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
            nn.init.zeros_(block.mlp.c_proj.bias)


# -----------------------------------------------------------------------------
# towers


class VisionTransformer(nn.Module):
    """ViT: patchify -> [CLS] + patches + pos -> ln_pre -> transformer -> ln_post(CLS) @ proj."""

    def __init__(self, cfg: VisionConfig, embed_dim: int, act: str):
        super().__init__()
        w = cfg.width
        self.conv1 = nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        scale = w**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(w))
        self.positional_embedding = nn.Parameter(scale * torch.randn(cfg.grid_size**2 + 1, w))
        self.ln_pre = LayerNorm(w)
        self.transformer = Transformer(w, cfg.layers, cfg.heads, cfg.mlp_ratio, act)
        self.ln_post = LayerNorm(w)
        self.proj = nn.Parameter(scale * torch.randn(w, embed_dim))
        self.transformer.init_weights()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv1(images.to(self.conv1.weight.dtype))  # (B, w, g, g)
        x = x.flatten(2).transpose(1, 2)  # (B, g*g, w)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


class TextTransformer(nn.Module):
    """Causal text transformer pooled at the EOT token (the highest token id).

    Its parameters carry OpenAI's *top-level* names (``token_embedding``,
    ``transformer``, ``ln_final``, ``text_projection``); CLIP inherits from this class
    instead of nesting it, so the state_dict keys match OpenAI checkpoints as-is.
    """

    def __init__(self, cfg: TextConfig, embed_dim: int, act: str):
        super().__init__()
        self.context_length = cfg.context_length
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, act)
        self.ln_final = LayerNorm(cfg.width)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, embed_dim))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=cfg.width**-0.5)
        self.transformer.init_weights()

    def text_hidden_states(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per-position final hidden states (B, L, width), after ln_final."""
        L = tokens.shape[1]
        if L > self.context_length:
            raise ValueError(f"got {L} tokens, context_length is {self.context_length}")
        x = self.token_embedding(tokens) + self.positional_embedding[:L]
        return self.ln_final(self.transformer(x, causal=True))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.text_hidden_states(tokens)
        # The tokenizer gives EOT the highest id, so argmax finds it; under the causal
        # mask the EOT position has seen the whole caption.
        eot = tokens.argmax(dim=-1)
        return x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.encode_text(tokens)


class CLIP(TextTransformer):
    def __init__(self, cfg: CLIPConfig):
        super().__init__(cfg.text, cfg.embed_dim, cfg.act)
        self.config = cfg
        self.visual = VisionTransformer(cfg.vision, cfg.embed_dim, cfg.act)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)

    def forward(  # type: ignore[override]
        self, images: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image_features = F.normalize(self.encode_image(images), dim=-1)
        text_features = F.normalize(self.encode_text(tokens), dim=-1)
        return image_features, text_features, self.logit_scale.exp()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
