"""``ric serve MODEL``: an OpenAI-compatible server on LitServe, with a page to steer the model in a browser.

The HTTP process knows the model's metadata only (reward names and space, read without weights): it checks
each request there and answers a bad one with a 400 at once, then forwards the checked request to the one
model worker, where it joins the running batch (continuous batching, see :mod:`ric.serve.api`). Routes:

* ``POST /v1/chat/completions``, ``POST /v1/completions`` (text), ``POST /v1/images/generations`` (images):
  OpenAI's shapes plus ``preference`` (or ``desired_rewards``) and ``method`` in the body; the response
  carries ``desired_rewards`` (and ``obtained_rewards`` with ``--score``) at its top level.
* ``GET /v1/models``: the model, its rewards, their ranges (the achievable ones of a calibrated model) and the
  mapping; ``GET /health``.
* ``GET /``: the page; ``POST /v1/ric/desired`` (desired rewards of a preference and the values written for
  them) and ``GET /v1/ric/front``
  (the model's sweep front) serve it.
"""

from __future__ import annotations

import hmac
import json
import multiprocessing
import os
import signal
import time
import uuid
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse, JSONResponse

from ric.loading import ModelInfo, read_model_info
from ric.serve.api import STEER_PATH, SteeringAPI
from ric.serve.requests import ENDPOINTS, BadRequest, ModelCard, error_body, parse_request
from ric.space import RewardSpace

#: routes answered without the API key: the health probe, and the page (static HTML that asks for the key)
OPEN_PATHS = ("/health", "/")
#: seconds requests in flight get to finish when the server stops (then they are cut off)
GRACE_SECONDS = 4
#: the default limit of a request body (--max-body-mb): far above any prompt the models here take
MAX_BODY_BYTES = 4 * 1024 * 1024


class CheckRequests:
    """ASGI middleware in front of every route. It asks for the API key (``Authorization: Bearer KEY``, as
    OpenAI's clients send it) where one is set, refuses a body over ``max_body_bytes`` with a 413 while reading
    it, then reads each POST to an OpenAI endpoint, refuses malformed JSON and bad fields with a 400 naming
    them, and forwards the rest to the model worker's path with their kind and an id. The worker answers with
    a stream of events, which this turns into server-sent events (``stream: true``) or one JSON body; a client
    that goes away before its answer is done has its id put in ``cancels``."""

    def __init__(self, app: Any, card: ModelCard, cancels: Any = None, api_key: str | None = None,
                 max_body_bytes: int = MAX_BODY_BYTES) -> None:  # fmt: skip
        self.app = app
        self.card = card
        self.cancels = cancels
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes

    def authorized(self, scope: dict) -> bool:
        if not self.api_key or scope["path"] in OPEN_PATHS:
            return True
        given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = given.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    async def read_body(self, scope: dict, receive: Any) -> bytes | None:
        """The whole request body, or ``None`` once it is known to be over the limit (by its declared length or
        what has arrived). The rest of an oversized body is received and dropped unparsed (up to 16 times the
        limit), so that the client, still sending, reads the refusal instead of a broken connection."""
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        raw, size = b"", 0
        over = declared.isdigit() and int(declared) > self.max_body_bytes
        while True:
            message = await receive()
            chunk = message.get("body", b"")
            size += len(chunk)
            over = over or size > self.max_body_bytes
            if not over:
                raw += chunk
            if not message.get("more_body") or size > 16 * self.max_body_bytes:
                return None if over else raw

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self.authorized(scope):
            await respond(send, 401, error_body("a valid API key is needed: send the header Authorization: Bearer "
                                                "<key>", "invalid_request_error", code="invalid_api_key"))  # fmt: skip
            return
        if scope["path"].rstrip("/") == STEER_PATH:  # the worker's own route
            await respond(send, 404, error_body(f"post to one of {sorted(ENDPOINTS)}", "invalid_request_error"))
            return
        if scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        raw = await self.read_body(scope, receive)
        if raw is None:
            limit = f"{self.max_body_bytes / 2**20:g} MB"
            await respond(send, 413, error_body(f"the request body is over the server's limit of {limit} "
                                                "(ric serve --max-body-mb)", "invalid_request_error"))  # fmt: skip
            return
        if scope["path"].rstrip("/") not in ENDPOINTS:  # a route of its own (the page's): it reads the body read
            await self.app(scope, replay_body(raw, receive), send)
            return
        kind = ENDPOINTS[scope["path"].rstrip("/")]
        try:
            try:
                body = json.loads(raw or b"null")
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise BadRequest(f"the request body is not valid JSON: {err}") from None
            parse_request(kind, body, self.card)
        except BadRequest as err:
            await respond(send, err.status, err.body())
            return
        request_id = uuid.uuid4().hex
        forwarded = json.dumps({"kind": kind, "body": body, "id": request_id}).encode()
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in (b"content-length", b"content-type")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(forwarded)).encode())]
        relay = Relay(send)

        def left(message: dict) -> None:
            if message["type"] == "http.disconnect" and not relay.finished and self.cancels is not None:
                self.cancels.put(request_id)

        scope = {**scope, "path": STEER_PATH, "raw_path": STEER_PATH.encode(), "headers": headers}
        await self.app(scope, replay_body(forwarded, receive, left), relay.send)


