"""`ostinato serve` as a user runs it (a subprocess on port 0) against the official openai client."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from ostinato.checkpoint.reader import load_trained
from ostinato.config import load_config
from ostinato.data.tokenizer import eos_id
from ostinato.model.generate import generate
from ostinato.serve.convert import export_model
from ostinato.serve.text import render_chat
from ostinato.train.trainer import train

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[2]
QUESTIONS = [f"What is {10 + i} + {3 * i + 7}?" for i in range(16)]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run")
    cfg = load_config(ROOT / "configs/tiny.toml", ["train.steps=5", "train.eval_problems=0"])
    train(cfg, run, "none", show_progress=False)
    return run


@pytest.fixture(scope="module")
def export_dir(run_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "tiny"  # the served model's name
    export_model(run_dir, out)
    return out


def start_server(directory: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ostinato", "serve", str(directory), "--port", "0", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    first = proc.stdout.readline().strip()
    assert first.startswith("serving on http://127.0.0.1:"), first
    url = first.removeprefix("serving on ")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if (
                httpx.get(f"{url}/health", headers={"authorization": "Bearer key"}).status_code
                == 200
            ):
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("server did not become healthy")


@pytest.fixture(scope="module")
def server(export_dir):
    proc, url = start_server(export_dir)
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def reference(run_dir):
    """Greedy answers of the trained model itself, one sequence at a time."""
    trained = load_trained(run_dir)
    tok, eos = trained.tokenizer, eos_id(trained.tokenizer)

    def answer(prompt: str, max_tokens: int, lstrip: bool = False) -> str:
        ids = tok.encode(prompt, add_special_tokens=False).ids
        text = tok.decode(generate(trained.model, ids, max_tokens, stop_id=eos))
        return text.lstrip() if lstrip else text

    def chat(question: str, max_tokens: int) -> str:
        prompt = render_chat([{"role": "user", "content": question}], "<|endoftext|>")
        return answer(prompt, max_tokens, lstrip=True)

    answer.chat = chat
    return answer


def client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def test_models_completion_and_chat(server, reference) -> None:
    api = client(server)
    assert [m.id for m in api.models.list().data] == ["tiny"]
    prompt = "Question: What is 12 + 30?\nAnswer:"
    done = api.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0)
    assert done.choices[0].text == reference(prompt, 20)
    chat = api.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": QUESTIONS[0]}],
        max_tokens=20,
        temperature=0,
    )
    assert chat.choices[0].message.content == reference.chat(QUESTIONS[0], 20)
    assert chat.usage.completion_tokens > 0


def test_streaming_chat_and_16_concurrent_streams(server, reference) -> None:
    api = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)

    async def stream(question: str) -> str:
        messages = [{"role": "user", "content": question}]
        chunks = await api.chat.completions.create(
            model="tiny", messages=messages, max_tokens=24, temperature=0, stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])

    async def all_streams() -> list[str]:
        return await asyncio.gather(*(stream(q) for q in QUESTIONS))

    answers = asyncio.run(all_streams())
    assert answers == [reference.chat(q, 24) for q in QUESTIONS]
    metrics = httpx.get(f"{server}/metrics").text
    assert "ostinato_generated_tokens_total" in metrics


BAD_REQUESTS = [
    ("/v1/completions", b"{not json", 400),
    ("/v1/completions", {"model": "tiny"}, 400),  # no prompt
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": "many"}, 400),
    ("/v1/completions", {"model": "gpt-9", "prompt": "hi"}, 404),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 10_000}, 400),
    ("/v1/completions", {"model": "tiny", "prompt": "word " * 500, "max_tokens": 1}, 400),
    ("/v1/completions", {"model": "tiny", "prompt": ""}, 400),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user"}]}, 400),
    ("/v1/chat/completions", {"model": "tiny", "messages": "hello"}, 400),
    (
        "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 3},
        400,
    ),
    ("/v1/nothing", {}, 404),
]


@pytest.mark.parametrize(("path", "body", "status"), BAD_REQUESTS)
def test_bad_requests_get_openai_errors(server, path, body, status) -> None:
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = httpx.post(f"{server}{path}", headers={"content-type": "application/json"}, **kwargs)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["message"] and error["type"] and "Traceback" not in response.text
    assert httpx.get(f"{server}/health").status_code == 200


def test_api_key_and_too_many_requests(export_dir) -> None:
    proc, url = start_server(
        export_dir, "--api-key", "key", "--max-concurrent", "1", "--max-batch", "1"
    )
    try:
        assert httpx.get(f"{url}/v1/models").status_code == 401
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").models.list()
        body = {"model": "tiny", "prompt": "Question:", "max_tokens": 60, "ignore_eos": True}

        async def burst() -> list[int]:
            async with httpx.AsyncClient(
                headers={"authorization": "Bearer key"}, timeout=60
            ) as http:
                replies = await asyncio.gather(
                    *(http.post(f"{url}/v1/completions", json=body) for _ in range(6))
                )
            assert all("error" in r.json() for r in replies if r.status_code != 200)
            return sorted(r.status_code for r in replies)

        statuses = asyncio.run(burst())
        assert 200 in statuses and 429 in statuses and set(statuses) == {200, 429}
        assert client(url, "key").completions.create(model="tiny", prompt="Question:", max_tokens=2)
        # Refusals are counted by path and status, a 401 before any route ran included.
        metrics = httpx.get(f"{url}/metrics", headers={"authorization": "Bearer key"}).text
        counted = {
            line.split("{", 1)[1].split("}", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("ostinato_http_requests_total{")
        }
        assert counted['path="/v1/models",status="401"'] >= 2
        assert counted['path="/v1/completions",status="429"'] == statuses.count(429)
        assert counted['path="/v1/completions",status="200"'] == statuses.count(200) + 1
    finally:
        proc.terminate()
        proc.wait(10)


def test_terminal_chat_streams_an_answer(export_dir) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ostinato", "chat", str(export_dir), "--max-tokens", "12"],
        input="What is 2 + 3?\n/exit\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "What is 2 + 3?" in result.stdout and "model> " in result.stdout
