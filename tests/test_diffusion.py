import collections
import contextlib
import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import shared_file
from PIL import Image

from ric.cli import RiCCLI
from ric.diffusion.datasets import ImageFolder, ImageShards, Shapes
from ric.diffusion.models import CLIP_MAX_TOKENS, clip_tokenizer
from ric.diffusion.rewards import AestheticReward, Colourfulness, JpegCompressibility
from ric.mors import mors_keep_mask, mors_thresholds
from ric.online import read_rows

SMALL_CLIP = {
    "embed_dim": 768,
    "vision_cfg": {"width": 64, "layers": 2, "patch_size": 8, "image_size": 32, "head_width": 32},
    "text_cfg": {"width": 32, "layers": 1, "heads": 2, "context_length": 77, "vocab_size": 49408},
}
#: an even smaller SD than the quickstart's, for fast tests
TINY = {
    "unet": {"block_out_channels": [16, 32], "attention_head_dim": 8},
    "vae": {"block_out_channels": [16, 16], "norm_num_groups": 8},
    "text_encoder": {"hidden_size": 32, "intermediate_size": 64},
}


def _noise(size=64, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_clip_tokenizer_matches_open_clip():
    import open_clip

    ours, theirs = clip_tokenizer(), open_clip.get_tokenizer("ViT-L-14")
    for text in ["a photo of a cat", "three red circles, <R1> -1.2 <R2> 0.3", "naive cafe 12345 !?"]:
        ids = ours(text).input_ids
        assert ids == theirs([text])[0].tolist()[: len(ids)]
    assert len(ours) == 49408 and ours.model_max_length == CLIP_MAX_TOKENS


@pytest.fixture(scope="module")
def tiny_policy():
    from ric.diffusion.policy import DiffusionPolicy

    return DiffusionPolicy(model="tiny", tiny_config=TINY, reward_names=["compressibility", "colourfulness"],
                           resolution=16, num_inference_steps=2, generation_batch_size=4)  # fmt: skip


def test_bfloat16_frozen_parts_generate_on_cpu():
    """The paper config's ``frozen_dtype: bfloat16`` with an fp32 UNet samples on a CPU too."""
    from ric.diffusion.policy import DiffusionPolicy

    policy = DiffusionPolicy(model="tiny", tiny_config=TINY, reward_names=["compressibility", "colourfulness"],
                             resolution=16, num_inference_steps=2, frozen_dtype="bfloat16")  # fmt: skip
    assert policy.text_encoder.dtype == torch.bfloat16 and policy.unet.dtype == torch.float32
    images = policy.generate(["a red circle"] * 2, np.array([1.0, -1.0]), seed=0)
    assert [im.size for im in images] == [(16, 16)] * 2


def test_markers_survive_long_captions(tiny_policy):
    values = np.array([-1.23, 2.5])
    long = " ".join(f"shape{i} in colour{i}" for i in range(60))
    text = tiny_policy.format_prompt(long, values)
    assert len(tiny_policy.tokenizer(text).input_ids) <= CLIP_MAX_TOKENS
    caption, parsed = tiny_policy.conditioning.parse(text)
    np.testing.assert_allclose(parsed, [-1.2, 2.5])
    assert long.startswith(caption.strip()) and len(caption) > 40  # cut at a word boundary, not dropped
    longer = tiny_policy.format_prompt(" ".join(long.split()[: len(caption.split()) + 1]), values)
    assert len(tiny_policy.tokenizer(longer).input_ids) <= CLIP_MAX_TOKENS  # one more word is cut again
    short = "one red circle"
    assert tiny_policy.format_prompt(short, values) == tiny_policy.conditioning.format(short, values)


def test_caption_dropout_uses_the_empty_prompt(tiny_policy):
    seen = []
    encoder = tiny_policy.text_encoder
    hook = encoder.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    batch = tiny_policy.collate([{"prompt": "one red circle <R1> 0.1 <R2> 0.2", "response": _noise(20)}] * 3)
    try:
        loss = tiny_policy.loss(batch, dropout=0.99999)
    finally:
        hook.remove()
    assert torch.isfinite(loss)
    assert torch.equal(seen[0], tiny_policy.uncond_ids.expand(3, -1))
    assert batch["pixels"].shape == (3, 3, 16, 16) and batch["pixels"].min() >= -1


def test_min_snr_weighting_discounts_the_clean_timesteps(tiny_policy):
    """Min-SNR's weights are min(SNR, gamma) / SNR: 1 everywhere for a huge gamma (the plain loss), below 1
    where SNR > gamma (about a third of SD's timesteps for gamma = 1)."""
    batch = tiny_policy.collate([{"prompt": "one red circle <R1> 0.1 <R2> 0.2", "response": _noise(20)}] * 32)

    def loss(gamma):
        tiny_policy.hparams.snr_gamma = gamma
        torch.manual_seed(3)
        with torch.no_grad():
            return float(tiny_policy.loss(batch, dropout=0.0))

    try:
        plain, huge, one = loss(None), loss(1e12), loss(1.0)
    finally:
        tiny_policy.hparams.snr_gamma = None
    assert huge == pytest.approx(plain, rel=1e-5)
    assert 0 < one < 0.9 * plain
    with pytest.raises(ValueError, match="snr_gamma must be > 0.*got 0"):
        type(tiny_policy)(model="tiny", tiny_config=TINY, reward_names=["a", "b"], resolution=16, snr_gamma=0)


def test_noise_offset_shifts_each_channel_of_the_training_noise(tiny_policy):
    """Offset noise adds one value per (picture, channel): the spatial means of the noise the UNet learns to
    remove then vary by about offset**2 instead of 1 / positions."""
    batch = tiny_policy.collate([{"prompt": "one red circle <R1> 0.1 <R2> 0.2", "response": _noise(20)}] * 32)
    scheduler, seen = tiny_policy.noise_scheduler, []
    add_noise = scheduler.add_noise

    def means_of(offset):
        seen.clear()
        tiny_policy.hparams.noise_offset = offset
        with torch.no_grad():
            tiny_policy.loss(batch, dropout=0.0)
        return seen[0].mean(dim=(2, 3))

    scheduler.add_noise = lambda latents, noise, t: seen.append(noise) or add_noise(latents, noise, t)
    try:
        plain, offset = means_of(0.0), means_of(0.5)
    finally:
        scheduler.add_noise = add_noise
        tiny_policy.hparams.noise_offset = 0.0
    assert float(plain.var()) < 0.05 < 0.15 < float(offset.var()) < 0.45
    with pytest.raises(ValueError, match="noise_offset must be in \\[0, 1\\), got -0.1"):
        type(tiny_policy)(model="tiny", tiny_config=TINY, reward_names=["a", "b"], resolution=16, noise_offset=-0.1)


def test_aesthetic_head_loads_laion_weights():
    aesthetic = shared_file("aesthetic", "sac+logos+ava1-l14-linearMSE.pth")
    reward = AestheticReward(str(aesthetic), pretrained=None, clip_config=SMALL_CLIP)
    state = torch.load(aesthetic, map_location="cpu", weights_only=True)
    torch.testing.assert_close(reward.head.layers[7].weight, state["layers.7.weight"])
    scores = reward.score(["", "", ""], [_noise(seed=1), _noise(seed=2), Image.new("RGB", (40, 30), "red")])
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    assert len(set(scores.tolist())) > 1


def test_aesthetic_without_weights_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        AestheticReward(str(tmp_path / "missing.pth"), pretrained=None, clip_config=SMALL_CLIP)


def test_jpeg_ranks_flat_above_noise_and_colourfulness_the_other_way():
    flat, noise = Image.new("RGB", (64, 64), (90, 120, 200)), _noise()
    jpeg = JpegCompressibility().score(["", ""], [flat, noise])
    assert jpeg[0] > jpeg[1] and jpeg[1] < -50  # 512 px noise costs far more than 50 kB
    grey, colourful = Image.new("RGB", (64, 64), (128, 128, 128)), _noise()
    colour = Colourfulness().score(["", ""], [grey, colourful])
    assert colour[0] == pytest.approx(0.0) and colour[1] > 0.5


def _folder(tmp_path, n_good=3):
    folder = tmp_path / "images"
    folder.mkdir()
    lines = []
    for i in range(n_good):
        _noise(24, i).save(folder / f"{i}.png")
        lines.append({"file": f"{i}.png", "caption": f"picture {i}"})
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a picture")
    lines += [{"file": "broken.png", "caption": "broken"}, {"file": "missing.jpg", "caption": "missing"}]
    (folder / "captions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return folder


def test_corrupt_and_missing_images_are_skipped_and_counted(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="ric.diffusion.datasets"):
        records = ImageFolder(str(_folder(tmp_path))).load()
    assert [r["prompt"] for r in records] == ["picture 0", "picture 1", "picture 2"]
    assert "skipped 2 of 5 images" in caplog.text
    assert all(r["fingerprint"] for r in records)


def test_parquet_and_tar_shards(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    def png(i):
        buf = io.BytesIO()
        _noise(16, i).save(buf, format="PNG")
        return buf.getvalue()

    pq.write_table(pa.table({"image": [{"bytes": png(0), "path": None}, {"bytes": b"junk", "path": None}],
                             "caption": ["zero", "junk"]}), tmp_path / "a.parquet")  # fmt: skip
    with tarfile.open(tmp_path / "b.tar", "w") as tar:
        for name, data in [
            ("k1.png", png(1)),
            ("k1.txt", b"one"),
            ("k2.png", png(2)),
            ("k2.json", b'{"caption": "two"}'),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    parquet = ImageShards([str(tmp_path / "a.parquet")], extract_dir=str(tmp_path / "x")).load()
    assert [r["prompt"] for r in parquet] == ["zero"]  # the junk image is skipped
    shards = ImageShards([str(tmp_path / "b.tar")], extract_dir=str(tmp_path / "x")).load()
    assert [r["prompt"] for r in shards] == ["one", "two"]
    assert Image.open(shards[1]["response"]).size == (16, 16)


def test_shapes_are_deterministic_and_rewards_conflict(tmp_path):
    a = Shapes(80, 16, folder=str(tmp_path / "a")).load()
    b = Shapes(80, 16, folder=str(tmp_path / "b")).load()
    assert [r["prompt"] for r in a] == [r["prompt"] for r in b]
    assert np.array_equal(np.asarray(Image.open(a[5]["response"])), np.asarray(Image.open(b[5]["response"])))
    samples = [r["response"] for r in a]
    jpeg = JpegCompressibility(size=64).score([""] * 80, samples).numpy()
    colour = Colourfulness().score([""] * 80, samples).numpy()
    assert np.corrcoef(jpeg, colour)[0, 1] < 0


def test_shapes_leave_the_rewards_to_the_markers(tmp_path):
    """The caption (main shape and colour) explains little of either reward: pictures with one caption range
    from plain to busy and vivid, which only the markers can ask for."""
    from benchmarks.sd_diagnosis import caption_share

    records = Shapes(240, 16, folder=str(tmp_path / "s")).load()
    prompts = [r["prompt"] for r in records]
    samples = [r["response"] for r in records]
    for reward in (JpegCompressibility(size=64), Colourfulness()):
        assert caption_share(prompts, reward.score(prompts, samples).numpy()) < 0.4, reward.name


def _sd_config(tmp_path, callbacks, max_steps=3, online=False):
    cfg = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": max_steps, "logger": False,
                    "enable_progress_bar": False, "enable_model_summary": False, "limit_val_batches": 0,
                    "num_sanity_val_steps": 0, "default_root_dir": str(tmp_path / "run"), "callbacks": callbacks},
        "model": {"class_path": "ric.diffusion.policy.DiffusionPolicy",
                  "init_args": {"model": "tiny", "tiny_config": TINY, "resolution": 16, "learning_rate": 1e-3,
                                "reward_names": ["compressibility", "colourfulness"], "vae_fit_steps": 3,
                                "num_inference_steps": 2, "generation_batch_size": 8, "ema_decay": 0.9}},
        "data": {"dataset": {"class_path": "ric.diffusion.datasets.Shapes",
                             "init_args": {"count": 40, "size": 16, "folder": str(tmp_path / "shapes")}},
                 "rewards": [{"class_path": "ric.diffusion.rewards.JpegCompressibility", "init_args": {"size": 64}},
                             {"class_path": "ric.diffusion.rewards.Colourfulness"}],
                 "batch_size": 4, "val_fraction": 0.0, "test_fraction": 0.2, "max_test_prompts": 3,
                 "cache_dir": str(tmp_path / "cache"), "output_dir": str(tmp_path / "run"), "progress": False},
    }  # fmt: skip
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(cfg))
    return path


def test_tiny_sd_trains_samples_and_writes_the_grid(tmp_path):
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True}},
        {"class_path": "ric.evaluation.PreferenceSweep",
         "init_args": {"num_points": 3, "output_dir": str(tmp_path / "sweep"), "after_fit": True}},
    ]  # fmt: skip
    cli = RiCCLI(args=["fit", "--config", str(_sd_config(tmp_path, callbacks))])
    policy = cli.model
    assert cli.trainer.global_step == 3 and bool(policy.vae_fitted)
    assert policy.vae.config.scaling_factor != 0.18215  # set from the fitted latents
    before = [p.detach().clone() for p in policy.unet.parameters()]
    images = policy.generate(["one red circle on a grey background"] * 2, np.array([1.0, -1.0]))
    assert len(images) == 2 and images[0].size == (16, 16)
    assert all(torch.equal(a, b) for a, b in zip(before, policy.unet.parameters()))  # EMA swapped back
    rows = [json.loads(line) for line in (tmp_path / "sweep" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 3 and all(Path(r["response"]).is_file() for r in rows)
    grid = Image.open(tmp_path / "sweep" / "grid.png")
    assert grid.size == (3 * 98 + 2, 3 * 98 + 2 + 16)  # 3 preferences x 3 prompts of 96 px + labels
    assert (tmp_path / "sweep" / "front.png").is_file()
    # the checkpoint of a tiny model keeps the fitted VAE; evaluation from it reuses it without refitting
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert any(k.startswith("vae.") for k in ckpt["state_dict"]) and "ema" in ckpt
    test = RiCCLI(
        args=["test", "--config", str(tmp_path / "config.yaml"), "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt")]
    )
    assert test.model.vae.config.scaling_factor == pytest.approx(policy.vae.config.scaling_factor)


def test_one_online_iteration_on_tiny_sd(tmp_path):
    online = {"class_path": "ric.online.OnlineLoop",
              "init_args": {"iterations": 1, "steps_per_iteration": 2, "prompts_per_iteration": 6, "chunk_size": 4,
                            "buffer_dir": str(tmp_path / "buffer")}}  # fmt: skip
    cli = RiCCLI(args=["fit", "--config", str(_sd_config(tmp_path, [online], max_steps=2))])
    assert cli.trainer.global_step == 4
    rows = read_rows(tmp_path / "buffer" / "round0" / "rank0.jsonl")
    assert sorted(r["index"] for r in rows) == list(range(6))
    assert all(Path(r["response"]).suffix == ".png" and Path(r["response"]).is_file() for r in rows)
    summary = json.loads((tmp_path / "buffer" / "round0" / "summary.json").read_text())
    # MORS on the pictures' own scores: kept exactly those above the 0.7-quantile in some reward
    z = cli.model.reward_space.normalize(np.array([r["raw"] for r in rows]))
    kept = mors_keep_mask(z, mors_thresholds(z, 0.7))
    assert summary["generated"] == 6 and summary["kept_by_mors"] == (int(kept.sum()) if kept.any() else 6)
    pool = cli.datamodule.train_examples()
    assert len(pool) == summary["buffer_online"] + summary["buffer_original"]
    assert all(Path(e["response"]).is_file() for e in pool)


def test_lora_unet_trains_only_adapters_and_exports_a_pipeline(tmp_path):
    from ric.diffusion.models import load_pretrained
    from ric.diffusion.policy import DiffusionPolicy

    policy = DiffusionPolicy(model="tiny", tiny_config=TINY, resolution=16, lora_r=4, reward_names=["a", "b"])
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
    batch = policy.collate([{"prompt": "a red circle <R1> 0.1 <R2> 0.2", "response": _noise(20)}] * 2)
    policy.loss(batch, dropout=0.0).backward()
    assert all(p.grad is not None for n, p in policy.named_parameters() if p.requires_grad)
    with torch.no_grad():  # a non-zero adapter, so fusing it changes the exported weights
        for name, p in policy.unet.named_parameters():
            if "lora_B" in name:
                p.fill_(0.01)
    x, t, h = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 77, 32)
    with torch.no_grad():
        expected = policy.unet(x, t, h).sample
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    folder = policy.export(tmp_path / "export")
    assert json.loads((folder / "ric.json").read_text())["conditioning"]["reward_names"] == ["a", "b"]
    # the live policy is as it was: adapters unfused, the same weights, still trainable
    assert policy.state_dict().keys() == before.keys()
    assert all(torch.equal(v, policy.state_dict()[k]) for k, v in before.items())
    assert [n for n, p in policy.named_parameters() if p.requires_grad] == trainable
    reloaded = load_pretrained(str(folder))
    with torch.no_grad():
        torch.testing.assert_close(reloaded.unet(x, t, h).sample, expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(policy.unet(x, t, h).sample, expected)


def test_trained_text_encoder_learns_is_averaged_and_exported(tmp_path):
    """``train_text_encoder``: the loss reaches the text encoder, EMA tracks it after the UNet, and an
    export writes its EMA weights (the live policy keeps its own)."""
    from ric.diffusion.models import load_pretrained
    from ric.diffusion.policy import DiffusionPolicy

    frozen = DiffusionPolicy(model="tiny", tiny_config=TINY, resolution=16, reward_names=["a", "b"])
    assert not any(p.requires_grad for p in frozen.text_encoder.parameters())
    policy = DiffusionPolicy(
        model="tiny", tiny_config=TINY, resolution=16, reward_names=["a", "b"], train_text_encoder=True,
        ema_decay=0.5, frozen_dtype="bfloat16",
    )  # fmt: skip
    encoder = list(policy.text_encoder.parameters())
    assert policy.text_encoder.dtype == torch.float32 and policy.vae.dtype == torch.bfloat16
    assert policy.trained_parameters()[-len(encoder) :] == encoder
    batch = policy.collate([{"prompt": "a red circle <R1> 0.1 <R2> 0.2", "response": _noise(20)}] * 2)
    policy.loss(batch, dropout=0.0).backward()
    embedding = policy.text_encoder.get_input_embeddings().weight
    assert embedding.grad is not None and embedding.grad.abs().sum() > 0
    policy.ema.step(policy.trained_parameters())  # diffusers' first EMA step copies the weights
    with torch.no_grad():
        for p in encoder:
            p.add_(1.0)  # the live weights move away from the EMA's
    policy.ema.step(policy.trained_parameters())  # a weighted mean of old and new
    live = embedding.detach().clone()
    shadow = policy.ema.shadow_params[len(policy.trained_parameters()) - len(encoder)]
    folder = policy.export(tmp_path / "export")
    exported = load_pretrained(str(folder)).text_encoder.get_input_embeddings().weight
    torch.testing.assert_close(exported, shadow)
    assert not torch.allclose(exported, live)
    torch.testing.assert_close(embedding.detach(), live)


@contextlib.contextmanager
def counting():
    """Counts the ops dispatched inside the block, by overload."""
    ops = collections.Counter()

    class Count(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops[func] += 1
            return func(*args, **(kwargs or {}))

    with Count():
        yield ops


def test_unet_adapters_add_their_product_inside_the_matmul(tmp_path):
    """The UNet's LoRA layers are fused like the text policy's: the same loss and adapter gradients as
    peft's forward, in float32 and under bf16 autocast (to rounding), with the same noise."""
    from ric.adapters import FusedLoraLinear, unfuse_adapters
    from ric.diffusion.policy import DiffusionPolicy

    policy = DiffusionPolicy(model="tiny", tiny_config=TINY, resolution=16, lora_r=4, reward_names=["a", "b"])
    assert policy.fused_adapters and all(type(m) is FusedLoraLinear for m in policy.fused_adapters)
    with torch.no_grad():  # a non-zero adapter, so its product matters
        for name, p in policy.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    batch = policy.collate([{"prompt": "a red circle <R1> 0.1 <R2> 0.2", "response": _noise(20)}] * 2)

    def step(autocast):
        policy.zero_grad()
        torch.manual_seed(3)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), counting() as ops:
            loss = policy.loss(batch, dropout=0.0)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in policy.trained_parameters()], ops

    fused = {autocast: step(autocast) for autocast in (False, True)}
    assert all(ops[torch.ops.aten.addmm_.default] == len(policy.fused_adapters) for *_, ops in fused.values())
    unfuse_adapters(policy.fused_adapters)
    for autocast, tol in ((False, 1e-5), (True, 0.1)):  # bf16: three roundings of the product vs one
        loss, grads, ops = step(autocast)
        assert ops[torch.ops.aten.addmm_.default] == 0
        torch.testing.assert_close(fused[autocast][0], loss, rtol=tol / 5, atol=tol / 5)
        for ours, theirs in zip(fused[autocast][1], grads):
            torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol * theirs.abs().max().item())


