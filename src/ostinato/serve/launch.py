"""Load an export directory for serving, run the HTTP server, or hand the directory to vLLM."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer

from ostinato import hardware
from ostinato.config import HardwareConfig
from ostinato.data.tokenizer import read_tokenizer_file
from ostinato.model.hf import DTYPES, load_hf_model, read_hf_config, read_json
from ostinato.serve import vllm_support
from ostinato.serve.engine import Engine
from ostinato.serve.text import CHAT_TEMPLATE

VLLM_DTYPES = {"auto": "auto", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def resolve_device(device: str) -> torch.device:
    return torch.device(hardware.choose_device_type(HardwareConfig(device=device)))


def serving_dtype(directory: Path, device: torch.device, dtype: str) -> torch.dtype:
    """auto: fp32 on CPUs (fast and exact there), the export's own dtype on accelerators."""
    if dtype != "auto":
        return DTYPES[dtype]
    if device.type == "cpu":
        return torch.float32
    stored = read_hf_config(directory).get("torch_dtype", "float32")
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(stored, torch.float32)


def load_engine(
    directory: Path, device: str, dtype: str, max_batch: int
) -> tuple[Engine, Tokenizer, str, str]:
    """The engine for an HF export directory, its tokenizer, EOS token and chat template."""
    if not (directory / "config.json").is_file():
        raise ValueError(
            f"{directory}: no config.json; serve an `ostinato export` directory "
            "(a GGUF export is for llama.cpp)"
        )
    place = resolve_device(device)
    model = load_hf_model(directory, serving_dtype(directory, place, dtype)).to(place)
    tokenizer = read_tokenizer_file(directory / "tokenizer.json")  # ValueError names the file
    eos_token, template = _tokenizer_settings(directory)
    eos_id = tokenizer.token_to_id(eos_token)
    if eos_id is None:
        raise ValueError(f"{directory}: the tokenizer has no EOS token {eos_token!r}")
    return Engine(model, eos_id, max_batch), tokenizer, eos_token, template


def use_cpu_threads(engine: Engine, threads: int) -> None:
    """Threads for a model served on CPUs; 0: every core this process may use but one.

    The HTTP event loop (parsing, detokenizing, sending chunks) runs beside the model on the
    same cores. With as many model threads as cores, the threads that wait between the model's
    operations take the core the event loop needs: on 2 cores, 1 thread served 1.5-2x more
    tokens/s than 2 (BENCHMARKS.md, serving throughput).
    """
    if engine.device.type != "cpu":
        return
    # The cores this process may run on (a container's or taskset's share); macOS has no
    # affinity call, and there every core is this process's to use.
    if hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))
    else:
        cores = os.cpu_count() or 1
    torch.set_num_threads(threads or max(1, cores - 1))


def _tokenizer_settings(directory: Path) -> tuple[str, str]:
    """EOS token and chat template from tokenizer_config.json (ours, or any HF model's)."""
    path = directory / "tokenizer_config.json"
    settings = read_json(path) if path.is_file() else {}  # ValueError names the file
    eos = settings.get("eos_token") or "<|endoftext|>"
    eos = eos["content"] if isinstance(eos, dict) else eos
    template = settings.get("chat_template") or CHAT_TEMPLATE
    if isinstance(template, list):  # named templates: use the default one
        template = next(
            (t["template"] for t in template if t.get("name") == "default"), CHAT_TEMPLATE
        )
    return eos, template


def bind(host: str, port: int) -> tuple[socket.socket, str]:
    """A listening socket (port 0: the OS picks a free one) and the URL it serves on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, not 0: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on
    # connections whose socket says it is TCP, and accepted sockets copy the listener's proto.
    # With proto 0 every streamed chunk after the headers waited for the client's delayed ACK
    # (~40 ms of time to first token).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    return sock, f"http://{shown}:{sock.getsockname()[1]}"


def run_http(app, sock: socket.socket, url: str) -> None:
    import uvicorn

    # The first line of output, exactly: scripts and tests read the port from it.
    print(f"serving on {url}", flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])


def exec_vllm(
    directory: Path,
    host: str,
    port: int,
    api_key: str | None,
    name: str,
    max_batch: int,
    dtype: str,
) -> None:
    """Replace this process by vLLM's OpenAI server on the same directory and flags."""
    if not vllm_support.installed():
        raise ValueError(
            f"--engine vllm: vLLM is not installed here. {vllm_support.INSTALL}, or serve with "
            "--engine ostinato."
        )
    if port == 0:  # vLLM binds by itself: find a free port for it
        probe, _ = bind(host, 0)
        port = probe.getsockname()[1]
        probe.close()
    args, env = vllm_command(sys.executable, directory, host, port, api_key, name, max_batch, dtype)
    shown = f"[{host}]" if ":" in host else host
    print(f"serving on http://{shown}:{port}", flush=True)
    os.execve(sys.executable, args, env)


def vllm_command(
    python: str,
    directory: Path,
    host: str,
    port: int,
    api_key: str | None,
    name: str,
    max_batch: int,
    dtype: str,
) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of vLLM's OpenAI server for these flags, run by
    `python` (this interpreter, or another venv's: bench/serve_throughput.py)."""
    args = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(directory)]
    args += ["--host", host, "--port", str(port), "--served-model-name", name]
    args += ["--max-num-seqs", str(max_batch), "--dtype", VLLM_DTYPES[dtype]]
    args += ["--api-key", api_key] if api_key else []
    return args, dict(vllm_support.with_cpu_defaults(dict(os.environ)))
