"""The model side of ``ric serve``: one LitServe API that generates for a batch of requests at once.

A RiC preference is only prompt text, so requests with different preferences share one ``generate`` call:
LitServe collects them (up to ``max_batch_size``, waiting up to ``batch_timeout``), the batch maps each
preference to its desired rewards through the model's reward space and generates every conditioned prompt
together. Requests whose sampling settings differ (length, temperature, a seed) are generated in separate
calls within the batch. A failure inside generation is retried request by request, so only the request that
fails gets a 5xx.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from typing import Any

import litserve as ls
import numpy as np

from ric.serve.requests import (
    BadRequest,
    ModelCard,
    Steering,
    completion_body,
    error_body,
    parse_request,
    stream_events,
)

log = logging.getLogger("ric.serve")

#: the path the HTTP layer forwards every checked request to (one queue, so every kind shares batches)
STEER_PATH = "/v1/ric/steer"


@dataclass
class Failed:
    """A request that cannot be answered, with its HTTP status."""

    status: int
    body: dict[str, Any]


@dataclass
class Answer:
    steering: Steering
    sample: Any
    desired: list[float] | None
    obtained: dict[str, float] | None
    batch: int


class SteeringAPI(ls.LitAPI):
    """Loads the model in its worker and answers batches of steering requests.

    Args:
        model: an export folder or a checkpoint.
        card: what the HTTP layer knows of the model (reward names, kind).
        device: ``cpu``, ``cuda``, ... (default: what LitServe assigns the worker).
        score: also score each sample with the model's rewards (they must be rebuildable here).
    """

    def __init__(self, model: str, card: ModelCard, score: bool = False, device: str | None = None, **kwargs: Any):
        super().__init__(api_path=STEER_PATH, **kwargs)
        self.model_path = model
        self.card = card
        self.score = score
        self.device_override = device

    def setup(self, device: str) -> None:
        from ric.loading import load_from_info, read_model_info

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
        info = read_model_info(self.model_path)
        self.policy = load_from_info(info, device=self.device_override or device)
        self.rewards = info.reward_space.build_rewards() if self.score else None
        self.tokenizer = getattr(self.policy, "tokenizer", None)
        log.info("serving %s on %s (rewards %s)", self.model_path, self.policy.device, self.card.reward_names)

    def decode_request(self, request):  # noqa: ANN001 - unannotated: LitServe then passes the parsed JSON body
        """A checked request, or the reason it cannot be answered (never raised: one bad request must not fail
        the batch it arrived in)."""
        try:
            if not isinstance(request, dict) or "kind" not in request:
                raise BadRequest(f"post to {sorted(['/v1/chat/completions', '/v1/completions'])}, not {STEER_PATH}")
            steering = parse_request(request["kind"], request.get("body"), self.card)
            self.policy.check_prompt(steering.prompt)
            if steering.sampling:
                self.policy.check_sampling(steering.sampling, "request")
            return steering
        except BadRequest as err:
            return Failed(err.status, err.body())
        except ValueError as err:
            return Failed(400, error_body(str(err), "invalid_request_error", "prompt"))

    def batch(self, inputs: list[Any]) -> list[Any]:
        return list(inputs)

    def predict(self, items: list[Steering | Failed]) -> list[Answer | Failed]:
        out: list[Answer | Failed | None] = [item if isinstance(item, Failed) else None for item in items]
        groups: dict[str, list[int]] = {}
        for i, item in enumerate(items):
            if isinstance(item, Steering):
                key = json.dumps([item.sampling, item.seed], sort_keys=True)
                groups.setdefault(key, []).append(i)
        todo = sum(len(g) for g in groups.values())
        if todo:
            prefs = {json.dumps(items[i].preference or items[i].desired_rewards) for g in groups.values() for i in g}
            log.info("batch of %d requests (%d preferences) in %d generate call(s)", todo, len(prefs), len(groups))
        for members in groups.values():
            try:
                answers = self.generate([items[i] for i in members], todo)
            except Exception:  # noqa: BLE001 - find the request that fails; the others are answered
                log.exception("a batch failed; generating its %d requests one by one", len(members))
                answers = [self.generate_alone(items[i]) for i in members]
            for i, answer in zip(members, answers):
                out[i] = answer
        return out

    def generate_alone(self, item: Steering) -> Answer | Failed:
        try:
            return self.generate([item], 1)[0]
        except Exception as err:  # noqa: BLE001 - answered as this request's 500
            log.exception("request failed")
            return Failed(500, error_body(f"generation failed: {type(err).__name__}: {err}", "server_error"))

    def generate(self, group: list[Steering], batch: int) -> list[Answer]:
        """One generate call for requests with the same sampling settings, each at its own desired rewards."""
        space = self.policy.reward_space
        desired = None
        if self.policy.conditioned:
            desired = np.array(
                [s.desired_rewards if s.desired_rewards is not None else space.desired(s.preference, s.method)
                 for s in group]
            )  # fmt: skip
        first = group[0]
        prompts = [s.prompt for s in group]
        steered = self.policy.steer(prompts, desired_rewards=desired, seed=first.seed, **first.sampling)
        obtained: list[dict | None] = [None] * len(group)
        if self.rewards is not None:
            from ric.interfaces import score_all

            raw = score_all(self.rewards, [s.prompt for s in group], [r.sample for r in steered])
            obtained = [dict(zip(space.reward_names, row.tolist())) for row in space.normalize(raw)]
        return [Answer(s, r.sample, r.desired_rewards, o, batch) for s, r, o in zip(group, steered, obtained)]

    def unbatch(self, outputs: list[Any]) -> list[Any]:
        return list(outputs)

    def encode_response(self, output):  # noqa: ANN001 - unannotated: LitServe then returns what it gives as is
        from fastapi.responses import JSONResponse, Response

        if isinstance(output, Failed):
            return JSONResponse(output.body, status_code=output.status)
        s = output.steering
        if s.kind == "image":
            return image_body(output)
        prompt_tokens = completion_tokens = 0
        if self.tokenizer is not None:
            prompt_tokens = len(self.tokenizer(s.prompt)["input_ids"])
            completion_tokens = len(self.tokenizer(output.sample)["input_ids"])
        body = completion_body(s, output.sample, output.desired, output.obtained, output.batch, prompt_tokens,
                               completion_tokens)  # fmt: skip
        if s.stream:
            return Response(stream_events(body), media_type="text/event-stream")
        return body


def image_body(answer: Answer) -> dict[str, Any]:
    """OpenAI's images response: base64 PNG data, with RiC's fields at the top level."""
    import base64
    import io
    import time

    from ric.serve.requests import ric_fields

    buffer = io.BytesIO()
    answer.sample.save(buffer, format="PNG")
    data = [{"b64_json": base64.b64encode(buffer.getvalue()).decode("ascii"), "revised_prompt": None}]
    return {"created": int(time.time()), "data": data, **ric_fields(answer.steering, answer.desired, answer.obtained,
                                                                     answer.batch)}  # fmt: skip
