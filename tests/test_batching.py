"""Continuous batching (ric.text.batching) on a small random-initialized Llama with a LoRA adapter."""

import numpy as np
import pytest
import torch

from ric.text.batching import ContinuousBatcher, Request, Sampling
from ric.text.policy import TextPolicy

PROMPTS = ["short", "a considerably longer prompt with many more words in it", "mid length prompt", "q", "two words"]


@pytest.fixture(scope="module")
def policy(tiny_llama):
    torch.manual_seed(0)
    p = TextPolicy(model=tiny_llama, reward_names=["a", "b"], template="Q: {prompt} {rewards}\nA:", lora_r=4,
                   lora_alpha=8, max_new_tokens=10)  # fmt: skip
    with torch.no_grad():  # a non-zero adapter, so merging it matters
        for name, param in p.lm.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    return p


def both(policy, prompts, desired, **settings):
    out = {}
    for mode in ("continuous", "static"):
        policy.hparams.generation_batching = mode
        torch.manual_seed(3)
        out[mode] = policy.generate(prompts, desired, **settings)
    policy.hparams.generation_batching = "continuous"
    return out["continuous"], out["static"]


@pytest.mark.parametrize("batch_size", [1, 2, 3, 16])
def test_greedy_answers_equal_the_static_path_with_any_mix_of_preferences(policy, batch_size):
    """Fewer rows than prompts: prompts join the running batch as others finish, at other widths."""
    prompts = PROMPTS * 2
    desired = np.random.default_rng(0).normal(size=(len(prompts), 2))
    continuous, static = both(policy, prompts, desired, do_sample=False, batch_size=batch_size)
    assert continuous == static
    assert len({len(a) for a in continuous}) > 1


def test_a_seed_gives_the_same_samples_whatever_shares_the_batch(policy):
    desired = np.random.default_rng(1).normal(size=(len(PROMPTS), 2))
    torch.manual_seed(5)
    first = policy.generate(PROMPTS, desired, batch_size=2)
    torch.manual_seed(5)
    again = policy.generate(PROMPTS, desired, batch_size=2)
    torch.manual_seed(5)
    wide = policy.generate(PROMPTS, desired, batch_size=16)
    torch.manual_seed(6)
    other = policy.generate(PROMPTS, desired, batch_size=2)
    assert first == again == wide
    assert first != other


def test_settings_the_engine_lacks_use_the_static_path(policy):
    desired = np.zeros((2, 2))
    continuous, static = both(policy, PROMPTS[:2], desired, do_sample=False, repetition_penalty=1.3)
    assert continuous == static


def engine_requests(policy, n, max_new_tokens=12):
    ids = policy.prompt_ids(PROMPTS[:n], np.zeros((n, 2)))
    return [Request(i, max_new_tokens, Sampling(0.7, 0.9), seed=k) for k, i in enumerate(ids)]


def test_rows_are_freed_for_waiting_prompts_and_cancelled_ones_leave(policy):
    policy.eval()
    engine = policy.batcher(2)
    long, short, waiting, cancelled = engine_requests(policy, 4)
    long.max_new_tokens, short.max_new_tokens, waiting.max_new_tokens = 40, 2, 3
    finished_at = {}
    for r in (long, short, waiting, cancelled):
        engine.submit(r)
    steps = 0
    engine.cancel(cancelled)
    while engine.busy():
        assert engine.running <= 2
        for r in engine.step():
            finished_at[id(r)] = steps
        steps += 1
    assert cancelled.finish_reason == "cancelled" and cancelled.tokens == []
    assert finished_at[id(short)] < finished_at[id(waiting)] < finished_at[id(long)]
    assert long.finish_reason in ("stop", "length")
    assert steps < 40 + 5  # the waiting prompt ran beside the long one, not after it


def test_a_prompt_submitted_mid_decoding_joins_and_streams(policy):
    policy.eval()
    engine = policy.batcher(4)
    first, late = engine_requests(policy, 2, max_new_tokens=30)
    late.max_new_tokens = 3
    seen = []
    late.on_token = lambda r: seen.append(len(r.tokens))
    engine.submit(first)
    for _ in range(3):
        engine.step()
    engine.submit(late)
    while not late.finished:
        engine.step()
    assert not first.finished or len(first.tokens) < 30
    assert seen == sorted(seen) and len(seen) >= 1


