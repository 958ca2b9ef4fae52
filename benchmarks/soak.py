"""Soak test: ``ric serve`` under concurrent clients for minutes, with random preferences, a share of bad
requests and clients that leave mid-stream. Does it keep answering, how do latencies move, does memory grow?

    .venv/bin/python -m benchmarks.soak runs/quickstart_text/lightning_logs/version_0/checkpoints/last.ckpt

Starts the server with an API key and ``--max-batch-size`` = the client count. Each client loops until the
time is up, drawing what to send: a good request (random preference, streamed or not), a bad one (malformed
JSON, a preference off the simplex, a wrong key, a body over the limit) or a stream it drops after the first
chunk. Records every request's start, latency and outcome, and the resident memory of all the server's
processes every 10 s; writes ``benchmarks/results/soak_<device>.{json,png}``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import signal
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import psutil

from benchmarks.experiment import RESULTS, command, pyplot, save_figure
from benchmarks.serve import ROOT, start_server

KEY = "soak-test-key"
#: bad requests a careless or hostile client sends, by name: (body bytes, key)
BAD = {
    "malformed JSON": (b'{"messages": [', KEY),
    "preference off the simplex": (
        json.dumps({"messages": [{"role": "user", "content": "hi"}], "preference": [0.9, 0.9]}).encode(),
        KEY,
    ),  # fmt: skip
    "wrong key": (json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode(), "not-the-key"),
    "body over the limit": (json.dumps({"prompt": "word " * 1_000_000}).encode(), KEY),
}


def post(url: str, body: bytes, key: str, timeout: float = 300) -> tuple[int, bytes]:
    req = urllib.request.Request(url, body, method="POST", headers={"Content-Type": "application/json",
                                                                     "Authorization": f"Bearer {key}"})  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def good(url: str, prompt: str, preference: list[float], max_tokens: int, stream: bool, leave: bool) -> int:
    body = {"messages": [{"role": "user", "content": prompt}], "preference": preference, "max_tokens": max_tokens,
            "stream": stream}  # fmt: skip
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    req = urllib.request.Request(f"{url}/v1/chat/completions", json.dumps(body).encode(), method="POST",
                                 headers=headers)  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            if leave:
                r.readline()  # the first chunk, then the client goes away
                return r.status
            data = r.read()
            if stream and b"data: [DONE]" not in data:
                return 599  # a stream that did not end properly
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


def memory(pid: int) -> float:
    """Resident memory (MiB) of the server's process and all its descendants."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return float("nan")
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def windows(records: list[dict], seconds: float, width: float = 60.0) -> list[dict]:
    """p50 / p99 latency of the good requests finished in each ``width``-second window."""
    out = []
    for start in np.arange(0, seconds, width):
        lat = [r["latency"] for r in records if r["kind"] == "good" and r["status"] == 200
               and start <= r["end"] < start + width]  # fmt: skip
        out.append({"from_s": float(start), "served": len(lat),
                    "p50_s": float(np.percentile(lat, 50)) if lat else None,
                    "p99_s": float(np.percentile(lat, 99)) if lat else None})  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="an export folder or a .ckpt file")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--bad-share", type=float, default=0.15, help="share of requests that are bad")
    parser.add_argument("--leave-share", type=float, default=0.05, help="share of streams dropped mid-answer")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    prompts = [json.loads(line)["prompt"] for line in (ROOT / "examples/new_questions.jsonl").read_text().splitlines()]
    log = ROOT / "runs" / "soak_server.log"
    log.parent.mkdir(exist_ok=True)
    extra = ("--api-key", KEY, "--timeout", "120")
    proc, url = start_server(args.model, args.clients, 0.05, None, log, extra=extra)
    records: list[dict] = []
    samples: list[tuple[float, float]] = []
    lock = threading.Lock()
    try:
        good(url, prompts[0], [0.5, 0.5], 8, False, False)  # warm-up
        began = time.monotonic()
        deadline = began + args.minutes * 60
        samples.append((0.0, memory(proc.pid)))

        def client(k: int) -> None:
            rng = np.random.default_rng([args.seed, k])
            while time.monotonic() < deadline:
                start = time.monotonic()
                draw = rng.random()
                if draw < args.bad_share:
                    kind = str(rng.choice(list(BAD)))
                    body, key = BAD[kind]
                    status, _ = post(f"{url}/v1/chat/completions", body, key)
                else:
                    w = float(rng.random())
                    leave = draw < args.bad_share + args.leave_share
                    kind = "left mid-stream" if leave else "good"
                    status = good(url, str(rng.choice(prompts)), [w, 1 - w], args.max_tokens,
                                  stream=leave or bool(rng.random() < 0.5), leave=leave)  # fmt: skip
                end = time.monotonic()
                with lock:
                    records.append({"kind": kind, "status": status, "start": start - began, "end": end - began,
                                    "latency": end - start})  # fmt: skip

        threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            time.sleep(10)
            samples.append((time.monotonic() - began, memory(proc.pid)))
            done = len(records)
            print(f"{samples[-1][0]:6.0f} s: {done} requests, server memory {samples[-1][1]:.0f} MiB", flush=True)
        seconds = time.monotonic() - began
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except Exception:  # noqa: BLE001 - a server that does not stop is killed; the run's numbers stand
            os.killpg(proc.pid, signal.SIGKILL)
    outcomes = collections.Counter(f"{r['kind']}: {r['status']}" for r in records)
    served = [r for r in records if r["kind"] == "good" and r["status"] == 200]
    mem = [m for _, m in samples]
    first, last = np.mean(mem[1:4]), np.mean(mem[-3:])  # after warm-up; the last half-minute
    results = {
        "command": command(),
        "model": args.model,
        "device": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "minutes": args.minutes,
        "clients": args.clients,
        "max_tokens": args.max_tokens,
        "seconds": seconds,
        "requests": len(records),
        "good_served": len(served),
        "outcomes": dict(sorted(outcomes.items())),
        "latency_p50_s": float(np.percentile([r["latency"] for r in served], 50)) if served else None,
        "latency_p99_s": float(np.percentile([r["latency"] for r in served], 99)) if served else None,
        "windows": windows(records, seconds),
        "memory_mib": [{"at_s": t, "rss": m} for t, m in samples],
        "memory_start_mib": float(first),
        "memory_end_mib": float(last),
        "server_stopped_cleanly": proc.returncode == 0,
    }
    path = RESULTS / "soak_cpu.json"
    path.write_text(json.dumps(results, indent=2))
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    ws = [w for w in results["windows"] if w["served"]]
    a.plot([w["from_s"] / 60 for w in ws], [w["p50_s"] for w in ws], "o-", label="p50")
    a.plot([w["from_s"] / 60 for w in ws], [w["p99_s"] for w in ws], "o-", label="p99")
    a.set_xlabel("minute")
    a.set_ylabel("latency of good requests (s)")
    a.legend()
    b.plot([t / 60 for t, _ in samples], mem, "o-")
    b.set_xlabel("minute")
    b.set_ylabel("server memory, all processes (MiB)")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    save_figure(fig, path.with_suffix(".png"))
    shown = (
        "requests",
        "good_served",
        "outcomes",
        "latency_p50_s",
        "latency_p99_s",
        "memory_start_mib",
        "memory_end_mib",
    )
    print(json.dumps({k: results[k] for k in shown}, indent=1))
    print(path)


if __name__ == "__main__":
    main()
