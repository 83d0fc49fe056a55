"""Annotation client throughput against a loopback OpenAI-compatible server with a fixed latency.

The server (tests/fixtures/llm_server.py, asyncio on uvloop, in its own process) answers every
chat request after exactly L seconds and injects no faults, so at concurrency C its capacity is
C / L requests per second: the baseline. The client is the real `openai` backend (payload
building, semaphore, circuit breaker, stats, response parsing) driven the way the stage drives it.

Figures (JSON on stdout):
  utilization                  achieved requests/s over C/L (bar: >= 0.9 at C=64, L=200 ms, 5,000 requests)
  requests_per_s               achieved
  client_cpu_ms_per_request    CPU time of the client process per request
  structured / list            the same for instruct requests with structured output (response_format
                               json_schema) and without (numbered-list text, parsed tolerantly):
                               requests/s, utilization and output parse failures. The loopback server
                               writes list answers in assorted formats, 1 in 16 of them run together in a
                               sentence; with a schema it answers JSON, as constrained decoding would. So
                               this measures the client-side cost and the parser, not the cost of guided
                               decoding on a GPU server.
  describe_client_cpu_ms_per_request   two 512 px images resized, JPEG- and base64-encoded per request
  server_cpu_ms_per_request    to show the server is not the bottleneck

Usage: .venv/bin/python bench/annotate.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megapairs_ops.stages.annotate.backends import DescribeRequest, InstructRequest, run_async  # noqa: E402
from megapairs_ops.stages.annotate.backends.openai_backend import OpenAIBackend  # noqa: E402
from megapairs_ops.stages.annotate.checks import check_instructions  # noqa: E402
from megapairs_ops.stages.annotate.parsing import parse_instructions  # noqa: E402
from megapairs_ops.stages.annotate.prompts import draw_demos, load_prompt_set  # noqa: E402
from megapairs_ops.config import StepConfig  # noqa: E402
from tests.fixtures.llm_server import serve_in_process  # noqa: E402

DESCRIPTION = (
    "Both images show a narrow cobblestone street in an old town with pastel houses and flower boxes. "
    "The query image shows a red road bicycle leaning against a yellow wall next to a wooden door, while "
    "the target image shows a cream vintage scooter parked at the kerb in front of a pale green wall. "
    "Both are daytime shots at street level with soft shade and no people in view."
)


def start_server(latency_s: float) -> tuple[multiprocessing.Process, str]:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=serve_in_process, args=(child,), kwargs={"latency_s": latency_s, "text_style": "varied"},
                       daemon=True)
    proc.start()
    port = parent.recv()
    return proc, f"http://127.0.0.1:{port}/v1"


def server_stats(base_url: str) -> dict:
    return httpx.get(base_url + "/_stats").json()


def instruct_requests(n: int, tag: str) -> list[InstructRequest]:
    prompts = load_prompt_set("v1")
    out = []
    for i in range(n):
        key = f"bench:{tag}:{i}"
        demos = draw_demos(prompts.demos, 5, key)
        out.append(InstructRequest(f"p{i}", key, prompts.render_instruct(demos, DESCRIPTION, tag == "structured"),
                                   DESCRIPTION, "", ""))
    return out


def drive(backend: OpenAIBackend, calls: list, concurrency: int) -> tuple[list, float, float]:
    """Run all calls through one session with the stage's pattern (a window of tasks); returns
    (results, wall seconds, client CPU seconds)."""

    async def main() -> list:
        async with backend.session():
            window = asyncio.Semaphore(concurrency * 2)

            async def one(call):
                try:
                    return await call()
                finally:
                    window.release()

            tasks = []
            for call in calls:
                await window.acquire()
                tasks.append(asyncio.create_task(one(call)))
            return await asyncio.gather(*tasks)

    cpu0, t0 = time.process_time(), time.perf_counter()
    results = run_async(main())
    return results, time.perf_counter() - t0, time.process_time() - cpu0


def measure(base_url: str, concurrency: int, latency_s: float, n: int, structured: bool) -> dict:
    step = StepConfig(backend="openai", model="bench", base_url=base_url, concurrency=concurrency,
                      structured_output=structured, timeout_s=30, max_tokens=256)
    backend = OpenAIBackend(step)
    requests = instruct_requests(n, "structured" if structured else "list")
    before = server_stats(base_url)
    results, wall, cpu = drive(backend, [lambda r=r: backend.ainstruct(r) for r in requests], concurrency)
    after = server_stats(base_url)
    failures = sum(not check_instructions(parse_instructions(r.text), DESCRIPTION, 3)[0] for r in results if r.ok)
    errors = sum(not r.ok for r in results)
    rps = n / wall
    served = max(after["served"] - before["served"], 1)
    return {
        "requests": n,
        "requests_per_s": round(rps, 1),
        "utilization": round(rps / (concurrency / latency_s), 4),
        "client_cpu_ms_per_request": round(1000 * cpu / n, 3),
        "server_cpu_ms_per_request": round(1000 * (after["cpu_s"] - before["cpu_s"]) / served, 3),
        "request_errors": errors,
        "parse_failures": failures,
        "parse_failure_rate": round(failures / max(n - errors, 1), 4),
        "latency_ms_p50": backend.stats["instruct"].latency.quantile(0.5),
        "latency_ms_p95": backend.stats["instruct"].latency.quantile(0.95),
    }


def describe_cost(base_url: str, concurrency: int, n: int) -> float:
    """Client CPU per describe request: two 512px JPEGs resized and base64-encoded (off the loop)."""
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(8):
            path = Path(tmp) / f"img{i}.jpg"
            Image.fromarray(rng.integers(0, 255, (768, 1024, 3), dtype=np.uint8)).save(path, quality=90)
            paths.append(str(path))
        step = StepConfig(backend="openai", model="bench", base_url=base_url, concurrency=concurrency, timeout_s=30)
        backend = OpenAIBackend(step)
        reqs = [
            DescribeRequest(f"p{i}", f"bench:d:{i}", "Describe the two images in about 80 words.", 80,
                            paths[i % 8], paths[(i + 1) % 8], "", "")
            for i in range(n)
        ]
        results, _, cpu = drive(backend, [lambda r=r: backend.adescribe(r) for r in reqs], concurrency)
        assert all(r.ok for r in results), [r.detail for r in results if not r.ok][:3]
    return round(1000 * cpu / n, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run, not the bar)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--requests", type=int, default=None)
    args = parser.parse_args()
    n = args.requests or (1000 if args.quick else 5000)
    n_mode = max(n // 5, 200) if args.quick else 2000

    load_before = os.getloadavg()[0]
    proc, base_url = start_server(args.latency)
    try:
        for _ in range(50):  # the server process is up once /_stats answers
            try:
                server_stats(base_url)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        measure(base_url, args.concurrency, args.latency, 128, False)  # warm-up: connections, imports
        main_run = measure(base_url, args.concurrency, args.latency, n, False)
        listed = measure(base_url, args.concurrency, args.latency, n_mode, False)
        structured = measure(base_url, args.concurrency, args.latency, n_mode, True)
        describe_ms = describe_cost(base_url, args.concurrency, 64 if args.quick else 256)
    finally:
        proc.terminate()
        proc.join()

    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    out = {
        "utilization": main_run["utilization"],
        "requests_per_s": main_run["requests_per_s"],
        "client_cpu_ms_per_request": main_run["client_cpu_ms_per_request"],
        "baseline_requests_per_s": round(args.concurrency / args.latency, 1),
        "concurrency": args.concurrency,
        "latency_s": args.latency,
        "requests": n,
        "bar": 0.9,
        "meets_bar": main_run["utilization"] >= 0.9,
        "server_cpu_ms_per_request": main_run["server_cpu_ms_per_request"],
        "latency_ms_p50": main_run["latency_ms_p50"],
        "latency_ms_p95": main_run["latency_ms_p95"],
        "request_errors": main_run["request_errors"],
        "list": {k: listed[k] for k in ("requests", "requests_per_s", "utilization", "client_cpu_ms_per_request",
                                        "parse_failures", "parse_failure_rate")},
        "structured": {k: structured[k] for k in ("requests", "requests_per_s", "utilization", "client_cpu_ms_per_request",
                                                  "parse_failures", "parse_failure_rate")},
        "structured_over_list_requests_per_s": round(structured["requests_per_s"] / listed["requests_per_s"], 4),
        "describe_client_cpu_ms_per_request": describe_ms,
        "event_loop": loop,
        "cpus": os.cpu_count(),
        "load_avg_1m_before": round(load_before, 2),
        "load_avg_1m_after": round(os.getloadavg()[0], 2),
        "quick": args.quick,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