class Relay:
    """The worker's newline-delimited events -> the client's response: an ``error`` or a ``body`` event is sent
    as one JSON response (with its status), ``chunk`` events as server-sent events ending in ``[DONE]``.
    The response starts only when the first event has said which."""

    def __init__(self, send: Any) -> None:
        self._send = send
        self.finished = False
        self._started = False
        self._passthrough = False  # LitServe answered itself (an error status): sent as it is
        self._complete = False  # a chunk with a finish reason was sent
        self._buffer = b""

    async def send(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            if message["status"] != 200:
                self._passthrough = True
                await self._send(message)
            return
        if message["type"] != "http.response.body" or self._passthrough:
            self.finished = self.finished or not message.get("more_body")
            await self._send(message)
            return
        self._buffer += message.get("body", b"")
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            if line.strip() and not self.finished:
                await self._event(json.loads(line))
        if not message.get("more_body") and not self.finished:
            self.finished = True
            if self._started and self._complete:
                await self._send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
            elif self._started:  # the worker stopped mid-answer: say so rather than end as if complete
                error = error_body("generation stopped before the answer was complete", "server_error")
                await self._send({"type": "http.response.body", "body": sse(error),
                                  "more_body": False})  # fmt: skip
            else:
                await respond(self._send, 500, error_body("the model worker ended the request without an answer",
                                                          "server_error"))  # fmt: skip

    async def _event(self, event: dict[str, Any]) -> None:
        if event.get("ric") == "error" and self._started:  # past the status line: the stream ends with the error
            self.finished = True
            await self._send({"type": "http.response.body", "body": sse(event["data"]), "more_body": False})
            return
        if event.get("ric") in ("error", "body"):
            self.finished = True
            await respond(self._send, int(event.get("status", 200)), event["data"])
            return
        if not self._started:
            self._started = True
            headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
            await self._send({"type": "http.response.start", "status": 200, "headers": headers})
        choices = event["data"].get("choices") or [{}]
        self._complete = self._complete or choices[0].get("finish_reason") is not None
        await self._send({"type": "http.response.body", "body": sse(event["data"]), "more_body": True})


def sse(data: dict[str, Any]) -> bytes:
    """One server-sent event carrying ``data`` as JSON."""
    return f"data: {json.dumps(data)}\n\n".encode()


def replay_body(raw: bytes, receive: Any, watch: Callable[[dict], None] | None = None) -> Any:
    """A ``receive`` that hands over a body already read, then what the client sends next (a disconnect), which
    ``watch`` sees first."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        message = await receive()
        if watch is not None:
            watch(message)
        return message

    return replay


async def respond(send: Any, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


def model_card(info: ModelInfo, name: str, score: bool, front: Path | None) -> ModelCard:
    kind = "image" if info.class_path.endswith("DiffusionPolicy") else "text"
    space = info.reward_space
    return ModelCard(
        name=name,
        kind=kind,
        reward_names=info.reward_names,
        conditioned=info.conditioned,
        reward_space=space.to_dict() if space is not None else None,
        scoring=score,
        front=read_front_points(front) if front is not None else None,
    )


def find_front(info: ModelInfo) -> Path | None:
    """The model's sweep ``front.csv``: in an export folder, or the run's ``sweep`` folder near a checkpoint."""
    candidates = [info.path / "front.csv"] if info.kind == "export" else []
    if info.kind == "checkpoint":
        folder = info.path.resolve().parent
        for _ in range(4):
            candidates.append(folder / "sweep" / "front.csv")
            folder = folder.parent
    return next((c for c in candidates if c.is_file()), None)


def read_front_points(path: Path) -> dict[str, Any]:
    """The sweep's points (preference, obtained means) for the page; rows without a preference (a base-model
    sweep) are left out."""
    from ric.compare import read_front

    names, preferences, means = read_front(path)
    points = [
        {"preference": w.tolist(), "obtained": m.tolist()} for w, m in zip(preferences, means) if all(v == v for v in w)
    ]
    return {"file": str(path), "reward_names": names, "points": points}


def achievable(space: RewardSpace | None) -> dict[str, Any] | None:
    """The range of each reward the model was measured to obtain (``None`` until ``ric calibrate`` ran)."""
    if space is None or space.calibration is None:
        return None
    lo, hi = space.calibration.achievable()
    return {"low": lo.tolist(), "high": hi.tolist(), "settings": space.calibration.settings,
            "error": space.calibration.error}  # fmt: skip


def add_routes(server: Any, card: ModelCard) -> None:
    """The routes the HTTP process answers itself: the model list, the page and its helpers."""
    app = server.app
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) != "/"]  # LitServe's own index
    space = RewardSpace.from_dict(card.reward_space) if card.reward_space else None
    page = resources.files("ric.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    created = int(time.time())

    async def models() -> JSONResponse:
        ric = {"kind": card.kind, "reward_names": card.reward_names, "conditioned": card.conditioned,
               "scoring": card.scoring, "mapping": None, "reward_range": None, "achievable": None}  # fmt: skip
        if space is not None:
            ric["mapping"] = {"method": space.method, "p": space.p, "lam": space.lam}
            ric["reward_range"] = {"r_min": space.r_min.tolist(), "r_max": space.r_max.tolist(),
                                   "source": space.range_source}  # fmt: skip
        ric["achievable"] = achievable(space)
        entry = {"id": card.name, "object": "model", "created": created, "owned_by": "ric", "ric": ric}
        return JSONResponse({"object": "list", "data": [entry]})

    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    async def desired(request: Request) -> JSONResponse:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return JSONResponse(error_body(f"the request body is not valid JSON: {err}", "invalid_request_error"), 400)
        if space is None:
            return JSONResponse(error_body("this model has no reward space", "invalid_request_error"), 400)
        try:
            steering = parse_request(card.kind if card.kind == "image" else "completion",
                                     {"prompt": "-", **(body if isinstance(body, dict) else {})}, card)  # fmt: skip
            values = (
                space.desired(steering.preference, steering.method) if steering.preference else steering.desired_rewards
            )
        except BadRequest as err:
            return JSONResponse(err.body(), err.status)
        written = space.markers(values).tolist()
        return JSONResponse({"preference": steering.preference, "desired_rewards": list(map(float, values)),
                             "written_rewards": written})  # fmt: skip

    async def front() -> JSONResponse:
        return JSONResponse(card.front or {"reward_names": card.reward_names, "points": []})

    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/", index, methods=["GET"])
    app.add_api_route("/v1/ric/desired", desired, methods=["POST"])
    app.add_api_route("/v1/ric/front", front, methods=["GET"])


def build_server(
    model: str | Path,
    max_batch_size: int = 16,
    batch_timeout: float = 0.05,
    score: bool = False,
    device: str | None = None,
    front: str | Path | None = None,
    timeout: float = 600.0,
    name: str | None = None,
    trust: bool = False,
    api_key: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> Any:
    """A LitServer for the model at ``model`` (nothing loads until it runs: the worker loads the weights; a
    checkpoint holding more than tensors and plain data only with ``trust``), asking for ``api_key`` where one
    is given and refusing bodies over ``max_body_bytes``."""
    import litserve as ls

    if max_batch_size < 1:
        raise ValueError(f"--max-batch-size must be >= 1, got {max_batch_size}")
    if batch_timeout < 0:
        raise ValueError(f"--batch-timeout must be >= 0 seconds, got {batch_timeout}")
    if timeout <= 0:
        raise ValueError(f"--timeout must be > 0 seconds, got {timeout}")
    info = read_model_info(model, trust)
    if score:
        space = info.reward_space
        if space is None or space.rewards is None or any(r is None for r in space.rewards):
            raise ValueError(f"--score needs rebuildable rewards, and {info.path} does not record them")
    front_path = Path(front) if front else find_front(info)
    if front_path is not None and not front_path.is_file():
        raise FileNotFoundError(f"--front {front_path} not found")
    path = Path(model).resolve()
    card = model_card(info, name or (path.name if path.is_dir() else f"{path.parent.parent.name}/{path.stem}"), score,
                      front_path)  # fmt: skip
    cancels = multiprocessing.get_context("spawn").Queue()  # HTTP process -> model worker: clients gone
    api = SteeringAPI(str(model), card, score=score, device=device, cancels=cancels, max_batch_size=max_batch_size,
                      batch_timeout=batch_timeout, trust=trust, timeout=timeout)  # fmt: skip
    accelerator = "cpu" if device in (None, "cpu") else "auto"
    checks = {"card": card, "cancels": cancels, "api_key": api_key, "max_body_bytes": max_body_bytes}
    middleware = (CheckRequests, checks)
    server = ls.LitServer(api, accelerator=accelerator, timeout=timeout, middlewares=[middleware])
    server.uvicorn_graceful_timeout = GRACE_SECONDS
    add_routes(server, card)
    return server


def run_server(server: Any, host: str, port: int, log_level: str) -> None:
    """Serve until SIGTERM or SIGINT, then stop every process the server started: LitServe shuts down its
    HTTP and model workers on an interrupt, so SIGTERM (what a supervisor sends) is made one; whatever is still
    alive after that (a stop during start-up) is terminated, then killed."""

    owner = os.getpid()

    def interrupt(signum: int, frame: Any) -> None:
        if os.getpid() != owner:  # a forked worker that inherited this handler: the signal's default, quietly
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    try:
        server.run(host=host, port=port, generate_client_file=False, log_level=log_level)
    except KeyboardInterrupt:
        pass
    finally:
        children = multiprocessing.active_children()
        for child in children:
            child.terminate()
        deadline = time.monotonic() + GRACE_SECONDS
        for child in children:
            child.join(max(0.0, deadline - time.monotonic()))
            if child.is_alive():
                child.kill()
