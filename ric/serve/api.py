"""The model side of ``ric serve``: one LitServe API on LitServe's continuous batching loop.

A RiC preference is only prompt text, so requests with different preferences decode side by side. Text
requests join the running batch of the policy's continuous-batching engine (:mod:`ric.text.batching`) the
step after they arrive, each token is sent as soon as it is sampled, and a finished request's row goes to
the next one at once. Image requests are generated together once ``batch_timeout`` has passed since the
first of them arrived (or ``max_batch_size`` are waiting). The worker sends each request a stream of small
events (``chunk``, ``body`` or ``error``); the HTTP process (:mod:`ric.serve.server`) turns them into
server-sent events or one JSON body, and reports a client that went away, whose request is then cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import litserve as ls
import numpy as np
from litserve.loops.continuous_batching_loop import ContinuousBatchingLoop, Output
from litserve.utils import LitAPIStatus

from ric.serve.requests import BadRequest, ModelCard, Steering, completion_body, error_body, parse_request, ric_fields

log = logging.getLogger("ric.serve")

#: the path the HTTP layer forwards every checked request to (one queue, so every kind shares the engine)
STEER_PATH = "/v1/ric/steer"


class SteeringLoop(ContinuousBatchingLoop):
    """LitServe's continuous batching loop, resting between polls while nothing runs instead of spinning."""

    async def run(self, lit_api: ls.LitAPI, *args: Any) -> None:
        if not lit_api.has_active_requests():
            await asyncio.sleep(0.002)
            return
        await super().run(lit_api, *args)


@dataclass
class Job:
    """One request in the worker: what was asked, its engine request (text) and what was sent so far."""

    uid: str
    steering: Steering
    desired: list[float] | None
    request_id: str = ""  # the HTTP process's id, which a cancellation names
    engine: Any = None  # ric.text.batching.Request
    sent: str = ""
    opened: bool = False  # a chunk was sent
    rows: int = 0  # the most requests that decoded beside it, itself included
    arrived: float = field(default_factory=time.monotonic)
    timed_out: bool = False  # stopped at the server's per-request timeout
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))


