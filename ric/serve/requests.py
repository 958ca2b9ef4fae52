"""What a served RiC model is asked: the request bodies of the OpenAI-shaped endpoints, checked against the
model's metadata before they reach the model, and the response bodies.

A request is checked twice: in the HTTP process (everything that needs no weights: JSON, fields, the
preference against the reward names and the simplex, the mapping method), so a bad request gets a 400 at
once and never reaches the model; and in the model's worker (the prompt's length in tokens), where an error
is answered for that request alone before it joins the running batch.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ric.mapping import METHODS, check_mapping
from ric.space import GUIDANCE_REFERENCES, check_desired, check_preference

#: the endpoints a client calls, and what kind of request each takes
ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completion", "/v1/images/generations": "image"}


class BadRequest(ValueError):
    """A request the server refuses with a 4xx status, naming the offending field and value."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param = param
        self.status = status

    def body(self) -> dict[str, Any]:
        return error_body(str(self), "invalid_request_error", self.param)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape, which its client turns into the right exception."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass
class ModelCard:
    """What the HTTP process knows about the served model without its weights."""

    name: str
    kind: str  # "text" or "image"
    reward_names: list[str]
    conditioned: bool
    reward_space: dict[str, Any] | None
    scoring: bool = False
    front: dict[str, Any] | None = None


@dataclass
class Steering:
    """One checked request: its kind, prompt, steering and sampling settings."""

    kind: str
    prompt: str
    preference: list[float] | None = None
    desired_rewards: list[float] | None = None
    method: str | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    stream: bool = False
    model: str = ""
    seed: int | None = None


def _number(value: Any, param: str, low: float | None = None, high: float | None = None, integer: bool = False) -> Any:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and integer:
        ok = float(value).is_integer()
    if ok and low is not None:
        ok = value > low if param in ("temperature", "top_p") else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        bounds = []
        if low is not None:
            bounds.append(f"{'>' if param in ('temperature', 'top_p') else '>='} {low:g}")
        if high is not None:
            bounds.append(f"<= {high:g}")
        what = "an integer" if integer else "a number"
        raise BadRequest(f"{param} must be {what} {' and '.join(bounds)}, got {value!r}", param)
    return int(value) if integer else float(value)


