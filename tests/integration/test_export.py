"""export / import / verify on a really trained (tiny) run: transformers, GGUF, round trips."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import gguf
import pytest
import torch
import typer
from jinja2.sandbox import ImmutableSandboxedEnvironment
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from ostinato.checkpoint.reader import load_trained
from ostinato.config import load_config
from ostinato.data.tokenizer import EOS
from ostinato.model import hf
from ostinato.model.generate import generate
from ostinato.serve.commands import register
from ostinato.serve.convert import warn_head_size
from ostinato.serve.gguf_export import halves_to_pairs
from ostinato.serve.text import render_chat
from ostinato.train.trainer import train

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parents[2]
EXPORT_FILES = (
    "model.safetensors",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "ostinato.json",
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    cfg = load_config(ROOT / "configs/tiny.toml", ["train.steps=5", "train.eval_problems=0"])
    train(cfg, out, "none", show_progress=False)
    return out


def cli(*args: str) -> tuple[int, str]:
    app = typer.Typer()
    register(app)
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def export_dir(run_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export")
    code, output = cli("export", run_dir, "--out", out)
    assert code == 0, output
    return out


def test_transformers_loads_the_export_and_agrees(run_dir, export_dir, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        theirs, info = AutoModelForCausalLM.from_pretrained(export_dir, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert not [r for r in caplog.records if "key" in r.getMessage().lower()]
    trained = load_trained(run_dir)
    prompt = trained.tokenizer.encode("Question: What is 12 + 30?\nAnswer:").ids
    tokens = torch.tensor([prompt])
    with torch.no_grad():
        assert (trained.model(tokens) - theirs(tokens).logits).abs().max() <= 1e-4
        ours = generate(trained.model, prompt, 16)
        out = theirs.eval().generate(tokens, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    assert out[0, len(prompt) :].tolist() == ours
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (export_dir / name).is_file()
    assert "chat_template" in json.loads((export_dir / "tokenizer_config.json").read_text())


def test_import_round_trips_bit_exactly_and_training_continues(
    run_dir, export_dir, tmp_path
) -> None:
    code, output = cli("import", export_dir, "--out", tmp_path / "imported")
    assert code == 0, output
    original, imported = load_trained(run_dir), load_trained(tmp_path / "imported")
    for (name, a), b in zip(
        original.model.state_dict().items(), imported.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    cfg = load_config(
        tmp_path / "imported/config.toml",
        ["train.steps=1", "data.problems=50", "train.eval_problems=0"],
    )
    result = train(cfg, tmp_path / "imported", "auto", show_progress=False)
    assert result.step == 1
    code, output = cli("import", export_dir, "--out", tmp_path / "imported")
    assert code == 2 and "already holds checkpoints" in output


def test_verify_passes_and_catches_a_broken_export(export_dir, tmp_path) -> None:
    code, output = cli("verify", export_dir, "--device", "cpu")
    assert code == 0 and "verified" in output, output
    broken = tmp_path / "broken"
    shutil.copytree(export_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    config["rms_norm_eps"] = 0.5  # a wrong conversion: same weights, different computation
    (broken / "config.json").write_text(json.dumps(config))
    code, output = cli("verify", broken, "--device", "cpu")
    assert code == 1 and "FAILED" in output


def test_bf16_sharded_export_loads(run_dir, tmp_path) -> None:
    from ostinato.serve.convert import export_model

    files = export_model(run_dir, tmp_path, "bf16", max_shard_bytes=200_000)
    assert len(files) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    theirs, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert next(theirs.parameters()).dtype == torch.bfloat16
    code, output = cli("verify", tmp_path)
    assert code == 0, output


def test_export_refuses_unfinished_and_corrupted_checkpoints(run_dir, tmp_path) -> None:
    checkpoint = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    corrupted = tmp_path / checkpoint.name
    shutil.copytree(checkpoint, corrupted)
    data = next(corrupted.glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:-10] + b"0123456789")
    code, output = cli("export", corrupted, "--out", tmp_path / "out")
    assert code == 2 and "checksum mismatch" in output
    (corrupted / "COMMITTED").unlink()
    code, output = cli("export", corrupted, "--out", tmp_path / "out")
    assert code == 2 and "not committed" in output


def test_gguf_export_reads_back(run_dir, tmp_path) -> None:
    out = tmp_path / "tiny-gguf"
    code, output = cli("export", run_dir, "--out", out, "--format", "gguf")
    assert code == 0, output
    reader = gguf.GGUFReader(str(out / "model.gguf"))
    fields = {name: field.contents() for name, field in reader.fields.items()}
    trained = load_trained(run_dir)
    cfg = trained.model.cfg
    assert fields["general.architecture"] == "llama"
    assert fields["general.name"] == "tiny-gguf"
    assert fields["llama.block_count"] == cfg.n_layers
    assert fields["llama.context_length"] == cfg.max_seq_len
    assert fields["llama.attention.head_count_kv"] == cfg.n_kv_heads
    assert len(fields["tokenizer.ggml.tokens"]) == cfg.vocab_size
    assert fields["tokenizer.ggml.eos_token_id"] == trained.tokenizer.token_to_id("<|endoftext|>")
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 + 9 * cfg.n_layers + 1  # embeddings, norm, head; 9 per block
    state = trained.model.state_dict()
    embed = torch.from_numpy(tensors["token_embd.weight"].data.copy())
    assert torch.equal(embed, state["model.embed_tokens.weight"])
    q = torch.from_numpy(tensors["blk.0.attn_q.weight"].data.copy())
    expected = halves_to_pairs(state["model.layers.0.self_attn.q_proj.weight"], cfg.n_heads)
    assert torch.equal(q, expected)
    assert_same_prompts_as_ostinato_chat(fields)


def assert_same_prompts_as_ostinato_chat(fields: dict) -> None:
    """llama.cpp renders `tokenizer.chat_template` with Jinja (trim_blocks, lstrip_blocks) and
    the EOS token's text from the file's vocabulary: that must be `ostinato chat`'s prompt."""
    template = fields["tokenizer.chat_template"]
    eos_text = fields["tokenizer.ggml.tokens"][fields["tokenizer.ggml.eos_token_id"]]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    messages = [
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "2 + 3 = 5. #### 5"},
        {"role": "user", "content": "What is 4 + 4?"},
    ]
    theirs = env.from_string(template).render(
        messages=messages, eos_token=eos_text, bos_token="", add_generation_prompt=True
    )
    assert theirs == render_chat(messages, EOS)
    assert theirs.endswith(f"#### 5{EOS}Question: What is 4 + 4?\nAnswer:")


