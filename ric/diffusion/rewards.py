"""Image rewards (paper section 4.4): LAION aesthetic score and JPEG compressibility, plus colourfulness,
an offline reward that conflicts with compressibility for the CPU quickstart.

Each takes a batch of images (PIL, paths, arrays or tensors; see :func:`ric.diffusion.images.as_image`)
and returns one float per image.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from ric.diffusion.images import as_image
from ric.rewards import RewardModel


def jpeg_kilobytes(image: Image.Image, quality: int = 95, size: int | None = 512) -> float:
    """Size in kB of the image saved as JPEG at ``quality`` after resizing to ``size x size``."""
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.tell() / 1000.0


class JpegCompressibility(RewardModel):
    """``-(JPEG bytes at quality 95 of the image resized to 512x512) / 1000``: higher = more compressible."""

    def __init__(self, name: str = "compressibility", quality: int = 95, size: int | None = 512, batch_size: int = 64):
        super().__init__(name, batch_size)
        if not 1 <= quality <= 100:
            raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
        self.quality = quality
        self.size = size

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, quality={self.quality}, size={self.size}"

    def score_batch(self, prompts: Sequence[Any], samples: Sequence[Any]) -> torch.Tensor:
        return torch.tensor([-jpeg_kilobytes(as_image(s), self.quality, self.size) for s in samples])


def colourfulness(image: Image.Image) -> float:
    """Hasler & Suesstrunk's colourfulness metric on 0..255 RGB: ``std_rgyb + 0.3 * mean_rgyb`` with
    ``rg = R - G`` and ``yb = (R + G) / 2 - B``."""
    rgb = np.asarray(image, dtype=np.float64)
    rg = rgb[..., 0] - rgb[..., 1]
    yb = 0.5 * (rgb[..., 0] + rgb[..., 1]) - rgb[..., 2]
    std = np.hypot(rg.std(), yb.std())
    mean = np.hypot(rg.mean(), yb.mean())
    return float(std + 0.3 * mean)


class Colourfulness(RewardModel):
    """Colourfulness / 100 (roughly 0..1.5): many saturated colours cost JPEG bytes, so it conflicts with
    compressibility."""

    def __init__(self, name: str = "colourfulness", batch_size: int = 64) -> None:
        super().__init__(name, batch_size)

    def score_batch(self, prompts: Sequence[Any], samples: Sequence[Any]) -> torch.Tensor:
        return torch.tensor([colourfulness(as_image(s)) / 100.0 for s in samples])


class AestheticHead(nn.Module):
    """The LAION aesthetic predictor v2 MLP (768-1024-128-64-16-1); indices match its state dict keys."""

    def __init__(self, dim: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.layers(embedding)


class AestheticReward(RewardModel):
    """LAION aesthetic score: OpenAI CLIP ViT-L/14 image embedding, L2-normalized, into the LAION MLP.

    Args:
        head: path to the MLP weights (``sac+logos+ava1-l14-linearMSE.pth``).
        clip_model: open_clip architecture name.
        pretrained: open_clip tag (``openai``) or a local checkpoint path; ``None`` leaves the tower randomly
            initialized (tests only).
        clip_config: build ``open_clip.CLIP(**clip_config)`` instead of a named architecture (small random
            towers for tests); its ``embed_dim`` must match the head's 768 inputs.
    """

    def __init__(
        self,
        head: str,
        name: str = "aesthetic",
        clip_model: str = "ViT-L-14",
        pretrained: str | None = "openai",
        clip_config: dict[str, Any] | None = None,
        batch_size: int = 32,
    ) -> None:
        super().__init__(name, batch_size)
        head_path = Path(head)
        if not head_path.is_file():
            raise FileNotFoundError(
                f"aesthetic head weights not found at {head!r}: download sac+logos+ava1-l14-linearMSE.pth (LAION "
                f"improved-aesthetic-predictor) and pass its path as `head`"
            )
        import open_clip

        self.head_path = str(head_path)
        self.clip_model = clip_model
        self.pretrained = pretrained
        if clip_config is not None:
            self.clip = open_clip.CLIP(**clip_config)
            size = self.clip.visual.image_size
            size = size[0] if isinstance(size, (tuple, list)) else size
            self.preprocess = open_clip.image_transform(size, is_train=False)
        else:
            self.clip, _, self.preprocess = open_clip.create_model_and_transforms(clip_model, pretrained=pretrained)
        del self.clip.transformer  # the text tower is never used
        self.head = AestheticHead()
        state = torch.load(head_path, map_location="cpu", weights_only=True)
        try:
            self.head.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(f"{head!r} is not a LAION aesthetic head state dict: {err}") from None
        out_dim = self.clip.visual.output_dim
        if out_dim != 768:
            raise ValueError(f"the aesthetic head takes 768-d CLIP embeddings, but {clip_model!r} gives {out_dim}-d")
        self.requires_grad_(False)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, clip={self.clip_model!r}, pretrained={self.pretrained!r}, head={self.head_path!r}"
        )

    def score_batch(self, prompts: Sequence[Any], samples: Sequence[Any]) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(as_image(s)) for s in samples]).to(self.device)
        emb = self.clip.encode_image(pixels).float()
        emb = emb / emb.norm(dim=-1, keepdim=True)
        return self.head(emb).squeeze(-1)
