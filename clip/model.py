"""CLIP: a ViT (or OpenAI ModifiedResNet) image tower and a causal text transformer
trained into one embedding space.

Parameter names follow OpenAI's released state_dict exactly (``visual.conv1.weight``,
``transformer.resblocks.0.attn.in_proj_weight``, ``text_projection``, ...) so their
checkpoints can be loaded later without a key-renaming table. Internally we run
batch-first. Self-attention uses ``F.scaled_dot_product_attention`` (flash / memory-efficient
kernels) except on CPU for CLIP's short sequences, where two batched matmuls and a softmax are
faster (see ``Attention``); the ViT's patch embedding is a matmul over non-overlapping patches
(the ``conv1`` parameter keeps its OpenAI name and shape).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# -----------------------------------------------------------------------------
# configs


@dataclass
class VisionConfig:
    """Image tower shape.

    ``layers`` as an int selects a ViT with that many blocks. ``layers`` as a list of four
    ints (e.g. ``[3, 4, 6, 3]``) selects OpenAI's ModifiedResNet with that many Bottleneck
    blocks per stage; then ``width`` is the stem width (64 for RN50), the attention-pool
    width is ``32 * width``, ``heads`` are the attention-pool heads, and the total stride
    (and so ``patch_size``) is always 32.
    """

    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    layers: int | list[int] = 12
    heads: int = 12
    mlp_ratio: float = 4.0

    @property
    def is_resnet(self) -> bool:
        return isinstance(self.layers, (list, tuple))

    @property
    def grid_size(self) -> int:
        return self.image_size // (RESNET_STRIDE if self.is_resnet else self.patch_size)

    @property
    def attention_width(self) -> int:
        """Width of the tower's attention (ViT blocks, or the ResNet attention pool)."""
        return self.width * RESNET_WIDTH_MULT if self.is_resnet else self.width


RESNET_STRIDE = 32  # stem /4, then layer2..4 each /2
RESNET_WIDTH_MULT = 32  # layer4 output channels = 8 * width * Bottleneck.expansion(4)


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
        v = self.vision
        if v.is_resnet:
            v.layers = [int(n) for n in v.layers]
            if len(v.layers) != 4 or min(v.layers) < 1:
                raise ValueError(f"ResNet vision.layers must be 4 positive ints, got {v.layers}")
            if v.patch_size != RESNET_STRIDE:
                raise ValueError(f"ResNet vision.patch_size must be {RESNET_STRIDE} (its stride)")
        for name, width, heads in (("vision", v.attention_width, v.heads),
                                   ("text", self.text.width, self.text.heads)):
            if width % heads:
                raise ValueError(f"{name} attention width {width} not divisible by heads {heads}")
        if v.image_size % v.patch_size:
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


# On CPU, explicit attention (bmm, softmax, bmm) beats F.scaled_dot_product_attention's flash
# kernel for short sequences. Measured on 2 AVX512-BF16 cores, forward+backward, batch 8: in bf16 it
# is 3-4x faster at CLIP's lengths (50 / 77 tokens) and still ahead at 577 (the flash backward is
# slow in bf16); in fp32 it is ~10-30 % faster up to ~200 tokens and slower beyond. The L x L
# probabilities it stores are small at these lengths.
EXPLICIT_ATTENTION_MAX_LEN_FP32 = 128


def _explicit_attention(x: torch.Tensor, length: int) -> bool:
    if x.device.type != "cpu":
        return False
    return x.dtype == torch.bfloat16 or (x.dtype == torch.float32 and length <= EXPLICIT_ATTENTION_MAX_LEN_FP32)