def test_killed_image_round_resumes_with_every_picture_once(tmp_path, monkeypatch):
    from test_online import crash_on_chunk

    from ric.diffusion.policy import DiffusionPolicy

    ckpt = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True, "every_n_train_steps": 1},
    }
    online = {"class_path": "ric.online.OnlineLoop",
              "init_args": {"iterations": 1, "steps_per_iteration": 1, "prompts_per_iteration": 6, "chunk_size": 2,
                            "buffer_dir": str(tmp_path / "buffer")}}  # fmt: skip
    config = _sd_config(tmp_path, [ckpt, online], max_steps=1)
    crash_on_chunk(monkeypatch, DiffusionPolicy, 2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        RiCCLI(args=["fit", "--config", str(config)])
    monkeypatch.undo()
    buffer = tmp_path / "buffer" / "round0"
    first = read_rows(buffer / "rank0.jsonl")
    pictures = {r["response"]: Path(r["response"]).read_bytes() for r in first}
    assert len(first) == 2
    RiCCLI(args=["fit", "--config", str(config), "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt")])
    rows = read_rows(buffer / "rank0.jsonl")
    assert sorted(r["index"] for r in rows) == list(range(6))
    assert len({r["response"] for r in rows}) == 6 and len(list((buffer / "samples").glob("*.png"))) == 6
    assert all(Path(p).read_bytes() == data for p, data in pictures.items())  # finished pictures untouched