def test_cache_budget_limits_who_joins(policy):
    policy.eval()
    requests = engine_requests(policy, 4)
    width = max(len(r.ids) for r in requests)
    engine = policy.batcher(4)
    engine.max_batch_tokens = 2 * width
    for r in requests:
        engine.submit(r)
    engine.step()
    assert engine.running + sum(r.finished for r in requests) <= 2 and engine.waiting == 2


def test_bad_engine_settings_are_refused(policy, tiny_llama):
    with pytest.raises(ValueError, match="generation_batching must be 'continuous' or 'static', got 'dynamic'"):
        TextPolicy(model=tiny_llama, reward_names=["a"], generation_batching="dynamic")
    with pytest.raises(ValueError, match="max_batch_tokens must be >= 1"):
        TextPolicy(model=tiny_llama, reward_names=["a"], max_batch_tokens=0)
    with pytest.raises(ValueError, match="max_batch_size must be >= 1, got 0"):
        ContinuousBatcher(policy.lm, 0, 1, max_batch_size=0)
    with pytest.raises(ValueError, match="at least one prompt token"):
        policy.batcher().submit(Request([], 4))


def test_a_rollout_hands_on_chunks_as_samples_finish_and_returns_them_in_order(policy):
    from ric.rollout import rollout

    prompts = PROMPTS * 3
    targets = np.random.default_rng(2).normal(size=(len(prompts), 2))
    chunks = []
    result = rollout(policy, prompts, targets, indices=range(1, len(prompts)), chunk_size=4, seed=9,
                     settings={"batch_size": 3}, on_chunk=lambda idx, out, raw: chunks.append((idx, out)))  # fmt: skip
    assert result.indices == list(range(1, len(prompts)))
    handed = [i for idx, _ in chunks for i in idx]
    assert sorted(handed) == result.indices and [len(idx) for idx, _ in chunks] == [4, 4, 4, 2]
    by_index = {i: x for idx, out in chunks for i, x in zip(idx, out)}
    assert [by_index[i] for i in result.indices] == result.samples
    again = rollout(policy, prompts, targets, indices=range(1, len(prompts)), seed=9, settings={"batch_size": 3})
    assert again.samples == result.samples


def test_sampling_defaults_follow_generate_and_unsupported_config_entries_use_the_static_path(policy, monkeypatch):
    from ric.text.batching import DEFAULT_TOP_K

    config = policy.lm.generation_config
    monkeypatch.setattr(config, "top_k", None)
    (request,) = policy.batching_requests([[1, 2, 3]], policy.sampling_settings({}))
    assert request.sampling.top_k == DEFAULT_TOP_K and request.sampling.temperature == policy.hparams.temperature
    (greedy,) = policy.batching_requests([[1, 2, 3]], policy.sampling_settings({"do_sample": False}))
    assert not greedy.sampling.do_sample
    assert policy.streams({})
    monkeypatch.setattr(config, "repetition_penalty", 1.3)
    assert not policy.streams({})
    continuous, static = both(policy, PROMPTS[:3], np.zeros((3, 2)), do_sample=False)
    assert continuous == static


# ---- reward guidance ------------------------------------------------------------------------------------
def manual_guided_greedy(policy, prompt, desired, reference, g, max_new_tokens):
    """Greedy decoding from ``(1 + g) l(y | x, R) - g l(y | x, R_ref)``, each logit from its own full forward."""
    cond = policy.prompt_ids([prompt], desired[None])[0]
    ref = policy.prompt_ids([prompt], None if reference is None else reference[None])[0]
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            lc = policy.lm(input_ids=torch.tensor([cond + out])).logits[0, -1].float()
            lr = policy.lm(input_ids=torch.tensor([ref + out])).logits[0, -1].float()
            token = int(((1 + g) * lc - g * lr).argmax())
            if token == policy.tokenizer.eos_token_id:
                break
            out.append(token)
    return policy.decode_answer(out)


@pytest.mark.parametrize("reference", ["neutral", "mirror", "none"])
def test_guided_greedy_answers_follow_the_guided_logits(policy, reference):
    """Every prompt with its own desired rewards in one batch; the engine's answer is the one the formula gives."""
    prompts = PROMPTS[:4]
    desired = np.random.default_rng(2).normal(size=(len(prompts), 2)) * 2
    g = 1.5
    with policy.generation_session():
        got = policy.generate(prompts, desired, do_sample=False, guidance=g, guidance_reference=reference,
                              batch_size=5, max_new_tokens=8)  # fmt: skip
        refs = {"neutral": np.zeros_like(desired), "mirror": -desired, "none": [None] * len(prompts)}[reference]
        expected = [manual_guided_greedy(policy, p, d, r, g, 8) for p, d, r in zip(prompts, desired, refs)]
    assert got == expected
    plain = policy.generate(prompts, desired, do_sample=False, batch_size=5, max_new_tokens=8)
    assert plain != got  # guidance changed something


