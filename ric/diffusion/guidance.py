"""Reward guidance for images: classifier-free guidance over the reward markers alone, beside the caption's.

Stable Diffusion's classifier-free guidance contrasts the caption with the empty prompt. Reward guidance adds
a contrast between the caption with the desired rewards ``R`` and the same caption with a reference condition
``R_ref`` (the neutral point, the mirror of ``R``, or no markers), so the markers are amplified and the caption
is not: ``eps = guided(R) + g (guided(R) - guided(R_ref))``, the text policy's formula applied to the guided
noise prediction. :class:`MarkerGuidedUNet` does it inside the diffusers pipeline's own sampling loop: it runs
the reference rows in the same UNet call as the pipeline's rows.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput


class MarkerGuidedUNet(torch.nn.Module):
    """A UNet whose conditioned prediction is pushed away from a reference condition's by ``g`` times their
    difference. The pipeline hands it its batch (the unconditioned rows, then the conditioned ones; the
    conditioned ones alone without caption guidance); it appends the conditioned rows' latents with the
    reference embeddings, so one forward pass serves all."""

    def __init__(self, unet: torch.nn.Module, reference_embeds: torch.Tensor, guidance: float) -> None:
        super().__init__()
        self.unet = unet
        self.config = unet.config
        self.reference_embeds = reference_embeds
        self.guidance = float(guidance)

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def forward(self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor,
                *args: Any, return_dict: bool = True, **kwargs: Any) -> Any:  # fmt: skip
        rows = self.reference_embeds.shape[0]
        reference = self.reference_embeds.to(encoder_hidden_states.dtype)
        eps = self.unet(torch.cat([sample, sample[-rows:]]), timestep, torch.cat([encoder_hidden_states, reference]),
                        *args, return_dict=False, **kwargs)[0]  # fmt: skip
        eps, eps_reference = eps[:-rows], eps[-rows:]
        conditioned = eps[-rows:]
        eps = torch.cat([eps[:-rows], conditioned + self.guidance * (conditioned - eps_reference)])
        return UNet2DConditionOutput(sample=eps) if return_dict else (eps,)