class SteeringAPI(ls.LitAPI):
    """Loads the model in its worker and decodes every request on one continuous-batching engine.

    Args:
        model: an export folder or a checkpoint.
        card: what the HTTP layer knows of the model (reward names, kind).
        device: ``cpu``, ``cuda``, ... (default: what LitServe assigns the worker).
        score: also score each sample with the model's rewards (they must be rebuildable here).
        cancels: where the HTTP process puts the ids of requests whose client went away.
        max_batch_size: rows decoding at once (text), images generated together.
        batch_timeout: seconds the first waiting image request waits for others.
        trust: open a checkpoint that holds more than tensors and plain data (``--trust-checkpoint``).
        timeout: seconds a request may take: one still running then is stopped and answered with a 504 (or,
            once its stream has started, an error event), and its row goes to the others.
    """

    def __init__(self, model: str, card: ModelCard, score: bool = False, device: str | None = None,
                 cancels: Any = None, max_batch_size: int = 16, batch_timeout: float = 0.05,
                 trust: bool = False, timeout: float | None = None) -> None:  # fmt: skip
        super().__init__(api_path=STEER_PATH, stream=True, loop=SteeringLoop(), max_batch_size=max_batch_size,
                         batch_timeout=batch_timeout)  # fmt: skip
        self.model_path = model
        self.card = card
        self.score = score
        self.device_override = device
        self.cancels = cancels
        self.trust = trust
        self.timeout = timeout

    def setup(self, device: str) -> None:
        from ric.loading import load_from_info, read_model_info

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
        logging.getLogger("litserve").setLevel(logging.WARNING)  # its loop's start-up notes, not ours
        info = read_model_info(self.model_path, self.trust)
        self.policy = load_from_info(info, device=self.device_override or device)
        self.rewards = info.reward_space.build_rewards() if self.score else None
        self.engine = None
        self._session = contextlib.ExitStack()
        if self.policy.streams({}):  # the adapter stays merged for the server's life
            self.policy.eval()
            self._session.enter_context(self.policy.generation_session())
            self.engine = self.policy.batcher(self.max_batch_size)
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self._by_id: dict[str, str] = {}  # the HTTP process's request id -> LitServe's uid
        self._gone: set[str] = set()  # ids whose client left before their request arrived
        self._events: list[Output] = []
        log.info("serving %s on %s (rewards %s)", self.model_path, self.policy.device, self.card.reward_names)

    # ---- what LitServe's continuous batching loop calls ---------------------------------------------------
    def has_capacity(self) -> bool:
        return True  # the engine queues what it cannot run yet

    def has_active_requests(self) -> bool:
        return bool(self._jobs or self._events)

    def add_request(self, uid: str, request: Any) -> None:
        """Check a forwarded request and queue it; one that cannot be answered is answered with its error at
        the next step (it never reaches the engine)."""
        try:
            if not isinstance(request, dict) or "kind" not in request:
                raise BadRequest(f"post to {sorted(['/v1/chat/completions', '/v1/completions'])}, not {STEER_PATH}")
            steering = parse_request(request["kind"], request.get("body"), self.card)
            self.policy.check_prompt(steering.prompt)
            if steering.sampling:
                self.policy.check_sampling(steering.sampling, "request")
            job = self._job(uid, steering, str(request.get("id") or ""))
        except BadRequest as err:
            return self._answer(uid, {"ric": "error", "status": err.status, "data": err.body()})
        except ValueError as err:
            return self._answer(uid, {"ric": "error", "status": 400,
                                      "data": error_body(str(err), "invalid_request_error", "prompt")})  # fmt: skip
        except Exception as err:  # noqa: BLE001 - this request's 500; the loop that takes requests must go on
            log.exception("request %s could not be queued", uid)
            return self._answer(uid, self._server_error(err))
        with self._lock:
            self._jobs[uid] = job
            if job.request_id:
                self._by_id[job.request_id] = uid
            gone = job.request_id in self._gone
            self._gone.discard(job.request_id)
        if job.engine is not None:
            if gone:
                self.engine.cancel(job.engine)
            self.engine.submit(job.engine)

    def step(self, prev_outputs: list[Output] | None) -> list[Output]:
        """Cancel what the clients left, run one engine step (or one image batch), and hand out the new text,
        the finished answers and any errors."""
        while True:  # LitServe's loop sleeps after a step without outputs: decode on until there are some
            self._take_cancels()
            self._expire()
            if self.engine is None:
                self._whole_batches()
            elif self.engine.busy():
                try:
                    self.engine.step()
                except Exception as err:  # noqa: BLE001 - the running requests get a 500, the server goes on
                    log.exception("a decoding step failed; its %d requests are answered with an error", len(self._jobs))
                    self._fail_engine(err)
            with self._lock:
                outputs, self._events = self._events, []
                jobs = list(self._jobs.values())
            running = self.engine.running if self.engine is not None else 0
            for job in jobs:
                if job.engine is None:
                    continue
                job.rows = max(job.rows, running)
                if job.engine.finished:
                    outputs += self._finish(job)
                elif job.steering.stream:
                    outputs += self._delta(job)
            if outputs or self.engine is None or not self.engine.busy():
                return outputs

    def encode_response(self, output):  # noqa: ANN001 - unannotated: LitServe then sends what it gives as is
        return output

    def _fail_engine(self, err: Exception) -> None:
        """Answer every request of a broken engine with a 500 and start a fresh engine."""
        with self._lock:
            jobs = [j for j in self._jobs.values() if j.engine is not None]
            for job in jobs:
                self._forget(job)
        for job in jobs:
            self._answer(job.uid, self._server_error(err))
        self.engine = self.policy.batcher(self.max_batch_size)

    @staticmethod
    def _server_error(err: Exception) -> dict[str, Any]:
        return {"ric": "error", "status": 500,
                "data": error_body(f"generation failed: {type(err).__name__}: {err}", "server_error")}  # fmt: skip

    # ---- requests ------------------------------------------------------------------------------------------
    def _job(self, uid: str, steering: Steering, request_id: str) -> Job:
        space = self.policy.reward_space
        desired = None
        if self.policy.conditioned:
            values = steering.desired_rewards
            if values is None:
                values = space.desired(steering.preference, steering.method)
            desired = [float(v) for v in values]
        job = Job(uid, steering, desired, request_id)
        if self.engine is not None:
            from ric.rollout import random_stream

            settings = self.policy.sampling_settings(steering.sampling)
            values = None if desired is None else self.policy.marker_values(np.array([desired]))
            ids = self.policy.prompt_ids([steering.prompt], values)
            references = self.policy.reference_ids([steering.prompt], values, settings)
            with random_stream(steering.seed):  # seeded as `steer` seeds its first prompt: the same sample
                job.engine = self.policy.batching_requests(ids, settings, references)[0]
        return job

    def _forget(self, job: Job) -> None:
        """Drop a request that is answered (the caller holds the lock)."""
        self._jobs.pop(job.uid, None)
        self._by_id.pop(job.request_id, None)

    def _answer(self, uid: str, event: dict[str, Any]) -> None:
        with self._lock:
            self._events += [Output(uid, event, LitAPIStatus.OK), Output(uid, "", LitAPIStatus.FINISH_STREAMING)]

    def _take_cancels(self) -> None:
        while self.cancels is not None:
            try:
                request_id = self.cancels.get_nowait()
            except queue.Empty:
                return
            with self._lock:
                uid = self._by_id.pop(request_id, None)
                job = self._jobs.get(uid) if uid is not None else None
                if uid is None:  # its client left before the request reached this worker
                    self._gone.add(request_id)
            if job is not None and job.engine is not None and not job.engine.finished:
                log.info("client of request %s went away: its row is freed", uid)
                self.engine.cancel(job.engine)

    def _expire(self) -> None:
        """Stop the requests past the per-request timeout: a text request's row is freed at once, an image
        request still waiting for its batch is answered before it is generated."""
        if self.timeout is None:
            return
        now = time.monotonic()
        with self._lock:
            late = [j for j in self._jobs.values() if not j.timed_out and now - j.arrived > self.timeout]
        for job in late:
            job.timed_out = True
            log.info("request %s ran past the %g s timeout: stopped", job.uid, self.timeout)
            if job.engine is not None:
                if not job.engine.finished:
                    self.engine.cancel(job.engine)
                continue
            with self._lock:
                self._forget(job)
            self._answer(job.uid, self._timeout_error())

    def _timeout_error(self) -> dict[str, Any]:
        return {"ric": "error", "status": 504,
                "data": error_body(f"the request took longer than the server's {self.timeout:g} s timeout "
                                   "(ric serve --timeout)", "timeout_error")}  # fmt: skip

    def _delta(self, job: Job) -> list[Output]:
        """The text decoded since the last chunk (held back while it ends inside a multi-byte character)."""
        text = self.policy.decode_answer(job.engine.tokens)
        return [] if text.endswith("\ufffd") else self._unsent(job, text)

    def _unsent(self, job: Job, text: str) -> list[Output]:
        """A chunk with the part of ``text`` not sent yet, if there is one."""
        if len(text) <= len(job.sent) or not text.startswith(job.sent):
            return []
        delta, job.sent = text[len(job.sent) :], text
        return [Output(job.uid, {"ric": "chunk", "data": self._chunk(job, delta, None)}, LitAPIStatus.OK)]

    def _finish(self, job: Job) -> list[Output]:
        """The end of a request: the whole body, or for a stream the text not sent yet and the last chunk
        (finish reason, usage, RiC's fields)."""
        with self._lock:
            self._forget(job)
        end = Output(job.uid, "", LitAPIStatus.FINISH_STREAMING)
        if job.engine.finish_reason == "cancelled":
            return [Output(job.uid, self._timeout_error(), LitAPIStatus.OK), end] if job.timed_out else [end]
        text = self.policy.decode_answer(job.engine.tokens)
        s = job.steering
        obtained = self._obtained([s.prompt], [text])[0]
        reason = "length" if job.engine.finish_reason == "length" else "stop"
        body = completion_body(s, text, job.desired, obtained, job.rows, len(job.engine.ids), len(job.engine.tokens),
                               reason, job.id, job.created)  # fmt: skip
        if not s.stream:
            return [Output(job.uid, {"ric": "body", "data": body}, LitAPIStatus.OK), end]
        rest = self._unsent(job, text)  # before the last chunk: a chat stream's first chunk names the role
        last = {
            **self._chunk(job, "", reason),
            "usage": body["usage"],
            **ric_fields(s, job.desired, obtained, job.rows),
        }
        return rest + [Output(job.uid, {"ric": "chunk", "data": last}, LitAPIStatus.OK), end]

    def _chunk(self, job: Job, delta: str, finish: str | None) -> dict[str, Any]:
        """One chunk in OpenAI's streaming shape; a chat stream's first chunk names the assistant role."""
        chat = job.steering.kind == "chat"
        if chat:
            content = {"content": delta} if delta or finish is None else {}
            if not job.opened:
                content = {"role": "assistant", **content}
            choice = {"index": 0, "delta": content, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": delta, "finish_reason": finish, "logprobs": None}
        job.opened = True
        prefix = "chatcmpl" if chat else "cmpl"
        return {"id": f"{prefix}-{job.id}", "object": "chat.completion.chunk" if chat else "text_completion",
                "created": job.created, "model": job.steering.model, "choices": [choice]}  # fmt: skip

    def _obtained(self, prompts: list[str], samples: list[Any]) -> list[dict[str, float] | None]:
        if self.rewards is None:
            return [None] * len(prompts)
        from ric.rewards import score_all

        space = self.policy.reward_space
        raw = score_all(self.rewards, prompts, samples)
        return [dict(zip(space.reward_names, row.tolist())) for row in space.normalize(raw)]

    # ---- policies without the engine (images) --------------------------------------------------------------
    def _whole_batches(self) -> None:
        """Generate the waiting requests together (grouped by sampling settings and seed) once the first has
        waited ``batch_timeout`` or ``max_batch_size`` are waiting."""
        with self._lock:
            waiting = sorted(self._jobs.values(), key=lambda j: j.arrived)[: self.max_batch_size]
        if not waiting:
            return
        if len(waiting) < self.max_batch_size and time.monotonic() - waiting[0].arrived < self.batch_timeout:
            time.sleep(0.005)
            return
        groups: dict[str, list[Job]] = {}
        for job in waiting:
            groups.setdefault(json.dumps([job.steering.sampling, job.steering.seed], sort_keys=True), []).append(job)
        log.info("batch of %d requests in %d generate call(s)", len(waiting), len(groups))
        for group in groups.values():
            try:
                events = self._generate_group(group, len(waiting))
            except Exception as err:  # noqa: BLE001 - answered as these requests' 500
                log.exception("generation failed")
                events = [self._server_error(err)] * len(group)
            for job, event in zip(group, events):
                with self._lock:
                    self._forget(job)
                self._answer(job.uid, event)

    def _generate_group(self, group: list[Job], batch: int) -> list[dict[str, Any]]:
        first = group[0].steering
        desired = None if group[0].desired is None else np.array([j.desired for j in group])
        steered = self.policy.steer([j.steering.prompt for j in group], desired_rewards=desired, seed=first.seed,
                                    **first.sampling)  # fmt: skip
        obtained = self._obtained([j.steering.prompt for j in group], [r.sample for r in steered])
        events = []
        for job, r, o in zip(group, steered, obtained):
            if job.steering.kind == "image":
                body = image_body(job.steering, r.sample, r.desired_rewards, o, batch)
            else:
                body = completion_body(job.steering, r.sample, r.desired_rewards, o, batch, request_id=job.id,
                                       created=job.created)  # fmt: skip
            events.append({"ric": "body", "data": body})
        return events


def image_body(steering: Steering, image: Any, desired: list[float] | None, obtained: dict | None,
               batch: int) -> dict[str, Any]:  # fmt: skip
    """OpenAI's images response: base64 PNG data, with RiC's fields at the top level."""
    import base64
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = [{"b64_json": base64.b64encode(buffer.getvalue()).decode("ascii"), "revised_prompt": None}]
    return {"created": int(time.time()), "data": data, **ric_fields(steering, desired, obtained, batch)}
