"""Load on ``textrnn serve``: 1, 8, 32 and 64 concurrent streaming clients, each for a fixed time.

Starts ``textrnn serve RUN_DIR`` on 127.0.0.1 in its own process, then for each client count runs
that many asyncio clients (httpx, one process) that each stream completions back to back until the
time is up. Reports aggregate chars/s (characters received by all clients in the window), p50 and
p99 time to first token, p50 and p99 gap between chunks, and errors (any non-200 status, error
event or missing ``[DONE]``). All rows come from one run on one server, so their ratios compare.

    python bench/serve_load.py /tmp/serve-run                       # the table in BENCHMARKS.md
    python bench/serve_load.py /tmp/serve-run --seconds 5 --clients 1 32 --chunk-ms 0 20 50
    python bench/serve_load.py /tmp/serve-run --seconds 5 --clients 1 32 --threads 1 2
    python bench/serve_load.py /tmp/serve-run --determinism 32       # seeded alone vs in a crowd

The clients share the machine with the server: on 2 cores they take a real part of it, so the
numbers are a floor for what a separate client machine would see.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from bench.common import machine  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


async def client(base: str, http: httpx.AsyncClient, deadline: float, max_tokens: int, index: int,
                 stats: dict) -> None:
    """Stream completions one after another until ``deadline``."""
    number = 0
    while time.monotonic() < deadline:
        request = {"prompt": "ROMEO:", "max_tokens": max_tokens, "temperature": 0.8, "stream": True,
                   "seed": index * 100_000 + number}
        number += 1
        started = time.monotonic()
        last = None
        done = False
        try:
            async with http.stream("POST", f"{base}/v1/completions", json=request) as response:
                if response.status_code != 200:
                    stats["errors"] += 1
                    await response.aread()
                    continue
                buffer = ""
                async for text in response.aiter_text():
                    now = time.monotonic()
                    if now > deadline:
                        return
                    buffer += text
                    *events, buffer = buffer.split("\n\n")
                    got = 0
                    for event in events:
                        data = event.removeprefix("data: ")
                        if data == "[DONE]":
                            done = True
                            continue
                        chunk = json.loads(data)
                        if "error" in chunk:
                            stats["errors"] += 1
                            continue
                        got += len(chunk["choices"][0]["text"])
                    if got:
                        if last is None:
                            stats["ttft"].append(now - started)
                        else:
                            stats["gaps"].append(now - last)
                        last = now
                        stats["chars"] += got
            if not done:
                stats["errors"] += 1
            stats["requests"] += 1
        except httpx.HTTPError:
            if time.monotonic() < deadline:
                stats["errors"] += 1


async def measure(base: str, clients: int, seconds: float, max_tokens: int) -> dict:
    stats = {"chars": 0, "ttft": [], "gaps": [], "errors": 0, "requests": 0}
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        started = time.monotonic()
        deadline = started + seconds
        tasks = [asyncio.create_task(client(base, http, deadline, max_tokens, i, stats)) for i in range(clients)]
        await asyncio.gather(*tasks)
        stats["seconds"] = time.monotonic() - started
    return stats


async def determinism(base: str, crowd: int, requests: int, max_tokens: int) -> tuple[int, int, int]:
    """Seeded requests alone, then each beside ``crowd - 1`` others: (requests differing, tokens compared,
    tokens after the first difference)."""
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=crowd + 4)) as http:
        async def complete(seed: int, temperature: float = 1.0) -> str:
            body = {"prompt": "ROMEO:", "max_tokens": max_tokens, "seed": seed, "temperature": temperature}
            response = await http.post(f"{base}/v1/completions", json=body)
            return response.json()["choices"][0]["text"]

        alone = [await complete(seed) for seed in range(requests)]
        together = []
        for start in range(0, requests, crowd):
            seeds = list(range(start, min(start + crowd, requests)))
            fillers = [complete(10_000 + i, 0.9) for i in range(crowd - len(seeds))]
            results = await asyncio.gather(*[complete(s) for s in seeds], *fillers)
            together += results[:len(seeds)]
    differing = sum(a != b for a, b in zip(alone, together))
    diverged = sum(len(a) - next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
                   for a, b in zip(alone, together))
    return differing, requests * max_tokens, diverged


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(run_dir: str, chunk_ms: float, max_streams: int, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "textrnn", "serve", run_dir, "--port", str(port),
                                "--chunk-ms", str(chunk_ms), "--max-streams", str(max_streams),
                                "--threads", str(threads)],
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return process, base
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    process.kill()
    raise SystemExit("the server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--seconds", type=float, default=10.0, help="time per client count")
    parser.add_argument("--max-tokens", type=int, default=500, help="tokens per completion")
    parser.add_argument("--chunk-ms", type=float, nargs="+", default=[20.0], help="server --chunk-ms values")
    parser.add_argument("--threads", type=int, nargs="+", default=[1], help="server --threads values")
    parser.add_argument("--determinism", type=int, default=0, metavar="CROWD",
                        help="instead: compare 64 seeded completions alone and in crowds of CROWD")
    args = parser.parse_args()

    load = os.getloadavg()[0]
    print(f"machine: {machine().split(', ')[0]}, {os.cpu_count()} CPUs; load average {load:.2f} at start")
    for chunk_ms, threads in [(c, t) for t in args.threads for c in args.chunk_ms]:
        process, base = start_server(args.run_dir, chunk_ms, max(64, max(args.clients)), threads)
        try:
            if args.determinism:
                differing, tokens, diverged = asyncio.run(determinism(base, args.determinism, 64, args.max_tokens))
                print(f"seeded alone vs in a crowd of {args.determinism}: {differing} of 64 completions differ; "
                      f"{diverged} of {tokens} tokens come after a first difference")
                continue
            print(f"\nserver --chunk-ms {chunk_ms:g} --threads {threads}, {args.seconds:g} s per row, completions of "
                  f"{args.max_tokens} tokens\n")
            print("| clients | chars/s | x one client | TTFT p50 | TTFT p99 | gap p50 | gap p99 | requests | errors |")
            print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
            one = None
            for clients in args.clients:
                stats = asyncio.run(measure(base, clients, args.seconds, args.max_tokens))
                rate = stats["chars"] / stats["seconds"]
                one = one or rate
                ms = lambda values, q: f"{1000 * percentile(values, q):.0f} ms"  # noqa: E731
                print(f"| {clients} | {rate:,.0f} | {rate / one:.1f}x | {ms(stats['ttft'], 50)} | "
                      f"{ms(stats['ttft'], 99)} | {ms(stats['gaps'], 50)} | {ms(stats['gaps'], 99)} | "
                      f"{stats['requests']} | {stats['errors']} |", flush=True)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(30)
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