def test_re_export_replaces_the_directory_whole(run_dir, tmp_path) -> None:
    from ostinato.serve.convert import export_model

    out = tmp_path / "model"
    sharded = export_model(run_dir, out, "bf16", max_shard_bytes=200_000)
    assert len(sharded) > 1 and (out / hf.INDEX_FILE).is_file()
    (out / "notes.txt").write_text("written by hand into an earlier export")
    files = export_model(run_dir, out, "fp32")
    assert files == [out / hf.SINGLE_FILE]
    assert sorted(p.name for p in out.iterdir()) == sorted(EXPORT_FILES)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary directory is left
    assert len(hf.load_safetensors(out)) == len(
        hf.to_hf_tensors(load_trained(run_dir).model, torch.float32)
    )


def test_export_never_replaces_a_directory_that_is_not_an_export(run_dir, tmp_path) -> None:
    (tmp_path / "thesis.tex").write_text("years of work")
    code, output = cli("export", run_dir, "--out", tmp_path)
    assert code == 2 and "not an ostinato export" in output, output
    assert [p.name for p in tmp_path.iterdir()] == ["thesis.tex"]


def test_head_size_vllm_rejects_is_warned(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="ostinato"):
        warn_head_size(16)
        warn_head_size(32)
    assert len(caplog.records) == 1 and "head size 16" in caplog.records[0].getMessage()