def test_zero_guidance_gives_todays_samples(policy):
    desired = np.random.default_rng(3).normal(size=(len(PROMPTS), 2))
    torch.manual_seed(9)
    today = policy.generate(PROMPTS, desired, batch_size=4)
    torch.manual_seed(9)
    zero = policy.generate(PROMPTS, desired, batch_size=4, guidance=0.0, guidance_reference="mirror")
    torch.manual_seed(9)
    guided = policy.generate(PROMPTS, desired, batch_size=4, guidance=2.0)
    assert zero == today and guided != today


def test_guided_and_reference_rows_share_one_forward_pass(policy, monkeypatch):
    prompts = PROMPTS[:3]
    desired = np.random.default_rng(4).normal(size=(3, 2))
    rows = []
    forward = policy.lm.forward

    def counting(*args, **kwargs):
        rows.append((kwargs["input_ids"].shape[0], kwargs["input_ids"].shape[1]))
        return forward(*args, **kwargs)

    monkeypatch.setattr(policy.lm, "forward", counting)
    torch.manual_seed(0)
    policy.generate(prompts, desired, guidance=1.0, batch_size=6, max_new_tokens=5)
    guided_calls = list(rows)
    rows.clear()
    torch.manual_seed(0)
    policy.generate(prompts, desired, batch_size=6, max_new_tokens=5)
    assert guided_calls[0] == (6, guided_calls[0][1])  # one prefill: 3 prompts and their 3 references
    decode = [n for n, width in guided_calls[1:] if width == 1]
    assert decode and all(n % 2 == 0 for n in decode) and decode[0] == 6  # a row and its reference, together
    assert len(guided_calls) <= len(rows) + 5  # no second pass per step: as many forwards as plain decoding


def test_engine_mixes_guided_and_plain_requests(policy):
    ids = policy.prompt_ids(PROMPTS[:3], np.ones((3, 2)))
    refs = policy.prompt_ids(PROMPTS[:3], np.zeros((3, 2)))
    greedy = Sampling(do_sample=False)
    with policy.generation_session():
        alone = policy.batcher(4).run([Request(list(i), 6, greedy) for i in ids])
        engine = policy.batcher(8)
        mixed = engine.run([Request(list(ids[0]), 6, greedy), Request(list(ids[1]), 6, greedy, reference_ids=refs[1],
                            guidance=2.0), Request(list(ids[2]), 6, greedy)])  # fmt: skip
    assert mixed[0].tokens == alone[0].tokens and mixed[2].tokens == alone[2].tokens
    assert mixed[1].partner is not None and mixed[1].partner.tokens == mixed[1].tokens  # fed the same tokens
    assert not engine.busy()


def test_guidance_settings_are_checked(policy):
    desired = np.zeros((1, 2))
    with pytest.raises(ValueError, match="guidance must be a number >= 0"):
        policy.check_sampling({"guidance": -1.0})
    with pytest.raises(ValueError, match=r"guidance_reference must be one of \['neutral', 'mirror', 'none'\]"):
        policy.check_sampling({"guidance_reference": "opposite"})
    with pytest.raises(ValueError, match="reward guidance needs reward markers"):
        policy.generate(["q"], None, guidance=1.0)
    policy.hparams.generation_batching = "static"
    try:
        with pytest.raises(ValueError, match="reward guidance decodes on the continuous engine"):
            policy.generate(["q"], desired, guidance=1.0)
        assert policy.generate(["q"], desired, guidance=0.0, max_new_tokens=2)  # 0: nothing to refuse
    finally:
        policy.hparams.generation_batching = "continuous"
    with pytest.raises(ValueError, match="max_batch_size must be >= 2"):
        policy.batcher(1).submit(Request([1, 2], 3, reference_ids=[1], guidance=1.0))
    none = policy.reference_ids(["q"], np.array([[1.0, -1.0]]), {"guidance": 1.0, "guidance_reference": "none"})
    mirror = policy.reference_ids(["q"], np.array([[1.0, -1.0]]), {"guidance": 1.0, "guidance_reference": "mirror"})
    assert "<R1>" not in policy.tokenizer.decode(none[0]) and "<R1> -1.0 <R2> 1.0" in policy.tokenizer.decode(mirror[0])
