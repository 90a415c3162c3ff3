"""Image preprocessing. Train and eval share resize-type and normalisation so zero-shot
evaluation sees the same pixel statistics the model was trained on."""

from __future__ import annotations

from PIL import Image
from torchvision import transforms as T

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_rgb(image: Image.Image) -> Image.Image:
    # Module-level (not a lambda) so the transform pickles into DataLoader workers.
    return image if image.mode == "RGB" else image.convert("RGB")


def train_transform(image_size: int, scale: tuple[float, float] = (0.9, 1.0)) -> T.Compose:
    """Random resized crop (bicubic) covering `scale` of the area. The mild default and the absence
    of horizontal flips are deliberate: captions mention left/right positions and counts; open_clip
    uses scale=(0.9, 1.0) too."""
    return T.Compose([
        to_rgb,
        T.RandomResizedCrop(image_size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
        T.ToTensor(),
        T.Normalize(CLIP_MEAN, CLIP_STD),
    ])


def eval_transform(image_size: int) -> T.Compose:
    """Bicubic resize of the short side to `image_size`, then a centre crop: CLIP's eval recipe."""
    return T.Compose([
        to_rgb,
        T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(image_size),
        T.ToTensor(),
        T.Normalize(CLIP_MEAN, CLIP_STD),
    ])