class Attention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's packed parameter layout
    (``in_proj_weight`` [3*width, width]); scaled dot-product attention, computed by
    ``F.scaled_dot_product_attention`` or, on CPU for short sequences, by explicit batched
    matmuls whose scores and softmax are fp32 whatever the input dtype."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        B, L, D = x.shape
        H, hd = self.heads, D // self.heads
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, L, 3*D)
        if _explicit_attention(qkv, L):
            # one copy into (3, B*H, L, hd): contiguous batches for bmm
            q, k, v = qkv.view(B, L, 3, H, hd).permute(2, 0, 3, 1, 4).reshape(3, B * H, L, hd)
            # scores and softmax in fp32, as SDPA's kernels keep them: bf16 scores (3 significant
            # digits before the exponential) cost the tiny config 3.7 % of final loss; the L x L
            # products are ~1 % of a block's FLOPs, so fp32 here is nearly free
            with torch.autocast(q.device.type, enabled=False):
                q32, k32 = q.float(), k.float()
                if causal:  # -inf above the diagonal: position i sees 0..i
                    bias = torch.full((L, L), float("-inf"), device=q.device).triu_(1)
                    scores = torch.baddbmm(bias, q32, k32.transpose(1, 2), alpha=hd**-0.5)
                else:  # beta=0: the input is ignored, the scale rides on the matmul
                    scores = torch.baddbmm(q32.new_zeros(()), q32, k32.transpose(1, 2), beta=0.0, alpha=hd**-0.5)
                probs = torch.softmax(scores, dim=-1).to(v.dtype)
            y = torch.bmm(probs, v).view(B, H, L, hd)
        else:
            # (B, L, D) -> (B, heads, L, head_dim)
            q, k, v = (t.view(B, L, H, hd).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
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
        self.grad_checkpointing = False  # recompute block activations in backward: less memory

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        for block in self.resblocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, causal, use_reentrant=False)
            else:
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

    def patch_embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, (H/p)*(W/p), width): ``conv1`` (kernel = stride = p, no bias) as one
        matmul over flattened patches. Same result as the convolution (up to summation order) at
        about half its cost on CPU, forward and backward; sizes that are not a multiple of p (the
        convolution drops the border) go through the convolution."""
        weight = self.conv1.weight
        images = images.to(weight.dtype)
        B, C, H, W = images.shape
        p = weight.shape[-1]
        if H % p or W % p:
            return self.conv1(images).flatten(2).transpose(1, 2)
        gh, gw = H // p, W // p
        patches = images.reshape(B, C, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C * p * p)
        return F.linear(patches, weight.reshape(weight.shape[0], -1))  # the kernel's (C, p, p) order

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)  # (B, g*g, w)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


class Bottleneck(nn.Module):
    """ResNet bottleneck (1x1 -> 3x3 -> 1x1, expansion 4) with OpenAI's anti-aliased
    stride: strided blocks average-pool before conv3 and before the 1x1 downsample conv,
    and every conv is stride 1."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride > 1 or inplanes != out:
            # key names "-1" / "0" / "1" match OpenAI's state_dict (the pool has no params)
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride) if stride > 1 else nn.Identity()),
                ("0", nn.Conv2d(inplanes, out, 1, bias=False)),
                ("1", nn.BatchNorm2d(out)),
            ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu1(self.bn1(self.conv1(x)))
        y = self.relu2(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(self.avgpool(y)))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu3(y + shortcut)


class AttentionPool2d(nn.Module):
    """Pool a feature map with one attention query: the spatial mean (plus its position
    embedding) attends over [mean, every position]; then c_proj to the output dim."""

    def __init__(self, grid: int, width: int, heads: int, out_dim: int):
        super().__init__()
        self.heads = heads
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, width) / width**0.5)
        self.k_proj = nn.Linear(width, width)
        self.q_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.c_proj = nn.Linear(width, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2).transpose(1, 2)  # (B, H*W, C)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
        x = x + self.positional_embedding.to(x.dtype)
        B, L, C = x.shape
        hd = C // self.heads
        q = self.q_proj(x[:, :1]).view(B, 1, self.heads, hd).transpose(1, 2)
        k = self.k_proj(x).view(B, L, self.heads, hd).transpose(1, 2)
        v = self.v_proj(x).view(B, L, self.heads, hd).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, heads, 1, hd)
        return self.c_proj(y.transpose(1, 2).reshape(B, C))


class ModifiedResNet(nn.Module):
    """OpenAI's CLIP ResNet: 3-conv stem + avgpool, four Bottleneck stages with
    anti-aliased strides, and attention pooling instead of global average pooling."""

    def __init__(self, cfg: VisionConfig, embed_dim: int):
        super().__init__()
        w = cfg.width
        self.conv1 = nn.Conv2d(3, w // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w // 2)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(w // 2, w // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(w // 2)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(w // 2, w, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(w)
        self.relu3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)
        inplanes = w
        for i, blocks in enumerate(cfg.layers):
            planes = w * 2**i
            stage = [Bottleneck(inplanes, planes, stride=1 if i == 0 else 2)]
            inplanes = planes * Bottleneck.expansion
            stage += [Bottleneck(inplanes, planes) for _ in range(blocks - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.attnpool = AttentionPool2d(cfg.grid_size, cfg.attention_width, cfg.heads, embed_dim)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        # OpenAI's scheme: attention-pool projections ~ N(0, width^-1/2), and each
        # block's last BatchNorm starts at zero so residual blocks begin as identity.
        std = self.attnpool.c_proj.in_features**-0.5
        for lin in (self.attnpool.q_proj, self.attnpool.k_proj, self.attnpool.v_proj,
                    self.attnpool.c_proj):
            nn.init.normal_(lin.weight, std=std)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                nn.init.zeros_(block.bn3.weight)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.conv1.weight.dtype)
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.avgpool(self.relu3(self.bn3(self.conv3(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.attnpool(x)


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
        self.visual: nn.Module
        if cfg.vision.is_resnet:
            self.visual = ModifiedResNet(cfg.vision, cfg.embed_dim)
        else:
            self.visual = VisionTransformer(cfg.vision, cfg.embed_dim, cfg.act)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)

    def forward(  # type: ignore[override]
        self, images: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # normalised in fp32: under bf16 autocast the towers' outputs carry ~3 significant digits
        image_features = F.normalize(self.encode_image(images).float(), dim=-1)
        text_features = F.normalize(self.encode_text(tokens).float(), dim=-1)
        return image_features, text_features, self.logit_scale.exp()

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Activation checkpointing in every transformer (ViT and text tower); the ResNet tower's
        convolutions are left alone."""
        for module in self.modules():
            if isinstance(module, Transformer):
                module.grad_checkpointing = enabled

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
