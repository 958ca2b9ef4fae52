"""Reward-conditioned Stable Diffusion: the caption carries reward markers, the UNet learns
``eps(x_t | caption + markers)``; sampling with DDIM and classifier-free guidance at desired rewards."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from ric.adapters import fuse_adapters
from ric.conditioning import RewardConditioning
from ric.diffusion.images import as_image, image_grid, resize_center_crop, to_tensor
from ric.diffusion.models import CLIP_MAX_TOKENS, build_tiny, load_pretrained
from ric.distributed import seed_for_rank
from ric.interfaces import DTYPES, ConditionalPolicy
from ric.optim import adamw_with_schedule

UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


class DiffusionPolicy(ConditionalPolicy):
    """Conditioned fine-tuning of a Stable Diffusion UNet (paper section 4.4); the VAE is frozen, and so is
    the text encoder unless ``train_text_encoder``.

    Args:
        model: hub name or local diffusers folder (SD v1.5 by default), or ``tiny`` for small
            random-initialized components of the same classes (CPU quickstart, tests).
        tiny_config: per-component overrides of the tiny sizes (``vae``, ``unet``, ``text_encoder``,
            ``scheduler``; see :data:`ric.diffusion.models.TINY_DEFAULTS`).
        reward_names, template, markers, decimals, conditioned: the conditioning (see
            :class:`ric.conditioning.RewardConditioning`); markers are appended after the caption, which is
            cut so that caption + markers fit CLIP's 77 tokens.
        resolution: training and sampling side in pixels (images: shortest side resized, centre crop).
        lora_r: 0 trains the full UNet (the paper); > 0 trains LoRA adapters on its attention projections.
        caption_dropout: probability of training on the empty prompt (classifier-free guidance; paper 0.05).
        ema_decay: keep an exponential moving average of the trained weights and sample with it.
        snr_gamma: weight each step's loss by min(SNR(t), gamma) / SNR(t) (Min-SNR, Hang et al. 2023; gamma 5
            there): the nearly clean timesteps stop dominating the gradient, so a short run learns faster.
            ``None`` (default, the paper) weights every timestep alike.
        noise_offset: add this much noise shared by all pixels of a channel to the training noise (offset
            noise, Guttenberg 2023): SD's last timestep still leaks the picture's mean, so without it a model
            is hardly taught to choose a picture's overall colour (a flat or a saturated background). 0
            (default, the paper) adds none.
        train_text_encoder: train the text encoder with the UNet (the paper keeps SD's frozen: a pretrained
            CLIP already tells "0.1" from "0.9"; a random one embeds the reward markers almost alike, so the
            tiny model needs it trained to read them).
        frozen_dtype: dtype of the frozen VAE (and of the text encoder when it is not trained).
        vae_fit_steps: tiny models only: first fit the random VAE as an autoencoder on the training images for
            this many steps (a random decoder cannot show what the UNet learned).
        num_inference_steps, guidance_scale, eta, generation_batch_size: DDIM sampling defaults (paper: 50,
            7.5, 0).
        seed: the tiny model's random weights, the VAE fit and the sweep's sampling noise (the same for every
            preference); online generation draws its noise from torch's global generator.
    """

    inference_overrides: ClassVar[dict[str, Any]] = {"gradient_checkpointing": False}
    sampling_keys: ClassVar[frozenset[str] | None] = frozenset(
        {"num_inference_steps", "guidance_scale", "eta", "batch_size", "seed", "guidance", "guidance_reference"}
    )

    def __init__(
        self,
        model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5",
        reward_names: Sequence[str] = ("aesthetic", "compressibility"),
        template: str = "{prompt} {rewards}",
        markers: Sequence[str] | None = None,
        decimals: int = 1,
        conditioned: bool = True,
        tiny_config: dict[str, dict[str, Any]] | None = None,
        revision: str | None = None,
        variant: str | None = None,
        resolution: int = 512,
        lora_r: int = 0,
        lora_alpha: int = 16,
        lora_target_modules: Sequence[str] = UNET_ATTENTION,
        caption_dropout: float = 0.05,
        ema_decay: float | None = None,
        snr_gamma: float | None = None,
        noise_offset: float = 0.0,
        train_text_encoder: bool = False,
        frozen_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        gradient_checkpointing: bool = False,
        learning_rate: float = 1e-5,
        weight_decay: float = 0.01,
        lr_scheduler: str = "constant",
        warmup_steps: int = 0,
        vae_fit_steps: int = 0,
        vae_fit_lr: float = 1e-3,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        eta: float = 0.0,
        generation_batch_size: int = 8,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not 0 <= caption_dropout < 1:
            raise ValueError(f"caption_dropout must be in [0, 1), got {caption_dropout}")
        if resolution < 8 or resolution % 8:
            raise ValueError(f"resolution must be a positive multiple of 8, got {resolution}")
        if ema_decay is not None and not 0 < ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1), got {ema_decay}")
        if snr_gamma is not None and not snr_gamma > 0:
            raise ValueError(f"snr_gamma must be > 0 (or None for no weighting), got {snr_gamma}")
        if not 0 <= noise_offset < 1:
            raise ValueError(f"noise_offset must be in [0, 1), got {noise_offset}")
        if lora_r < 0 or (lora_r > 0 and lora_alpha <= 0):
            raise ValueError(
                f"lora_r must be >= 0 (0 trains the full UNet) and lora_alpha > 0, got {lora_r} / {lora_alpha}"
            )
        if vae_fit_steps < 0:
            raise ValueError(f"vae_fit_steps must be >= 0, got {vae_fit_steps}")
        self.check_sampling(
            {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale, "eta": eta},
            "DiffusionPolicy",
        )
        if generation_batch_size < 1:
            raise ValueError(f"DiffusionPolicy.generation_batch_size must be >= 1, got {generation_batch_size}")
        self.conditioning = RewardConditioning(
            list(reward_names), template=template, markers=markers, decimals=decimals
        )
        self.conditioned = conditioned
        if model == "tiny":
            parts = build_tiny(resolution, tiny_config, seed)
        else:
            if tiny_config is not None:
                raise ValueError("tiny_config only applies to model: tiny")
            if vae_fit_steps:
                raise ValueError("vae_fit_steps only applies to model: tiny (a pretrained VAE is never refitted)")
            parts = load_pretrained(model, revision, variant)
        self.pretrained = parts.pretrained
        self.tokenizer = parts.tokenizer
        self.noise_scheduler = parts.scheduler
        self.vae = parts.vae.requires_grad_(False).to(DTYPES[frozen_dtype]).eval()
        if train_text_encoder:  # trained in float32 like the UNet
            self.text_encoder = parts.text_encoder.float().requires_grad_(True)
        else:
            self.text_encoder = parts.text_encoder.requires_grad_(False).to(DTYPES[frozen_dtype]).eval()
        self.unet = parts.unet
        if lora_r > 0:
            from peft import LoraConfig

            self.unet.requires_grad_(False)
            self.unet.add_adapter(
                LoraConfig(
                    r=lora_r,
                    lora_alpha=lora_alpha,
                    target_modules=list(lora_target_modules),
                    init_lora_weights="gaussian",
                )
            )
        self.fused_adapters = fuse_adapters(self.unet)  # the adapters' products added inside the base matmuls
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.ema = None
        if ema_decay is not None:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.trained_parameters(), decay=ema_decay)
        self.register_buffer("vae_fitted", torch.tensor(False), persistent=True)
        self.register_buffer("uncond_ids", self.tokenize([""]), persistent=False)
        # a checkpoint of a pretrained model holds only the trained weights (UNet or its LoRA, and EMA)
        self.strict_loading = False

    def trained_parameters(self, unet: Any = None, text_encoder: Any = None) -> list[torch.nn.Parameter]:
        """The weights training changes, which EMA tracks, in EMA's order: the UNet's (all, or its LoRA
        adapters), then the text encoder's when it is trained. ``unet`` / ``text_encoder``: copies of this
        policy's modules to list instead (an export's)."""
        modules = [self.unet if unet is None else unet, self.text_encoder if text_encoder is None else text_encoder]
        return [p for m in modules for p in m.parameters() if p.requires_grad]

    # ---- prompts ------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(
            list(texts), padding="max_length", max_length=CLIP_MAX_TOKENS, truncation=True, return_tensors="pt"
        ).input_ids

    def _num_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, truncation=False, verbose=False).input_ids)

    def format_prompt(self, prompt: Any, values: np.ndarray | None) -> str:
        """Caption + markers within CLIP's 77 tokens: the caption is cut at a word boundary (the longest
        prefix that fits, found by bisection), never the markers."""
        text = super().format_prompt(prompt, values)
        if values is None or self._num_tokens(text) <= CLIP_MAX_TOKENS:
            return text
        words = str(prompt).split()
        lo, hi = 0, len(words)  # words[:lo] fits, words[:hi] does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            fits = self._num_tokens(super().format_prompt(" ".join(words[:mid]), values)) <= CLIP_MAX_TOKENS
            lo, hi = (mid, hi) if fits else (lo, mid)
        text = super().format_prompt(" ".join(words[:lo]), values)
        if self._num_tokens(text) > CLIP_MAX_TOKENS:
            raise ValueError(f"the reward markers alone exceed CLIP's {CLIP_MAX_TOKENS} tokens: {text!r}")
        return text

    # ---- data ---------------------------------------------------------------------------------
    def load_pixels(self, image: Any) -> torch.Tensor:
        return to_tensor(resize_center_crop(as_image(image), self.hparams.resolution))

    def collate(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        return {
            "pixels": torch.stack([self.load_pixels(e["response"]) for e in examples]),
            "input_ids": self.tokenize([e["prompt"] for e in examples]),
        }

    def training_cost(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        # an image and its caption's tokens (CLIP's full 77: the text encoder reads them all)
        return {"training_examples": int(batch["pixels"].shape[0]), "training_tokens": int(batch["input_ids"].numel())}

    # ---- training -----------------------------------------------------------------------------
    def loss(self, batch: dict[str, torch.Tensor], dropout: float) -> torch.Tensor:
        """The denoising loss (epsilon or v target, as the scheduler predicts) on a conditioned batch."""
        pixels, ids = batch["pixels"], batch["input_ids"]
        with torch.no_grad():
            latents = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.sample()
            latents = latents.float() * self.vae.config.scaling_factor
            if dropout > 0:
                drop = torch.rand(ids.shape[0], device=ids.device) < dropout
                ids = torch.where(drop[:, None], self.uncond_ids.to(ids.device), ids)
        with torch.set_grad_enabled(self.hparams.train_text_encoder and torch.is_grad_enabled()):
            hidden = self.text_encoder(ids)[0]
        noise = torch.randn_like(latents)
        if self.hparams.noise_offset:
            noise = noise + self.hparams.noise_offset * torch.randn(
                *latents.shape[:2], 1, 1, device=latents.device, dtype=latents.dtype
            )
        steps = self.noise_scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (latents.shape[0],), device=latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, t)
        else:
            target = noise
        dtype = self.unet.dtype  # fp32 under autocast; bf16 when DeepSpeed casts the module
        pred = self.unet(noisy.to(dtype), t, hidden.to(dtype)).sample
        if self.hparams.snr_gamma is None:
            return F.mse_loss(pred.float(), target.float())
        from diffusers.training_utils import compute_snr

        snr = compute_snr(self.noise_scheduler, t)
        weight = snr.clamp(max=self.hparams.snr_gamma)
        weight = weight / (snr + 1 if self.noise_scheduler.config.prediction_type == "v_prediction" else snr)
        per_example = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
        return (per_example * weight).mean()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch, self.hparams.caption_dropout)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["pixels"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch, 0.0)
        self.log("val/loss", loss, prog_bar=True, batch_size=batch["pixels"].shape[0], sync_dist=True)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.to(self.device)
            self.ema.step(self.trained_parameters())

    def configure_optimizers(self) -> Any:
        h = self.hparams
        return adamw_with_schedule(self, h.learning_rate, h.weight_decay, h.lr_scheduler, h.warmup_steps)

    def on_fit_start(self) -> None:
        if self.hparams.vae_fit_steps and not bool(self.vae_fitted):
            self.fit_vae(self.trainer.datamodule.train_records)

    def fit_vae(self, records: Sequence[dict[str, Any]], batch_size: int = 32) -> float:
        """Fit the tiny model's random VAE as an autoencoder on the training images, then set its latent
        scaling factor to 1/std of the latents (SD's 0.18215 plays that role); returns the final MSE."""
        from tqdm.auto import tqdm

        images = torch.stack([self.load_pixels(r["response"]) for r in records[:4096]]).to(self.device)
        vae = self.vae.float().requires_grad_(True).train()
        optimizer = torch.optim.Adam(vae.parameters(), lr=self.hparams.vae_fit_lr)
        gen = torch.Generator().manual_seed(self.hparams.seed)
        mse = float("nan")
        steps = tqdm(range(self.hparams.vae_fit_steps), desc="fitting the tiny VAE", unit="step")
        for _ in steps:
            idx = torch.randint(0, len(images), (min(batch_size, len(images)),), generator=gen)
            posterior = vae.encode(images[idx]).latent_dist
            recon = vae.decode(posterior.sample()).sample
            loss = F.mse_loss(recon, images[idx]) + 1e-6 * posterior.kl().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            mse = float(loss.detach())
            steps.set_postfix(mse=f"{mse:.4f}")
        vae.requires_grad_(False).eval().to(DTYPES[self.hparams.frozen_dtype])
        with torch.no_grad():
            latents = torch.cat(
                [vae.encode(images[i : i + 64].to(vae.dtype)).latent_dist.mean for i in range(0, len(images), 64)]
            )
        vae.register_to_config(scaling_factor=float(1.0 / latents.float().std()))
        self.vae_fitted.fill_(True)
        return mse

    # ---- checkpoints --------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.pretrained:  # a tiny model's frozen parts (its fitted VAE) exist only in the checkpoint
            self.keep_trained_weights(checkpoint)
        checkpoint["vae_scaling_factor"] = float(self.vae.config.scaling_factor)
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if "vae_scaling_factor" in checkpoint:
            self.vae.register_to_config(scaling_factor=checkpoint["vae_scaling_factor"])
        if self.ema is not None and "ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["ema"])

    # ---- generation ---------------------------------------------------------------------------
    def pipeline(self, unet: torch.nn.Module | None = None):
        """A diffusers pipeline over this policy's modules (``unet`` in place of its own: reward guidance's), with
        a DDIM scheduler."""
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet if unet is None else unet,
            scheduler=DDIMScheduler.from_config(self.noise_scheduler.config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        desired_rewards: np.ndarray | None = None,
        **sampling: Any,
    ) -> list[Image.Image]:
        """One image per prompt, in batches; DDIM with classifier-free guidance. ``sampling`` may override
        num_inference_steps, guidance_scale, eta, batch_size and seed (default: drawn from torch's global
        generator, so successive calls, e.g. an online round's chunks, start from different noise), and set
        reward guidance over the markers: ``guidance`` (g, 0 = none) against ``guidance_reference`` (default
        ``neutral``; see :mod:`ric.diffusion.guidance`)."""
        h = self.hparams
        self.check_sampling(sampling)
        texts = self.condition(prompts, desired_rewards)
        guidance = float(sampling.get("guidance", 0.0))
        references = None
        if guidance:
            reference = self.reference_rewards(desired_rewards, sampling.get("guidance_reference", "neutral"))
            references = self.condition(prompts, reference)
        batch_size = int(sampling.get("batch_size", h.generation_batch_size))
        device = self.unet.device  # where DeepSpeed / the strategy placed the weights
        seed = sampling.get("seed")
        if seed is None:  # a draw from the global generator (seeded by seed_everything): calls differ
            seed = int(torch.randint(0, 2**31 - 1, ()))
        # ranks start with the same generators: each samples its own noise
        generator = torch.Generator(device).manual_seed(seed_for_rank(seed))
        pipe = self.pipeline()
        # frozen parts in half precision hand the pipeline half-precision embeddings: autocast keeps the UNet's
        # matmuls in step (CPU autocast takes bfloat16 only)
        autocast = h.frozen_dtype != "float32" and (device.type == "cuda" or h.frozen_dtype == "bfloat16")
        was_training = self.unet.training
        self.unet.eval()
        if self.ema is not None:
            self.ema.to(device)
            self.ema.store(self.trained_parameters())
            self.ema.copy_to(self.trained_parameters())
        out: list[Image.Image] = []
        try:
            with torch.autocast(device.type, dtype=DTYPES[h.frozen_dtype], enabled=autocast):
                for start in range(0, len(texts), batch_size):
                    if references is not None:
                        from ric.diffusion.guidance import MarkerGuidedUNet

                        chunk = references[start : start + batch_size]
                        embeds = pipe.encode_prompt(chunk, device, 1, do_classifier_free_guidance=False)[0]
                        pipe = self.pipeline(MarkerGuidedUNet(self.unet, embeds, guidance))
                    result = pipe(
                        prompt=texts[start : start + batch_size],
                        height=h.resolution,
                        width=h.resolution,
                        num_inference_steps=int(sampling.get("num_inference_steps", h.num_inference_steps)),
                        guidance_scale=float(sampling.get("guidance_scale", h.guidance_scale)),
                        eta=float(sampling.get("eta", h.eta)),
                        generator=generator,
                        output_type="pil",
                    )
                    out.extend(result.images)
        finally:
            if self.ema is not None:
                self.ema.restore(self.trained_parameters())
            self.unet.train(was_training)
        return out

    def store_samples(self, samples: Sequence[Any], folder: Path, names: Sequence[str]) -> list[str]:
        """PNG files under ``folder``; the buffer and results hold their paths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for image, name in zip(samples, names):
            path = folder / f"{name}.png"
            tmp = path.with_suffix(".tmp.png")
            as_image(image).save(tmp)
            tmp.replace(path)
            paths.append(str(path.resolve()))
        return paths

    def save_gallery(
        self, prompts: Sequence[Any], preferences: np.ndarray, samples: Sequence[Sequence[Any]], folder: Path
    ) -> Path:
        """``grid.png``: one row per prompt (up to 8), one column per preference, labelled with w_1."""
        first: dict[str, int] = {}
        for i, prompt in enumerate(prompts):
            first.setdefault(str(prompt), i)
        rows = list(first.values())[:8]
        cell, band = 96, 16
        grid = image_grid([[samples[k][i] for k in range(len(samples))] for i in rows], cell=cell)
        canvas = Image.new("RGB", (grid.width, grid.height + band), "white")
        canvas.paste(grid, (0, band))
        draw = ImageDraw.Draw(canvas)
        for k, w in enumerate(preferences):
            label = "no markers" if not np.all(np.isfinite(w)) else f"w1={w[0]:.2f}"
            draw.text((2 + k * (cell + 2) + 4, 2), label, fill="black")
        path = Path(folder) / "grid.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        canvas.save(path)
        return path

    def export(self, path: str | Path, merge: bool = True) -> Path:
        """A diffusers pipeline folder (a copy of the UNet with its LoRA fused and the EMA weights if kept;
        the live policy is not changed) plus ``ric.json`` and a model card. ``merge=False`` is not offered:
        a pipeline folder always holds the full UNet."""
        import copy

        from diffusers import StableDiffusionPipeline

        path = Path(path)
        unet, text_encoder = copy.deepcopy(self.unet), copy.deepcopy(self.text_encoder)
        if self.ema is not None:
            self.ema.copy_to(self.trained_parameters(unet, text_encoder))
        if self.hparams.lora_r > 0:
            unet.fuse_lora()
            unet.unload_lora()
        pipe = self.pipeline()
        StableDiffusionPipeline(**{**pipe.components, "unet": unet, "text_encoder": text_encoder}).save_pretrained(path)
        self.save_ric_metadata(path, export={"merged": True, "base": None})
        return path

    @classmethod
    def from_export(cls, folder: Path, meta: dict[str, Any], **overrides: Any) -> DiffusionPolicy:
        """An export loads as a pretrained pipeline folder with the recorded sampling settings."""
        init = dict((meta.get("policy") or {}).get("init_args") or {})
        if not init:  # schema 1 recorded the conditioning only
            c = meta.get("conditioning") or {}
            init = {k: c[k] for k in ("reward_names", "template", "markers", "decimals") if k in c}
            init["conditioned"] = meta.get("conditioned", True)
        init.update(model=str(folder), tiny_config=None, revision=None, variant=None, lora_r=0, ema_decay=None,
                    vae_fit_steps=0, gradient_checkpointing=False)  # fmt: skip
        init.update(overrides)
        return cls(**init)
