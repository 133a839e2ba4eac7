"""HF <-> ostinato conversion without a trained run: config mapping, weights, parity, sharding."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ostinato.config import MODEL_SIZES, ModelConfig
from ostinato.data.tokenizer import EOS, train_tokenizer
from ostinato.model import hf
from ostinato.model.generate import generate
from ostinato.model.llama import Llama
from ostinato.serve.convert import tokenizer_config
from ostinato.serve.text import TextStream, render_chat

pytestmark = pytest.mark.timeout(60)


def tiny_model(tie: bool = False) -> Llama:
    cfg = ModelConfig(size="tiny", max_seq_len=64, tie_embeddings=tie, **MODEL_SIZES["tiny"])
    model = Llama(cfg)
    model.init_weights(0)
    return model.eval()


def to_transformers(model: Llama) -> LlamaForCausalLM:
    """Load our weights into transformers the way from_pretrained would: strictly."""
    theirs = LlamaForCausalLM(LlamaConfig(**hf.hf_config(model.cfg, torch.float32, eos_id=0)))
    result = theirs.load_state_dict(hf.to_hf_tensors(model, torch.float32), strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys == (["lm_head.weight"] if model.cfg.tie_embeddings else [])
    return theirs.eval()


@pytest.mark.parametrize("tie", [False, True])
def test_transformers_computes_our_logits(tie: bool) -> None:
    model = tiny_model(tie)
    theirs = to_transformers(model)
    tokens = torch.randint(
        0, model.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        assert (model(tokens) - theirs(tokens).logits).abs().max() <= 1e-4
        ours = generate(model, tokens[0, :8].tolist(), 12)
        out = theirs.generate(tokens[:1, :8], max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert ours == out[0, 8:].tolist()


def test_config_round_trip() -> None:
    cfg = tiny_model(tie=True).cfg
    back = hf.model_config_from_hf(hf.hf_config(cfg, torch.bfloat16, eos_id=3))
    assert back == cfg


def test_unsupported_features_are_named() -> None:
    config = hf.hf_config(tiny_model().cfg, torch.float32, eos_id=0)
    config.update(
        architectures=["MistralForCausalLM"],
        model_type="mistral",
        rope_scaling={"rope_type": "llama3", "factor": 8.0},
        attention_bias=True,
    )
    with pytest.raises(ValueError) as err:
        hf.model_config_from_hf(config)
    for name in ("MistralForCausalLM", "llama3", "attention_bias"):
        assert name in str(err.value)


def test_sharded_weights_round_trip(tmp_path) -> None:
    model = tiny_model()
    tensors = hf.to_hf_tensors(model, torch.float32)
    files = hf.save_safetensors(tensors, tmp_path, max_shard_bytes=100_000)
    assert len(files) > 1 and not (tmp_path / hf.SINGLE_FILE).exists()
    index = json.loads((tmp_path / hf.INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(tensors)
    loaded = hf.load_safetensors(tmp_path)
    assert all(torch.equal(loaded[name], tensors[name]) for name in tensors)
    fresh = Llama(model.cfg)
    hf.load_hf_weights(fresh, loaded)
    assert all(
        torch.equal(a, b)
        for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True)
    )


def test_missing_or_malformed_config_fields_are_named() -> None:
    config = hf.hf_config(tiny_model().cfg, torch.float32, eos_id=0)
    del config["hidden_size"], config["vocab_size"]
    config.update(num_hidden_layers="2", head_dim=None, rope_parameters=None)
    with pytest.raises(ValueError) as err:
        hf.model_config_from_hf(config)
    message = str(err.value)
    assert message.startswith("config.json: ")
    for named in ("hidden_size is missing", "vocab_size is missing", "num_hidden_layers = '2'"):
        assert named in message


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", "\udcff"])
def test_a_config_that_is_not_a_json_object_names_the_file(tmp_path, content) -> None:
    (tmp_path / "config.json").write_text(content, errors="surrogateescape")
    with pytest.raises(ValueError, match=f"{tmp_path / 'config.json'}: "):
        hf.read_hf_config(tmp_path)


@pytest.mark.parametrize(
    "name", ["../model.safetensors", "/etc/passwd", "a/../../b.safetensors", "a\\b", 7]
)
def test_shard_names_that_leave_the_directory_are_refused(tmp_path, name) -> None:
    hf.save_safetensors(hf.to_hf_tensors(tiny_model(), torch.float32), tmp_path, 100_000)
    index = json.loads((tmp_path / hf.INDEX_FILE).read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = name
    (tmp_path / hf.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ValueError, match="is not a file inside"):
        hf.load_safetensors(tmp_path)


def test_a_corrupt_safetensors_file_names_the_file(tmp_path) -> None:
    hf.save_safetensors(hf.to_hf_tensors(tiny_model(), torch.float32), tmp_path)
    (tmp_path / hf.SINGLE_FILE).write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        hf.load_safetensors(tmp_path)


def test_weights_of_another_shape_are_refused() -> None:
    tensors = hf.to_hf_tensors(tiny_model(), torch.float32)
    del tensors["model.norm.weight"]
    with pytest.raises(ValueError, match="model.norm.weight"):
        hf.load_hf_weights(tiny_model(), tensors)


def test_chat_template_renders_as_transformers_does() -> None:
    tokenizer = train_tokenizer(["Question: What is 2 + 3?\nAnswer: 5 #### 5"], 300)
    settings = tokenizer_config(64)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOS, chat_template=settings["chat_template"]
    )
    messages = [
        {"role": "system", "content": "Show your steps."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "2 + 3 = 5. #### 5"},
        {"role": "user", "content": "What is 4 + 4?"},
    ]
    ours = render_chat(messages, EOS)
    assert ours == fast.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.endswith(f"#### 5{EOS}Question: What is 4 + 4?\nAnswer:")


def test_text_stream_holds_back_stops_and_partial_characters() -> None:
    tokenizer = train_tokenizer(["hello world. #### 42 é"], 280)
    ids = tokenizer.encode("hello world. #### 42", add_special_tokens=False).ids
    stream = TextStream(tokenizer, stop=["####"])
    text = "".join(stream.push(i) for i in ids)
    assert stream.stopped and text == "hello world. "
    stream = TextStream(tokenizer)
    pieces = [stream.push(i) for i in tokenizer.encode("é", add_special_tokens=False).ids]
    assert "\ufffd" not in "".join(pieces) and "".join(pieces) + stream.flush() == "é"
