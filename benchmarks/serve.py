"""Serving throughput: ``ric serve`` under 1, 8 and 32 concurrent clients, each request with its own random
preference, against the same requests sent one at a time (the 1-client level), in one run.

    .venv/bin/python -m benchmarks.serve runs/quickstart_text/lightning_logs/version_0/checkpoints/last.ckpt

Starts the server itself (``--max-batch-size`` = the largest client count), warms it up, then for each level
sends the same prompts (``--requests`` of them, from ``examples/new_questions.jsonl``) with the official
``openai`` client. Reports requests/s, completion tokens/s, p50/p95 latency and each level's throughput over
the one-at-a-time level; writes ``benchmarks/results/serve_<device>.json``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, max_batch: int, batch_timeout: float, device: str | None, log: Path,
                 code: Path = ROOT, extra: tuple[str, ...] = ()) -> tuple:  # fmt: skip
    """``ric serve`` (with ``extra`` arguments) in its own process group; ``(process, url)`` once it is up."""
    port = free_port()
    cmd = [sys.executable, "-m", "ric.cli", "serve", str(Path(model).resolve()), "--port", str(port),
           "--max-batch-size", str(max_batch), "--batch-timeout", str(batch_timeout), *extra]  # fmt: skip
    cmd += ["--device", device] if device else []
    proc = subprocess.Popen(cmd, cwd=code, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError("the server did not start in 300 s")


def run_level(client, prompts: list[str], clients: int, max_tokens: int, seed: int, stream: bool = False) -> dict:
    """``clients`` threads send ``prompts`` (each at its own random preference); with ``stream`` the time to
    the first content chunk is recorded too."""
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet([1.0, 1.0], size=len(prompts)).round(4)
    weights[:, 1] = 1.0 - weights[:, 0]

    def one(k: int) -> tuple[float, int, int, float]:
        start = time.perf_counter()
        messages = [{"role": "user", "content": prompts[k]}]
        extra = {"preference": weights[k].tolist()}
        if not stream:
            reply = client.chat.completions.create(model="ric", messages=messages, max_tokens=max_tokens,
                                                   temperature=0.7, extra_body=extra)  # fmt: skip
            return time.perf_counter() - start, reply.usage.completion_tokens, reply.model_extra["batch_size"], 0.0
        first, last = None, None
        for chunk in client.chat.completions.create(model="ric", messages=messages, max_tokens=max_tokens,
                                                    temperature=0.7, extra_body=extra, stream=True):  # fmt: skip
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - start
            last = chunk
        tokens = last.usage.completion_tokens if getattr(last, "usage", None) else 0
        return time.perf_counter() - start, tokens, last.model_extra.get("batch_size", 0), first or 0.0

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(len(prompts))))
    wall = time.perf_counter() - start
    latency = np.array([r[0] for r in results])
    tokens = sum(r[1] for r in results)
    out = {
        "clients": clients,
        "stream": stream,
        "requests": len(prompts),
        "wall_s": wall,
        "requests_per_s": len(prompts) / wall,
        "completion_tokens_per_s": tokens / wall,
        "completion_tokens": tokens,
        "latency_p50_s": float(np.percentile(latency, 50)),
        "latency_p95_s": float(np.percentile(latency, 95)),
        "mean_batch_size": float(np.mean([r[2] for r in results])),
    }
    if stream:
        first = np.array([r[3] for r in results])
        out["time_to_first_token_p50_s"] = float(np.percentile(first, 50))
        out["time_to_first_token_p95_s"] = float(np.percentile(first, 95))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="an export folder or a .ckpt file")
    parser.add_argument("--levels", default="1,8,32", help="concurrent clients per level")
    parser.add_argument("--requests", type=int, default=64, help="requests per level (the same prompts each time)")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--batch-timeout", type=float, default=0.05)
    parser.add_argument("--device", default=None)
    parser.add_argument("--stream-levels", default="8", help="levels run again with streaming (time to first token)")
    parser.add_argument("--code", type=Path, default=ROOT, help="run the server of this checkout (a baseline)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import openai

    levels = [int(v) for v in args.levels.split(",")]
    questions = [json.loads(line)["prompt"] for line in (ROOT / "examples" / "new_questions.jsonl").open()]
    prompts = [questions[k % len(questions)] for k in range(args.requests)]
    log = Path("/tmp") / f"ric-serve-bench-{os.getpid()}.log"
    proc, url = start_server(args.model, max(levels), args.batch_timeout, args.device, log, args.code)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=3600)
        run_level(client, prompts[: max(levels)], max(levels), args.max_tokens, seed=99)  # warm-up
        results = []
        streams = [int(v) for v in args.stream_levels.split(",") if v]
        for clients, stream in [(c, False) for c in levels] + [(c, True) for c in streams]:
            r = run_level(client, prompts, clients, args.max_tokens, seed=0, stream=stream)
            results.append(r)
            ttft = f", first token p50 {r['time_to_first_token_p50_s']:.2f} s" if stream else ""
            print(f"{clients:>3} clients{' (streaming)' if stream else ''}: {r['requests_per_s']:.2f} req/s, "
                  f"{r['completion_tokens_per_s']:.1f} tokens/s, p50 {r['latency_p50_s']:.2f} s, "
                  f"p95 {r['latency_p95_s']:.2f} s, mean batch {r['mean_batch_size']:.1f}{ttft}",
                  flush=True)  # fmt: skip
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    base = next((r for r in results if r["clients"] == 1 and not r["stream"]), results[0])
    for r in results:
        r["throughput_vs_one_at_a_time"] = r["requests_per_s"] / base["requests_per_s"]
        print(f"{r['clients']:>3} clients: {r['throughput_vs_one_at_a_time']:.2f}x the one-at-a-time throughput")
    import torch

    device = args.device or "cpu"
    out = args.out or ROOT / "benchmarks" / "results" / f"serve_{'cuda' if device.startswith('cuda') else 'cpu'}.json"
    summary = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model": args.model,
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(),
        "max_tokens": args.max_tokens,
        "batch_timeout_s": args.batch_timeout,
        "code": str(args.code),
        "levels": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    print(out)


if __name__ == "__main__":
    main()
