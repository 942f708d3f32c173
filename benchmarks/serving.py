"""Serving throughput and latency: requests/s and p50/p95 latency at concurrency 1, 4 and 16, with
batching (one `generate` call for up to 16 concurrent requests) and without it (one request at a time).

The server runs in its own process (`--server`, the `tiny` preset, fp32, one torch thread by default),
so the load generator (httpx, asyncio, in this process) never shares its GIL. One thread, because
the tiny model's matmuls gain nothing from a second one, and on a small shared VM two OpenMP threads
spin-wait whenever a neighbour takes a core: a 16-row batch measured 0.4–0.5 s with one thread and
2.5–9.5 s with two, minutes apart, under the same outside load. Each client sends one request after
another: one 64×48 PNG as a data URL and a question, greedy, 32 new tokens (the untrained model never
ends early). The two modes alternate over rounds; the median round is reported.

    python benchmarks/serving.py                  # writes benchmarks/results/serving.json (~3 min)
    python benchmarks/serving.py --rounds 1 --concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MAX_TOKENS = 32
CORPUS = [
    "a red circle above a blue square",
    "two green triangles on a white background",
    "what colour is the circle? it is red.",
    "how many shapes are there in the second image?",
]


def serve(port: int, max_batch_size: int, threads: int) -> None:
    """The server process: a tiny model with untrained weights (the speed is what is measured)."""
    import torch
    import uvicorn

    from blip3.factory import create
    from blip3.processing.tokenizer import build_tokenizer
    from blip3.serving import ServeSettings, create_app

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, processor = create("tiny", build_tokenizer(CORPUS * 20, vocab_size=400, phi3_layout=True))
    settings = ServeSettings(max_batch_size=max_batch_size, batch_window_s=0.01, max_pending=1024)
    uvicorn.run(create_app(model, processor, settings), host="127.0.0.1", port=port, log_level="warning")


def request_body() -> dict:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), "red").save(buffer, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What colour is it?"}]
    return {
        "model": "blip3",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
    }


async def load(base_url: str, concurrency: int, total: int) -> dict:
    """`concurrency` clients, each sending its next request when its last one is answered, `total` in all."""
    import httpx

    body, latencies, tokens = request_body(), [], 0
    remaining = total

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal remaining, tokens
        while remaining > 0:
            remaining -= 1
            start = time.perf_counter()
            response = await http.post("/v1/chat/completions", json=body)
            latencies.append(time.perf_counter() - start)
            response.raise_for_status()
            tokens += response.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=300, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "requests": total,
        "requests_per_s": total / elapsed,
        "tokens_per_s": tokens / elapsed,
        "p50_ms": 1000 * statistics.median(latencies),
        "p95_ms": 1000 * latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(max_batch_size: int, threads: int) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    command = [sys.executable, __file__, "--server", "--port", str(port), "--max-batch-size", str(max_batch_size)]
    command += ["--threads", str(threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen(command, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the benchmark server did not start")
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "serving.json")
    parser.add_argument("--server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--max-batch-size", type=int, default=16, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.server:
        serve(args.port, args.max_batch_size, args.threads)
        return

    modes = {"batched": 16, "one-at-a-time": 1}
    runs: dict[str, dict[int, list[dict]]] = {mode: {c: [] for c in args.concurrency} for mode in modes}
    load_before = os.getloadavg()
    for round_index in range(args.rounds):
        for mode, max_batch_size in modes.items():
            server, url = start_server(max_batch_size, args.threads)
            try:
                asyncio.run(load(url, 4, 8))  # warm-up: first calls, thread pools, allocator
                for concurrency in args.concurrency:
                    total = max(16, 4 * concurrency) if max_batch_size > 1 or concurrency == 1 else 2 * concurrency
                    result = asyncio.run(load(url, concurrency, total))
                    runs[mode][concurrency].append(result)
                    print(
                        f"round {round_index + 1} {mode:13s} c={concurrency:2d}: {result['requests_per_s']:6.2f} req/s, "
                        f"p50 {result['p50_ms']:7.1f} ms, p95 {result['p95_ms']:7.1f} ms",
                        flush=True,
                    )
            finally:
                server.terminate()
                server.wait()

    median = {
        mode: {c: sorted(rs, key=lambda r: r["requests_per_s"])[len(rs) // 2] for c, rs in by_c.items()}
        for mode, by_c in runs.items()
    }
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "server_torch_threads": args.threads,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "max_tokens": MAX_TOKENS,
        "median": median,
        "runs": runs,
        "batching_gain": {
            c: median["batched"][c]["requests_per_s"] / median["one-at-a-time"][c]["requests_per_s"]
            for c in args.concurrency
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print("\n| concurrency | mode | requests/s | tokens/s | p50 latency | p95 latency |")
    print("|---|---|---|---|---|---|")
    for concurrency in args.concurrency:
        for mode in modes:
            r = median[mode][concurrency]
            print(
                f"| {concurrency} | {mode} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.0f} | "
                f"{r['p50_ms']:.0f} ms | {r['p95_ms']:.0f} ms |"
            )
    gains = ", ".join(f"{g:.2f}× at {c}" for c, g in results["batching_gain"].items())
    print(
        f"\nbatching gain (requests/s, batched / one-at-a-time): {gains}; load average {load_before} -> {os.getloadavg()}"
    )


if __name__ == "__main__":
    main()
