"""Continuous batching for a causal LM: finished sequences leave the running batch and waiting prompts join it.

A static batch decodes until its longest answer ends, so short answers leave their rows idle; here a row is
retired as soon as its answer ends and a waiting prompt takes its place. The running batch keeps one
transformers ``DynamicCache`` whose rows are left-padded so that every row's tokens end in the same column:
a decoding step is then an ordinary batched forward with a padding mask. Joining prompts are prefilled
together (identical prompts once) and their cache rows are padded to the batch's width and appended; retired
rows are dropped with an index select, and columns no live row uses are trimmed away.

Every request samples from a ``torch.Generator`` of its own, seeded when it is submitted, so its sample
depends on its prompt, its settings and its seed, not on which other requests share its batch. A request with
reward guidance brings a reference prompt: it decodes in a row of its own beside the request's, fed the same
tokens, and the request samples from ``l + g * (l - l_ref)`` (both rows in the same forward pass). Callers
outside the decoding thread may :meth:`ContinuousBatcher.submit` and :meth:`ContinuousBatcher.cancel` at any
time (a server does); :meth:`ContinuousBatcher.step` runs one decoding step.
"""

from __future__ import annotations

import inspect
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.generation.logits_process import (
    ClassifierFreeGuidanceLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

#: sampling settings the engine implements itself; others need the static path (transformers ``generate``)
ENGINE_SETTINGS = frozenset(
    {"max_new_tokens", "temperature", "top_p", "top_k", "do_sample", "guidance", "guidance_reference"}
)
#: generation-config entries the engine does not implement, with the value that leaves sampling unchanged (a
#: model whose config sets another value uses the static path, where ``generate`` applies it)
NEUTRAL_CONFIG: dict[str, object] = {
    "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "typical_p": 1.0, "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0, "no_repeat_ngram_size": 0, "min_length": 0, "min_new_tokens": 0, "renormalize_logits": False,
    "min_p": None, "top_h": None, "bad_words_ids": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
    "exponential_decay_length_penalty": None, "suppress_tokens": None, "begin_suppress_tokens": None,
    "sequence_bias": None,
}  # fmt: skip
#: ``generate``'s top-k when neither the call nor the model's config sets one
DEFAULT_TOP_K = 50


def config_needs_static(config: object) -> list[str]:
    """The entries of a generation config that change sampling in ways the engine does not implement."""
    return sorted(k for k, neutral in NEUTRAL_CONFIG.items() if getattr(config, k, None) not in (None, neutral))


@dataclass(frozen=True)
class Sampling:
    """How one request draws its tokens (``do_sample=False``: greedy)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    do_sample: bool = True


@dataclass(eq=False)
class Request:
    """One prompt to continue: its token ids, limits, sampling and seed; ``tokens`` grows as it decodes.
    ``on_token(request)`` is called after each new token (from the decoding thread), ``finish_reason`` is
    set when it ends: ``stop`` (end-of-sequence token), ``length`` (``max_new_tokens``) or ``cancelled``.
    ``reference_ids`` with ``guidance > 0``: reward guidance against that prompt (see the module)."""

    ids: list[int]
    max_new_tokens: int
    sampling: Sampling = Sampling()
    seed: int = 0
    on_token: Callable[[Request], None] | None = None
    reference_ids: list[int] | None = None
    guidance: float = 0.0
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    cancelled: bool = False
    #: the row decoding ``reference_ids`` beside this request (set by the engine), or the request a
    #: reference row serves
    partner: Request | None = field(default=None, repr=False)
    is_reference: bool = False

    @property
    def guided(self) -> bool:
        return self.guidance > 0 and self.reference_ids is not None and not self.is_reference

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class ContinuousBatcher:
    """Decodes submitted requests in one running batch of at most ``max_batch_size`` rows.

    Args:
        lm: a transformers causal LM (or a peft model around one) whose layers use ``DynamicLayer`` caches.
        eos_token_id: ends a sequence (it is kept out of ``tokens``).
        pad_token_id: fed to retired rows until they are dropped.
        max_batch_size: rows decoding at once.
        max_batch_tokens: the running batch's cache, rows x padded width, stays within this many tokens when
            prompts join (``None``: no limit but the rows).
    """

    def __init__(
        self,
        lm: torch.nn.Module,
        eos_token_id: int,
        pad_token_id: int,
        max_batch_size: int = 32,
        max_batch_tokens: int | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_batch_tokens is not None and max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1 or None, got {max_batch_tokens}")
        self.lm = lm
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.device = lm.get_input_embeddings().weight.device
        base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
        self._cache_arg = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
        self._lock = threading.Lock()
        self._waiting: deque[Request] = deque()
        self._rows: list[Request] = []
        self._generators: list[torch.Generator] = []
        self._cache: DynamicCache | None = None
        self._mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)  # [rows, width]
        self._positions = torch.zeros(0, dtype=torch.long, device=self.device)  # next token's position per row
        self._next = torch.zeros(0, dtype=torch.long, device=self.device)  # next token fed per row

    # ---- requests -------------------------------------------------------------------------------------
    def submit(self, request: Request) -> Request:
        if not request.ids:
            raise ValueError("a request needs at least one prompt token")
        if request.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}")
        if request.guidance < 0 or (request.guidance > 0 and not request.reference_ids):
            raise ValueError(f"guidance {request.guidance} needs a number >= 0 and, above 0, reference prompt ids")
        if request.guided:
            if self.max_batch_size < 2:
                raise ValueError("reward guidance decodes two rows per request: max_batch_size must be >= 2")
            request.partner = Request(list(request.reference_ids), request.max_new_tokens, request.sampling,
                                      is_reference=True, partner=request)  # fmt: skip
        with self._lock:
            self._waiting.append(request)
        return request

    def cancel(self, request: Request) -> None:
        """Stop ``request`` at the next step (waiting or running); its row is freed."""
        request.cancelled = True

    @property
    def running(self) -> int:
        """Rows decoding (a guided request's reference row included: it takes a row)."""
        return sum(not r.finished for r in self._rows)

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._waiting)

    def busy(self) -> bool:
        return self.running > 0 or self.waiting > 0

    def run(self, requests: Sequence[Request]) -> list[Request]:
        """Submit ``requests`` (in this order) and decode until all have finished."""
        for request in requests:
            self.submit(request)
        while self.busy():
            self.step()
        return list(requests)

    # ---- decoding --------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[Request]:
        """Admit waiting prompts where there is room, then decode one token for every running row; returns
        the requests that finished (or were cancelled) during this step."""
        done: list[Request] = []
        for request in self._rows:
            if request.cancelled and not request.finished:
                request.finish_reason = "cancelled"
                done.append(request)
                if request.partner is not None:
                    request.partner.finish_reason = "cancelled"
        done += self._admit()
        live = [i for i, r in enumerate(self._rows) if not r.finished]
        if not live:
            self._drop_finished()
            return [r for r in done if not r.is_reference]
        width = self._mask.shape[1]
        mask = torch.cat([self._mask, torch.ones_like(self._mask[:, :1])], dim=1)
        logits, self._cache = self._forward(
            input_ids=self._next[:, None],
            attention_mask=mask,
            position_ids=self._positions[:, None],
            cache=self._cache,
            cache_position=torch.tensor([width], device=self.device),
        )
        self._mask = mask
        self._positions = self._positions + 1
        rows = [self._rows[i] for i in live]
        tokens = self._sample(logits[live] if len(live) < len(self._rows) else logits, rows,
                              [self._generators[i] for i in live])  # fmt: skip
        for i, token in zip(live, tokens):
            if self._append(self._rows[i], token):
                done.append(self._rows[i])
        self._next = self._next.clone()
        self._next[live] = torch.tensor(tokens, dtype=torch.long, device=self.device)
        finished = sum(r.finished for r in self._rows)
        if finished and finished * 4 >= len(self._rows):  # dropping rows copies the cache: not for every one
            self._drop_finished()
        return [r for r in done if not r.is_reference]

    def _forward(self, cache: DynamicCache, **inputs: torch.Tensor | int) -> tuple[torch.Tensor, DynamicCache]:
        """The model's last-position logits and its cache; the cache argument is named ``cache`` from
        transformers 5.x (``past_key_values`` before)."""
        out = self.lm(**inputs, **{self._cache_arg: cache}, use_cache=True)
        return out.logits[:, -1], out["cache"] if "cache" in out else out.past_key_values

    def _append(self, request: Request, token: int) -> bool:
        """Record ``token`` for ``request``; True if that ended it."""
        if token == self.eos_token_id:
            request.finish_reason = "stop"
        else:
            request.tokens.append(token)
            if len(request.tokens) >= request.max_new_tokens:
                request.finish_reason = "length"
        if request.on_token is not None:
            request.on_token(request)
        return request.finished

    def _sample(self, logits: torch.Tensor, requests: list[Request], generators: list[torch.Generator]) -> list[int]:
        """One token for each request (``logits[k]`` are ``requests[k]``'s), each from its own generator;
        requests with the same settings are warped together with transformers' logits warpers. A guided
        request samples from its guided logits; its reference row (which must be among ``requests``) is given
        the same token."""
        references = [k for k, request in enumerate(requests) if request.is_reference]
        position = {id(request): k for k, request in enumerate(requests)} if references else {}
        logits = guide(logits.float(), requests, position)
        groups: dict[Sampling, list[int]] = {}
        for k, request in enumerate(requests):
            if not request.is_reference:
                groups.setdefault(request.sampling, []).append(k)
        picked: list[torch.Tensor] = []
        order: list[int] = []
        for sampling, members in groups.items():
            index = torch.tensor(members, device=logits.device)
            scores = logits.index_select(0, index)
            order += members
            if not sampling.do_sample:
                picked.append(scores.argmax(dim=-1))
                continue
            for warper in warpers(sampling):
                scores = warper(None, scores)
            probs = torch.softmax(scores, dim=-1)
            ids = None
            if sampling.top_k and sampling.top_k < probs.shape[-1]:  # only the top k can be drawn: draw among them
                probs, ids = probs.topk(sampling.top_k, dim=-1)
            for row, k in enumerate(members):
                draw = torch.multinomial(probs[row], 1, generator=generators[k])
                picked.append(draw if ids is None else ids[row, draw])
        out = [0] * len(requests)
        for k, token in zip(order, torch.cat(picked).tolist() if picked else []):  # one transfer from the device
            out[k] = token
        for k in references:
            out[k] = out[position[id(requests[k].partner)]]
        return out

    # ---- joining and leaving ------------------------------------------------------------------------------
    def _admit(self) -> list[Request]:
        """Prefill waiting prompts into free rows: when the batch is empty, or a quarter of it (at least
        one row) is free, so prefills come in groups rather than one per step."""
        with self._lock:
            if not self._waiting:
                return []
            live = self.running
            free = self.max_batch_size - live
            if free < 1 or (live and free < min(len(self._waiting), max(1, self.max_batch_size // 4))):
                return []
            self._drop_finished()
            width = self._mask.shape[1]
            taken: list[Request] = []
            cancelled: list[Request] = []
            while self._waiting and len(taken) < free:
                request = self._waiting[0]
                if request.cancelled:
                    request.finish_reason = "cancelled"
                    cancelled.append(self._waiting.popleft())
                    continue
                group = [request] if request.partner is None else [request, request.partner]
                if len(taken) + len(group) > free:
                    break
                new_width = max(width, *(len(r.ids) for r in (*taken, *group)))
                rows = live + len(taken) + len(group)
                if taken and self.max_batch_tokens and rows * new_width > self.max_batch_tokens:
                    break
                self._waiting.popleft()
                taken += group
        if not taken:
            return cancelled
        try:
            return cancelled + self._prefill(taken)
        except BaseException:  # the prompts wait again; the running batch is as it was
            with self._lock:
                self._waiting.extendleft(reversed([r for r in taken if not r.is_reference]))
            raise

    def _prefill(self, requests: list[Request]) -> list[Request]:
        """Prefill ``requests`` (each distinct prompt once), sample their first tokens and add their rows."""
        prompts: dict[tuple[int, ...], int] = {}
        source = [prompts.setdefault(tuple(r.ids), len(prompts)) for r in requests]
        unique = list(prompts)
        length = max(len(p) for p in unique)
        ids = torch.full((len(unique), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(unique), length), dtype=torch.long)
        for row, prompt in enumerate(unique):
            ids[row, length - len(prompt) :] = torch.tensor(prompt)
            mask[row, length - len(prompt) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        logits, cache = self._forward(
            input_ids=ids, attention_mask=mask, position_ids=positions, cache=DynamicCache(), logits_to_keep=1
        )
        check_layers(cache)
        pick = torch.tensor(source, device=self.device)
        generators = [torch.Generator(self.device).manual_seed(r.seed) for r in requests]
        tokens = self._sample(logits.index_select(0, pick), requests, generators)
        if len(unique) < len(requests) or source != list(range(len(unique))):
            cache.batch_select_indices(pick)
        self._merge(cache, mask.index_select(0, pick), positions[:, -1].index_select(0, pick) + 1)
        self._rows += requests
        self._generators += generators
        self._next = torch.cat([self._next, torch.tensor(tokens, dtype=torch.long, device=self.device)])
        ended = [request for request, token in zip(requests, tokens) if self._append(request, token)]
        return [request for request in ended if not request.is_reference]

    def _merge(self, cache: DynamicCache, mask: torch.Tensor, positions: torch.Tensor) -> None:
        """Append prefilled rows to the running batch, left-padding whichever side is narrower."""
        if self._cache is None:
            self._cache, self._mask, self._positions = cache, mask, positions
            return
        width = max(self._mask.shape[1], mask.shape[1])
        for old, new in zip(self._cache.layers, cache.layers):
            old.keys = torch.cat([pad_left(old.keys, width), pad_left(new.keys, width)])
            old.values = torch.cat([pad_left(old.values, width), pad_left(new.values, width)])
        self._mask = torch.cat([pad_left(self._mask, width), pad_left(mask, width)])
        self._positions = torch.cat([self._positions, positions])

    def _drop_finished(self) -> None:
        """Remove finished rows and the leading columns no remaining row uses."""
        keep = [i for i, r in enumerate(self._rows) if not r.finished]
        if len(keep) == len(self._rows):
            return
        self._rows = [self._rows[i] for i in keep]
        self._generators = [self._generators[i] for i in keep]
        if not keep:
            self._cache = None
            self._mask = self._mask[:0, :0]
            self._positions, self._next = self._positions[:0], self._next[:0]
            return
        index = torch.tensor(keep, device=self.device)
        self._mask = self._mask.index_select(0, index)
        used = self._mask.any(dim=0).nonzero()
        first = int(used[0]) if len(used) else self._mask.shape[1]
        self._mask = self._mask[:, first:]
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, first:]
            layer.values = layer.values.index_select(0, index)[:, :, first:]
        self._positions = self._positions.index_select(0, index)
        self._next = self._next.index_select(0, index)


def guide(logits: torch.Tensor, requests: list[Request], position: dict[int, int]) -> torch.Tensor:
    """Reward guidance: each guided request's row becomes ``l + g * (l - l_ref)`` with ``l_ref`` its reference
    row's (transformers' classifier-free guidance processor, whose scale is ``1 + g``); other rows unchanged.
    ``position``: each request's row by ``id``, empty when no reference row is among them."""
    pairs: dict[float, list[tuple[int, int]]] = {}
    for k, request in enumerate(requests):
        if position and request.guided:
            pairs.setdefault(request.guidance, []).append((k, position[id(request.partner)]))
    if not pairs:
        return logits
    logits = logits.clone()
    for g, members in pairs.items():
        rows = torch.tensor([k for k, _ in members], device=logits.device)
        references = torch.tensor([r for _, r in members], device=logits.device)
        both = torch.cat([logits.index_select(0, rows), logits.index_select(0, references)])
        guided = ClassifierFreeGuidanceLogitsProcessor(1.0 + g)(rows[:, None], both)
        logits.index_copy_(0, rows, guided)
    return logits


def warpers(sampling: Sampling) -> list:
    """transformers' temperature, top-k and top-p warpers for ``sampling``, in ``generate``'s order."""
    out: list = []
    if sampling.temperature != 1.0:
        out.append(TemperatureLogitsWarper(sampling.temperature))
    if sampling.top_k:
        out.append(TopKLogitsWarper(sampling.top_k))
    if sampling.top_p < 1.0:
        out.append(TopPLogitsWarper(sampling.top_p))
    return out


def pad_left(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """``tensor`` widened to ``width`` along its sequence dimension (-2 for cache tensors, -1 for masks) with
    zeros on the left."""
    dim = -1 if tensor.dim() == 2 else -2
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def check_layers(cache: DynamicCache) -> None:
    """The engine re-pads and selects plain per-layer key/value tensors; sliding-window or quantized caches
    keep other state, so they need the static path."""
    kinds = {type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer}
    if kinds:
        raise NotImplementedError(
            f"continuous batching needs plain DynamicLayer caches, this model uses {sorted(kinds)}: set "
            "generation_batching: static"
        )
