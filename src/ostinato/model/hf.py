"""Hugging Face <-> ostinato: `LlamaForCausalLM` config.json and safetensors weights.

Our parameter names are HF's, so the weights map one to one; what this module adds is the
config translation, the tied-embedding rule (HF omits `lm_head.weight` when it is tied),
dtype casting and safetensors sharding. It knows nothing of checkpoints or tokenizers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ostinato.config import MODEL_SIZES, ModelConfig
from ostinato.model.llama import Llama

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 1024**3  # HF's own default shard size
# Buffers some older exporters saved; they are recomputed from rope_theta, never learned.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_config(cfg: ModelConfig, dtype: torch.dtype, eos_id: int) -> dict[str, Any]:
    """config.json for `LlamaForCausalLM`. The tokenizer has no BOS token, so BOS = EOS."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        # transformers < 5, vLLM and llama.cpp read rope_theta; transformers 5 rope_parameters.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "pad_token_id": eos_id,
        "use_cache": True,
        "torch_dtype": HF_DTYPE_NAMES[dtype],
        "dtype": HF_DTYPE_NAMES[dtype],
    }


def _unsupported(hf: dict[str, Any]) -> list[str]:
    """Every feature of an HF config that our Llama does not implement, named."""
    problems = []
    archs = hf.get("architectures") or []
    if hf.get("model_type") != "llama" or (archs and archs != ["LlamaForCausalLM"]):
        problems.append(
            f"architecture {archs or hf.get('model_type')!r}: only LlamaForCausalLM is supported"
        )
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        problems.append(f"rope_scaling = {rope!r}: must be an object")
    elif rope.get("rope_type", rope.get("type", "default")) != "default":
        problems.append(f"rope scaling {rope!r}: only plain RoPE is supported")
    for key, allowed in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu")):
        if hf.get(key, allowed) != allowed:
            problems.append(f"{key} = {hf[key]!r}: only {allowed!r} is supported")
    heads, dim = hf.get("num_attention_heads", 0), hf.get("hidden_size", 0)
    if heads and (hf.get("head_dim") or dim // heads) * heads != dim:
        problems.append(f"head_dim = {hf['head_dim']}: must be hidden_size / num_attention_heads")
    if hf.get("quantization_config"):
        problems.append("quantization_config: quantized weights are not supported")
    return problems


# Fields without which the model's shape is unknown; every other field has a Llama default.
REQUIRED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
)


def _missing_or_bad(hf: dict[str, Any]) -> list[str]:
    """Every required dimension that is absent or not a positive integer, named."""
    problems = []
    for key in REQUIRED_FIELDS:
        if key not in hf:
            problems.append(f"{key} is missing")
    for key in (*REQUIRED_FIELDS, "num_key_value_heads", "head_dim", "max_position_embeddings"):
        value = hf.get(key)
        if key in hf and value is not None and (type(value) is not int or value < 1):
            problems.append(f"{key} = {value!r}: must be a positive integer")
    return problems


def model_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Our ModelConfig for an HF Llama config; one ValueError names every missing field and
    unsupported feature."""
    problems = _missing_or_bad(hf)
    if problems:
        raise ValueError("config.json: " + "; ".join(problems))
    problems = _unsupported(hf)
    if problems:
        raise ValueError("cannot import this model: " + "; ".join(problems))
    rope = hf.get("rope_parameters")
    rope = rope if isinstance(rope, dict) else {}
    dims = dict(
        vocab_size=hf["vocab_size"],
        dim=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        ffn_dim=hf["intermediate_size"],
    )
    # `size` must name a preset; every dimension is set explicitly, so the nearest one is kept.
    size = min(MODEL_SIZES, key=lambda name: abs(MODEL_SIZES[name]["dim"] - dims["dim"]))
    return ModelConfig(
        size=size,
        **dims,
        max_seq_len=hf.get("max_position_embeddings", 2048),
        rope_theta=float(hf.get("rope_theta", rope.get("rope_theta", 10000.0))),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
    )


def to_hf_tensors(model: Llama, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Our state dict as HF stores it: cast, contiguous, without the tied output head."""
    state = model.state_dict()
    if model.cfg.tie_embeddings:
        del state["lm_head.weight"]
    return {name: t.detach().to("cpu", dtype).contiguous() for name, t in state.items()}


def save_safetensors(
    tensors: dict[str, torch.Tensor], out: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES
) -> list[Path]:
    """One model.safetensors, or numbered shards plus the index HF expects above the limit."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        _save_file(tensors, out / SINGLE_FILE)
        return [out / SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file, shard in zip(names, shards, strict=True):
        _save_file(shard, out / file)
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return [out / name for name in names]


def _save_file(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file(tensors, path, metadata={"format": "pt"})  # transformers checks the format
    # safetensors creates the file owner-only; a serving stack often runs as another user.
    path.chmod(0o644)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file from elsewhere; a ValueError names the file if it is not one."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a JSON object was expected, found {type(data).__name__}")
    return data


def shard_names(directory: Path) -> list[str]:
    """The shard files an index names, each checked to be a relative path inside `directory`."""
    index = directory / INDEX_FILE
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index}: no weight_map naming the shard files")
    for name in weight_map.values():
        if not _is_inside(name):
            raise ValueError(
                f"{index}: shard name {name!r} is not a file inside {directory} "
                "(absolute paths and '..' are refused)"
            )
    return sorted(set(weight_map.values()))


def _is_inside(name: Any) -> bool:
    """A relative path that cannot leave its directory: not absolute, no '..', no backslash."""
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        return False
    path = Path(name)
    return not path.is_absolute() and ".." not in path.parts


def load_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF directory, single-file or sharded."""
    if (directory / INDEX_FILE).is_file():
        files = shard_names(directory)
    elif (directory / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        raise ValueError(
            f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}; only safetensors weights are read "
            "(convert .bin/.pth weights with transformers' save_pretrained first)"
        )
    tensors = {}
    for file in files:
        tensors.update(_read_safetensors(directory / file))
    return tensors


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ValueError(f"{path}: missing (named by {INDEX_FILE})")
    try:
        with safe_open(path, framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # safetensors raises its own SafetensorError, or OSError
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None


def load_hf_weights(model: Llama, tensors: dict[str, torch.Tensor]) -> None:
    """Copy HF tensors into `model` (cast to its dtype); a missing or extra name is a ValueError."""
    tensors = {k: v for k, v in tensors.items() if not k.endswith(IGNORED_SUFFIXES)}
    expected = set(model.state_dict())
    if model.cfg.tie_embeddings:
        expected.discard("lm_head.weight")
        tensors.pop("lm_head.weight", None)  # some exporters write the tied copy anyway
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ValueError(
            f"weights do not fit a Llama of this config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]} ({len(missing)} missing, {len(unexpected)} unexpected)"
        )
    params = model.state_dict()
    for name, tensor in tensors.items():
        if params[name].shape != tensor.shape:
            raise ValueError(
                f"{name}: shape {tuple(tensor.shape)} in the weights, "
                f"{tuple(params[name].shape)} expected from config.json"
            )
        with torch.no_grad():
            params[name].copy_(tensor)


def read_hf_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise ValueError(f"{directory}: no config.json; give a Hugging Face model directory")
    return read_json(path)


def load_hf_model(directory: str | Path, dtype: torch.dtype = torch.float32) -> Llama:
    """Our Llama (eval mode, on CPU) built from an HF Llama directory."""
    directory = Path(directory)
    cfg = model_config_from_hf(read_hf_config(directory))
    model = Llama(cfg)
    load_hf_weights(model, load_safetensors(directory))
    return model.to(dtype).eval()