def test_checkpoints_of_a_pretrained_model_hold_only_trained_weights(tmp_path):
    from ric.diffusion.policy import DiffusionPolicy

    folder = DiffusionPolicy(model="tiny", tiny_config=TINY, resolution=16, reward_names=["a", "b"]).export(
        tmp_path / "sd"
    )  # a diffusers folder, loaded below as a pretrained model
    for lora_r in (0, 4):
        policy = DiffusionPolicy(model=str(folder), resolution=16, reward_names=["a", "b"], lora_r=lora_r)
        assert policy.pretrained
        checkpoint = {"state_dict": policy.state_dict()}
        policy.on_save_checkpoint(checkpoint)
        keys = set(checkpoint["state_dict"])
        assert keys == {n for n, p in policy.named_parameters() if p.requires_grad}
        assert all(k.startswith("unet.") for k in keys) and (lora_r == 0 or all("lora" in k for k in keys))
        assert checkpoint["ric"]["conditioning"]["reward_names"] == ["a", "b"]


def test_sweep_noise_is_shared_across_preferences_and_online_noise_is_fresh(tiny_policy):
    from ric.rollout import rollout

    prompts, settings = ["a red circle", "a blue square"], {"num_inference_steps": 2, "guidance_scale": 1.0}
    targets = np.zeros((2, 2))
    # the sweep: each preference's rollout starts from the sweep's seed, so the noise is the same
    same = [np.asarray(im) for im in rollout(tiny_policy, prompts, targets, settings=settings, seed=0).samples]
    again = [np.asarray(im) for im in rollout(tiny_policy, prompts, targets, settings=settings, seed=0).samples]
    assert all(np.array_equal(a, b) for a, b in zip(same, again))
    # online chunks: no seed, fresh noise from the global stream for each
    first, second = (rollout(tiny_policy, prompts, targets, settings=settings).samples for _ in range(2))
    assert not any(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, second))


