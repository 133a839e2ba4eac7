"""Write a GGUF file for llama.cpp with the `gguf` package: weights, hyper-parameters, tokenizer
and chat template (rendered by llama.cpp's Jinja engine: llama-server's default, `--jinja`
for llama-cli).

llama.cpp's `llama` architecture rotates adjacent pairs of each head's dimensions, while HF's
(and our) RoPE rotates the two halves; q and k rows are permuted accordingly, exactly as
llama.cpp's own convert_hf_to_gguf.py does.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import torch
from tokenizers import Tokenizer

from ostinato.data.tokenizer import eos_id
from ostinato.model.hf import to_hf_tensors
from ostinato.model.llama import Llama
from ostinato.serve.text import CHAT_TEMPLATE

QTYPES = {
    "fp32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "fp16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
}


def halves_to_pairs(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's output rows from HF's half-split RoPE layout to adjacent pairs."""
    rows, cols = weight.shape
    return weight.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def write_gguf(model: Llama, tokenizer: Tokenizer, path: Path, dtype: str, name: str) -> Path:
    """`name` is the model's name (`general.name`), shown by llama.cpp: the export's name."""
    cfg = model.cfg
    qtype, file_type = QTYPES[dtype]
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(name or "ostinato")
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.dim)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.ffn_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(file_type)
    _add_tokenizer(writer, tokenizer, cfg.vocab_size)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.n_layers)
    for hf_name, tensor in to_hf_tensors(model, torch.float32).items():
        if hf_name.endswith("q_proj.weight"):
            tensor = halves_to_pairs(tensor, cfg.n_heads)
        elif hf_name.endswith("k_proj.weight"):
            tensor = halves_to_pairs(tensor, cfg.n_kv_heads)
        name = names.get_name(hf_name, try_suffixes=(".weight",))
        assert name is not None, f"no GGUF name for {hf_name}"
        data = tensor.numpy()
        # llama.cpp keeps 1-D tensors (the norms) in fp32 whatever the file type.
        wanted = qtype if data.ndim > 1 else gguf.GGMLQuantizationType.F32
        writer.add_tensor(name, gguf.quants.quantize(data, wanted), raw_dtype=wanted)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer: Tokenizer, vocab_size: int) -> None:
    """A GPT-2-style byte-level BPE vocabulary, padded to the embedding's rows."""
    spec = json.loads(tokenizer.to_str())
    by_id = {i: tok for tok, i in tokenizer.get_vocab(with_added_tokens=True).items()}
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    tokens, types = [], []
    for i in range(vocab_size):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        if i not in by_id:
            types.append(gguf.TokenType.UNUSED)
        else:
            types.append(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    writer.add_token_merges(merges)
    eos = eos_id(tokenizer)
    writer.add_bos_token_id(eos)
    writer.add_eos_token_id(eos)
    writer.add_pad_token_id(eos)
    writer.add_add_bos_token(False)
    # The template `ostinato chat` and tokenizer_config.json use: without it llama.cpp falls back
    # to another format, which this model was never trained on, and answers with nothing.
    writer.add_chat_template(CHAT_TEMPLATE)