def chat_prompt(messages: Any) -> str:
    """The prompt of a chat request: its last user message (RiC prompts are single-turn; the model's
    template adds the role markers)."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list of {role, content} objects", "messages")
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise BadRequest("messages hold no message with role 'user'", "messages")
    content = users[-1].get("content")
    if isinstance(content, list):  # content parts: the text ones
        content = " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    if not isinstance(content, str):
        raise BadRequest(f"the last user message's content must be text, got {content!r}", "messages")
    return content


def parse_request(kind: str, body: Any, card: ModelCard) -> Steering:
    """A request body -> :class:`Steering`, or :class:`BadRequest` naming what is wrong."""
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, got {type(body).__name__}")
    if kind == "image" and card.kind != "image":
        raise BadRequest(f"model {card.name!r} generates text: use /v1/chat/completions or /v1/completions", status=404)
    if kind != "image" and card.kind == "image":
        raise BadRequest(f"model {card.name!r} generates images: use /v1/images/generations", status=404)
    if kind == "chat":
        prompt = chat_prompt(body.get("messages"))
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise BadRequest(f"prompt must be one string, got {prompt!r}", "prompt")
    if not prompt.strip():
        raise BadRequest("the prompt is empty", "prompt" if kind != "chat" else "messages")
    steering = Steering(kind=kind, prompt=prompt, model=str(body.get("model") or card.name))
    names = card.reward_names
    preference, desired, method = body.get("preference"), body.get("desired_rewards"), body.get("method")
    if preference is not None and desired is not None:
        raise BadRequest("give preference or desired_rewards, not both", "preference")
    if method is not None:
        if method not in METHODS:
            raise BadRequest(f"unknown method {method!r}; choose one of {list(METHODS)}", "method")
        p = body.get("p", (card.reward_space or {}).get("mapping", {}).get("p", 2.0))
        try:
            check_mapping(method, p, None)
        except ValueError as err:
            raise BadRequest(str(err), "p") from None
        steering.method = method
    if preference is not None:
        try:
            steering.preference = check_preference(preference, names).tolist()
        except ValueError as err:
            raise BadRequest(str(err), "preference") from None
        if card.reward_space is None:
            raise BadRequest("this model has no reward space to map a preference: send desired_rewards", "preference")
    elif desired is not None:
        try:
            values = check_desired(desired, names, "desired_rewards")
        except ValueError as err:
            raise BadRequest(str(err), "desired_rewards") from None
        if values.ndim != 1:
            raise BadRequest(f"desired_rewards must be one list of {len(names)} numbers, got {desired!r}",
                             "desired_rewards")  # fmt: skip
        steering.desired_rewards = values.tolist()
    elif card.conditioned:
        # no preference: equal weights, so a plain OpenAI request still gets an answer
        steering.preference = [1.0 / len(names)] * len(names)
    steering.sampling = sampling_settings(kind, body)
    steering.stream = bool(body.get("stream", False))
    if steering.stream and kind == "image":
        raise BadRequest("images are not streamed", "stream")
    if body.get("n", 1) != 1:
        raise BadRequest(f"n must be 1 (send several requests: they share a batch), got {body.get('n')!r}", "n")
    if body.get("seed") is not None:
        steering.seed = _number(body["seed"], "seed", 0, 2**63 - 1, integer=True)
    return steering


def sampling_settings(kind: str, body: dict[str, Any]) -> dict[str, Any]:
    """The request's sampling fields, checked, in the policy's own names."""
    out: dict[str, Any] = {}
    if body.get("guidance") is not None:
        out["guidance"] = _number(body["guidance"], "guidance", 0, 100)
    if body.get("guidance_reference") is not None:
        if body["guidance_reference"] not in GUIDANCE_REFERENCES:
            raise BadRequest(f"guidance_reference must be one of {list(GUIDANCE_REFERENCES)}, got "
                             f"{body['guidance_reference']!r}", "guidance_reference")  # fmt: skip
        out["guidance_reference"] = body["guidance_reference"]
    if kind == "image":
        if body.get("num_inference_steps") is not None:
            out["num_inference_steps"] = _number(body["num_inference_steps"], "num_inference_steps", 1, 500, True)
        if body.get("guidance_scale") is not None:
            out["guidance_scale"] = _number(body["guidance_scale"], "guidance_scale", 0)
        return out
    tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if tokens is not None:
        out["max_new_tokens"] = _number(tokens, "max_tokens", 1, 4096, integer=True)
    if body.get("temperature") is not None:
        temperature = _number(body["temperature"], "temperature", 0, 2)
        if temperature == 0:
            out["do_sample"] = False
        else:
            out["temperature"] = temperature
    if body.get("top_p") is not None:
        out["top_p"] = _number(body["top_p"], "top_p", 0, 1)
    return out


def completion_body(steering: Steering, text: str, desired: list[float] | None, obtained: dict | None, batch: int,
                    prompt_tokens: int = 0, completion_tokens: int = 0, finish_reason: str = "stop",
                    request_id: str | None = None, created: int | None = None) -> dict[str, Any]:  # fmt: skip
    """An OpenAI chat.completion / text_completion body with RiC's fields at the top level."""
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
    request_id = request_id or uuid.uuid4().hex[:24]
    if steering.kind == "chat":
        choice["message"] = {"role": "assistant", "content": text}
        head = {"id": f"chatcmpl-{request_id}", "object": "chat.completion"}
    else:
        choice["text"] = text
        head = {"id": f"cmpl-{request_id}", "object": "text_completion"}
    body = {**head, "created": created or int(time.time()), "model": steering.model, "choices": [choice],
            "usage": usage}  # fmt: skip
    return {**body, **ric_fields(steering, desired, obtained, batch)}


def ric_fields(steering: Steering, desired: list[float] | None, obtained: dict | None, batch: int) -> dict[str, Any]:
    out: dict[str, Any] = {"preference": steering.preference, "desired_rewards": desired, "batch_size": batch}
    if obtained is not None:
        out["obtained_rewards"] = obtained
    return out
