"""Generated tokens/s of `ostinato serve` at 1, 4 and 16 concurrent requests vs transformers.

Both sides run the same exported model (fp32) on the same prompts and generate exactly
--max-tokens tokens per request (EOS ignored). Each level sends --requests requests, at most C
at a time. transformers is measured as a plain server would use it, one `generate` per request
(sequential), and, for reference, as static batches of C left-padded prompts.

    .venv/bin/python bench/serve_throughput.py [--run RUN_DIR] [--size demo]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]


def prepare_export(run: Path | None, size: str, work: Path) -> Path:
    """Export RUN, or a freshly initialised model of SIZE (weights do not change the speed)."""
    from ostinato.config import load_config
    from ostinato.serve.convert import export_model
    from ostinato.train.trainer import train

    if run is None:
        run = work / "run"
        overrides = [
            f"model.size={size}",
            "train.steps=1",
            "data.problems=2000",
            "train.eval_problems=0",
        ]
        train(load_config(ROOT / "configs/demo.toml", overrides), run, "none", show_progress=False)
    export_model(run, work / "export", "fp32")
    return work / "export"


def prompts(count: int) -> list[str]:
    return [f"Question: What is {11 + 7 * i} + {23 + 3 * i}?\nAnswer:" for i in range(count)]


async def one_request(http: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> float:
    """Streams one completion; returns its time to first token."""
    body = {"model": "export", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    started, first = time.perf_counter(), None
    async with http.stream(
        "POST", f"{url}/v1/completions", json={**body, "stream": True, "ignore_eos": True}
    ) as r:
        async for line in r.aiter_lines():
            if first is None and line.startswith("data: {"):
                first = time.perf_counter() - started
    return first


async def serve_level(
    url: str, texts: list[str], concurrency: int, max_tokens: int
) -> tuple[float, float]:
    """(tokens/s, median time to first token) with `concurrency` requests in flight."""
    queue, ttfts = list(texts), []

    async def worker(http: httpx.AsyncClient) -> None:
        while queue:
            ttfts.append(await one_request(http, url, queue.pop(), max_tokens))

    async with httpx.AsyncClient(timeout=600) as http:
        await one_request(http, url, texts[0], 4)  # warm-up
        started = time.perf_counter()
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return len(texts) * max_tokens / elapsed, statistics.median(ttfts)


def measure_server(export: Path, texts: list[str], levels: list[int], max_tokens: int) -> dict:
    command = [
        sys.executable,
        "-m",
        "ostinato",
        "serve",
        str(export),
        "--port",
        "0",
        "--max-batch",
        str(max(levels)),
    ]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = proc.stdout.readline().strip().removeprefix("serving on ")
        for _ in range(300):
            try:
                httpx.get(f"{url}/health")
                break
            except httpx.TransportError:
                time.sleep(0.1)
        return {c: asyncio.run(serve_level(url, texts, c, max_tokens)) for c in levels}
    finally:
        proc.terminate()
        proc.wait(10)


@torch.no_grad()
def measure_transformers(
    export: Path, texts: list[str], levels: list[int], max_tokens: int
) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    model.generation_config.max_length = None  # max_new_tokens decides; silences a warning
    tokenizer = AutoTokenizer.from_pretrained(export, padding_side="left")

    def run(batch: list[str], new_tokens: int) -> float:
        inputs = tokenizer(batch, return_tensors="pt", padding=True)
        started = time.perf_counter()
        model.generate(
            **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
        )
        return time.perf_counter() - started

    run(texts[:1], 4)  # warm-up
    ttft = statistics.median(run([t], 1) for t in texts[:5])
    sequential = len(texts) * max_tokens / sum(run([t], max_tokens) for t in texts)
    batched = {}
    for c in levels:
        elapsed = sum(run(texts[i : i + c], max_tokens) for i in range(0, len(texts), c))
        batched[c] = len(texts) * max_tokens / elapsed
    return {"ttft": ttft, "sequential": sequential, "batched": batched}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a trained run (default: a fresh model of --size)")
    parser.add_argument("--size", default="demo")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--levels", default="1,4,16")
    args = parser.parse_args()
    levels = [int(c) for c in args.levels.split(",")]
    with tempfile.TemporaryDirectory() as work:
        export = prepare_export(args.run, args.size, Path(work))
        texts = prompts(args.requests)
        ours = measure_server(export, texts, levels, args.max_tokens)
        theirs = measure_transformers(export, texts, levels, args.max_tokens)
    print(
        f"model {args.size if args.run is None else args.run}, {args.requests} requests x {args.max_tokens} tokens, fp32, {torch.get_num_threads()} threads"
    )
    print(
        f"{'concurrent':>10} {'ostinato tok/s':>15} {'TTFT ms':>8} {'hf seq tok/s':>13} {'hf batch tok/s':>15} {'vs seq':>7} {'vs batch':>9}"
    )
    results = {}
    for c in levels:
        rate, ttft = ours[c]
        seq, batch = theirs["sequential"], theirs["batched"][c]
        print(
            f"{c:>10} {rate:>15.0f} {ttft * 1000:>8.1f} {seq:>13.0f} {batch:>15.0f} {rate / seq:>6.2f}x {rate / batch:>8.2f}x"
        )
        results[c] = {"ostinato": rate, "ttft_s": ttft, "hf_sequential": seq, "hf_batched": batch}
    print(f"transformers time to first token (batch 1): {theirs['ttft'] * 1000:.1f} ms")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