def test_reward_guidance_over_the_markers_in_one_unet_call_per_step(tiny_policy):
    from ric.diffusion.guidance import MarkerGuidedUNet

    prompts, desired = ["a red circle", "a blue square"], np.array([[1.0, -1.0], [-0.5, 0.5]])
    settings = {"num_inference_steps": 3, "seed": 0}
    plain = [np.asarray(im) for im in tiny_policy.generate(prompts, desired, **settings)]
    same = tiny_policy.generate(prompts, desired, **settings, guidance=0.0, guidance_reference="mirror")
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(plain, same))  # g = 0: today's images
    batches = []
    hook = tiny_policy.unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        guided = tiny_policy.generate(prompts, desired, **settings, guidance=2.0, guidance_reference="mirror")
    finally:
        hook.remove()
    assert batches == [6] * 3  # unconditioned, conditioned and reference rows together, once per step
    assert not all(np.array_equal(a, np.asarray(b)) for a, b in zip(plain, guided))
    # the pipeline's conditioned rows come back as eps_R + g (eps_R - eps_ref); the unconditioned ones untouched
    unet = tiny_policy.unet
    torch.manual_seed(0)
    x, t = torch.randn(4, unet.config.in_channels, 8, 8), torch.tensor(5)
    width = unet.config.cross_attention_dim
    states, reference = torch.randn(4, 77, width), torch.randn(2, 77, width)
    with torch.no_grad():
        out = MarkerGuidedUNet(unet, reference, 1.5)(x, t, states, return_dict=False)[0]
        eps = unet(x, t, states).sample
        eps_ref = unet(x[2:], t, reference).sample
    torch.testing.assert_close(out[:2], eps[:2], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[2:], eps[2:] + 1.5 * (eps[2:] - eps_ref), atol=1e-4, rtol=1e-4)
