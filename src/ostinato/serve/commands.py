"""The export, import, verify, serve and chat commands; `register(app)` adds them to the CLI.

Each is a typed function whose docstring is its --help; heavy imports happen inside, so
`ostinato --help` stays fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ostinato.cli_support import Debug, user_errors
from ostinato.config import ServeConfig

Directory = Annotated[Path, typer.Argument(help="An export directory (from ostinato export).")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda or npu.")]


@user_errors
def export(
    source: Annotated[Path, typer.Argument(help="A run directory or one of its checkpoints.")],
    out: Annotated[Path, typer.Option(help="Directory to write the model into.")],
    dtype: Annotated[str, typer.Option(help="Weight dtype: fp32, bf16 or fp16.")] = "fp32",
    format: Annotated[str, typer.Option(help="hf (safetensors) or gguf (llama.cpp).")] = "hf",
    debug: Debug = False,
) -> None:
    """Export a trained model for other stacks: transformers, vLLM, vllm-ascend, llama.cpp.

    hf writes model.safetensors (sharded above 5 GiB), config.json (LlamaForCausalLM),
    generation_config.json, tokenizer.json and tokenizer_config.json with a chat template.
    An unfinished or corrupted checkpoint is refused with the reason.
    """
    from ostinato.serve.convert import export_model

    files = export_model(source, out, dtype, format)
    typer.echo(f"exported {', '.join(f.name for f in files)} ({dtype}) to {out}")


@user_errors
def import_(
    hf_dir: Annotated[Path, typer.Argument(help="A local Hugging Face Llama directory.")],
    out: Annotated[Path, typer.Option(help="Run directory to create.")],
    debug: Debug = False,
) -> None:
    """Turn a local Hugging Face Llama model (safetensors) into an ostinato run to train on.

    Writes OUT/config.toml, OUT/tokenizer.json and a model-only checkpoint; continue with
    `ostinato train --config OUT/config.toml --out OUT`. Nothing is downloaded.
    """
    from ostinato.serve.convert import import_model

    checkpoint = import_model(hf_dir, out)
    typer.echo(f"imported {hf_dir} into {checkpoint}")
    typer.echo(f"continue training with: ostinato train --config {out}/config.toml --out {out}")


@user_errors
def verify(
    directory: Directory,
    device: Device = "cpu",
    checkpoint: Annotated[
        Path | None, typer.Option(help="Trained checkpoint (default: the one the export names).")
    ] = None,
    tolerance: Annotated[
        float | None, typer.Option(help="Largest logit difference accepted (default by dtype).")
    ] = None,
    debug: Debug = False,
) -> None:
    """Compare an export (run by transformers) with its trained checkpoint on DEVICE.

    Reports the largest logit difference, the share of greedy tokens that agree and each
    model's perplexity on fixed texts; exits with 1 beyond the tolerance.
    """
    from ostinato.serve.verify import verify_export

    result = verify_export(directory, device, checkpoint, tolerance)
    typer.echo(
        f"device {result.device}  dtype {result.dtype}  texts {result.texts}  "
        f"positions {result.tokens}\n"
        f"max |logit difference|  {result.max_abs_diff:.3g} (tolerance {result.tolerance:g})\n"
        f"greedy agreement        {result.agreement:.1%} (at least {result.min_agreement:.0%})\n"
        f"perplexity              trained {result.ppl_trained:.4f}  export {result.ppl_export:.4f}"
    )
    typer.echo("verified" if result.passed else "FAILED: the export does not match the checkpoint")
    if not result.passed:
        raise typer.Exit(1)


@user_errors
def serve(
    directory: Directory,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port; 0 picks a free one.")] = 8000,
    api_key: Annotated[
        str | None, typer.Option(envvar="OSTINATO_API_KEY", help="Require this bearer token.")
    ] = None,
    engine: Annotated[
        str, typer.Option(help="ostinato, or vllm to hand the directory to vLLM.")
    ] = "ostinato",
    device: Device = "auto",
    dtype: Annotated[
        str, typer.Option(help="auto (fp32 on CPUs, else the export's), fp32, bf16, fp16.")
    ] = "auto",
    max_batch: Annotated[
        int, typer.Option(help="Sequences decoded together (KV-cache slots).")
    ] = 16,
    max_concurrent: Annotated[int, typer.Option(help="Requests in flight before 429.")] = 64,
    threads: Annotated[
        int,
        typer.Option(help="CPU threads for the model (0: all cores but one, left to HTTP)."),
    ] = 0,
    max_body_bytes: Annotated[
        int, typer.Option(help="Largest request body, in bytes; a larger one gets 413.")
    ] = ServeConfig.max_body_bytes,
    name: Annotated[
        str | None, typer.Option(help="Model name clients ask for (default: DIR's name).")
    ] = None,
    debug: Debug = False,
) -> None:
    """Serve an export over an OpenAI-compatible HTTP API.

    /v1/models, /v1/completions, /v1/chat/completions (stream: true for server-sent events),
    /health and /metrics (Prometheus). The first line printed is `serving on http://HOST:PORT`.
    """
    from ostinato.serve.launch import bind, exec_vllm, load_engine, run_http, use_cpu_threads

    name = name or directory.resolve().name
    if engine not in ("ostinato", "vllm"):
        raise ValueError(f"--engine {engine}: choose ostinato or vllm")
    if dtype not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"--dtype {dtype}: choose auto, fp32, bf16 or fp16")
    if max_batch < 1 or max_concurrent < 1 or max_body_bytes < 1:
        raise ValueError("--max-batch, --max-concurrent and --max-body-bytes must be at least 1")
    if threads < 0:
        raise ValueError(f"--threads {threads}: a number of threads, or 0 for all cores but one")
    if engine == "vllm":
        exec_vllm(directory, host, port, api_key, name, max_batch, dtype)
    from ostinato.serve.api import Served, create_app

    model_engine, tokenizer, eos_token, template = load_engine(directory, device, dtype, max_batch)
    use_cpu_threads(model_engine, threads)
    served = Served(
        model_engine, tokenizer, name, eos_token, template, api_key, max_concurrent, max_body_bytes
    )
    sock, url = bind(host, port)
    run_http(create_app(served), sock, url)


@user_errors
def chat(
    directory: Directory,
    device: Device = "auto",
    max_tokens: Annotated[int, typer.Option(help="Longest answer, in tokens.")] = 128,
    temperature: Annotated[float, typer.Option(help="0 answers greedily.")] = 0.0,
    debug: Debug = False,
) -> None:
    """Chat with an export in the terminal, on the engine `serve` uses; answers stream."""
    from ostinato.serve.chat import Chat, run_chat
    from ostinato.serve.engine import Sampling
    from ostinato.serve.launch import load_engine

    model_engine, tokenizer, eos_token, template = load_engine(directory, device, "auto", 1)
    run_chat(
        Chat(model_engine, tokenizer, eos_token, template),
        Sampling(max_tokens, temperature),
        echo=not sys.stdin.isatty(),
    )


def register(app: typer.Typer) -> None:
    app.command()(export)
    app.command("import")(import_)
    app.command()(verify)
    app.command()(serve)
    app.command()(chat)
