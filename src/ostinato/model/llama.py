"""A Llama-family decoder in one file: RMSNorm, RoPE, SwiGLU, grouped-query attention.

Parameter names and shapes are those of Hugging Face `LlamaForCausalLM`
(`model.layers.0.self_attn.q_proj.weight`, ...), so export is a copy of the state dict.
No systems code lives here: no parallelism, no devices, no checkpoints.

Shapes: B batch, T time, D model dim, H query heads, K key/value heads, E head dim, V vocab.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ostinato.config import ModelConfig


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Upcast bf16/fp16 for numerically sensitive parts; leave fp32 and fp64 alone."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


# Which rows of a parameter a rank's tensor holds: (that tensor, its first row's index).
LocalRows = Callable[[nn.Parameter], tuple[torch.Tensor, int]]
BLOCK_VALUES = 1 << 20  # values drawn from one generator: enough to amortise its seeding


def normal_rows(
    seed: int, name: str, shape: torch.Size, first: int, count: int, std: float
) -> torch.Tensor:
    """Rows first:first + count of parameter `name` (of `shape`) drawn from N(0, std^2).

    Rows come in blocks of about BLOCK_VALUES values, each block from a generator seeded by
    (seed, name, block), so any range of rows can be drawn without drawing the others."""
    row_values = math.prod(shape[1:])
    per_block = max(1, BLOCK_VALUES // max(1, row_values))
    out = torch.empty(count, *shape[1:])
    if count == 0:  # a shard of a small parameter may hold no rows
        return out
    for block in range(first // per_block, (first + count - 1) // per_block + 1):
        start = block * per_block
        rows = min(per_block, shape[0] - start)
        # the CPU generator keeps 32 bits of a seed: fold seed, name and block into 32
        key = zlib.crc32(f"{seed}/{name}#{block}".encode())
        generator = torch.Generator().manual_seed(key)
        values = torch.empty(rows, *shape[1:]).normal_(0.0, std, generator=generator)
        lo, hi = max(first, start), min(first + count, start + rows)
        out[lo - first : hi - first] = values[lo - start : hi - start]
    return out


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, as HF does, so bf16 activations do not lose the scale.
        x32 = at_least_fp32(x)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_tables(cfg: ModelConfig, device: torch.device | None = None) -> torch.Tensor:
    """cos and sin of every position, stacked: (2, max_seq_len, E), HF's half-split layout."""
    head_dim = cfg.head_dim
    inv_freq = 1.0 / (
        cfg.rope_theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    )
    angles = torch.outer(torch.arange(cfg.max_seq_len, device=device).float(), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return torch.stack([angles.cos(), angles.sin()])


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, heads, T, E); cos, sin: (T, E) or (B, 1, T, E)."""
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return (at_least_fp32(x) * cos + at_least_fp32(rotated) * sin).to(x.dtype)


class KVCache:
    """Keys and values of past positions for one layer: (B, K, T_past, E) each."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, E)
        k = (
            self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        )  # (B, K, T, E)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.extend(k, v)
        # Without an explicit mask, the query block is the last T positions of a causal sequence.
        causal = mask is None and k.shape[2] == T
        if mask is None and not causal:
            mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - T)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache=None, mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """HF's `LlamaModel`: embeddings, decoder layers and the final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)


class Llama(nn.Module):
    """HF's `LlamaForCausalLM`: the backbone and the output head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("rope", rope_tables(cfg), persistent=False)

    @torch.no_grad()
    def init_weights(self, seed: int, local: LocalRows | None = None) -> None:
        """Normal init; residual output projections scaled down by depth (GPT-2 style).

        Every value depends only on the seed, the parameter's name and its row (`normal_rows`),
        so a rank that holds rows `first:first + n` of a parameter draws exactly those, and a
        model cut into any number of shards starts from the values of the uncut one. `local`
        says which rows a parameter's tensor holds here; the default: all of them."""
        residual_std = self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
        for name, param in self.named_parameters():
            rows, first = local(param) if local is not None else (param.data, 0)
            if name.endswith("norm.weight"):
                rows.fill_(1.0)
                continue
            std = residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else None
            rows.copy_(
                normal_rows(seed, name, param.shape, first, rows.shape[0], std or self.cfg.init_std)
            )
        # the rotary tables are computed, not drawn; a model built on the meta device has none
        self.rope = rope_tables(self.cfg).to(self.rope.device)

    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        positions: torch.Tensor | None = None,
        caches: list[KVCache] | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens: (B, T). Returns the mean cross-entropy if `targets` is given, else logits (B, T, V).

        `positions` (T,) or (B, T) defaults to 0..T-1; `caches` (one per layer) hold past keys and
        values for incremental decoding; `mask` (B, 1, T, T_total) is a boolean attention mask.
        """
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device)
        cos, sin = self.rope[0][positions], self.rope[1][positions]
        if cos.dim() == 3:  # per-sequence positions: broadcast over heads
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        x = self.model.embed_tokens(tokens)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, None if caches is None else caches[i], mask)
        hidden = self.model.norm(x)
        if targets is None:
            return self.lm_head(hidden)
        return head_loss(hidden.flatten(0, 1), self.lm_head.weight, targets.flatten())


# Tokens whose logits exist at once when the loss is computed: the head's logits (tokens x
# vocabulary) are the largest activation of a step, and recomputing the layers cannot touch
# them. 128 rows ran as fast as the whole batch at once on CPU (bench/sharding_memory.py).
LOSS_CHUNK_TOKENS = 128


def head_loss(hidden: torch.Tensor, head: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of `hidden` (N, D) through the output head (V, D), chunk by chunk:
    torch's `linear_cross_entropy` computes each chunk's gradients in the forward pass and
    keeps no logits. Low-precision values are accumulated in fp32 (the "accurate" policy).
    Tokens that fit one chunk take the plain path: the same logits, less overhead."""
    if hidden.shape[0] <= LOSS_CHUNK_TOKENS:
        logits = at_least_fp32(F.linear(hidden, head))
        return F.cross_entropy(logits, targets, ignore_index=-100)
    low_precision = torch.promote_types(hidden.dtype, torch.float32) != hidden.dtype
    options = nn.LinearCrossEntropyOptions(
        batch_chunk_size=LOSS_CHUNK_TOKENS,
        chunking_method=None,
        acc_policy="accurate" if low_precision else "compact",
    )
    return F.linear_cross_entropy(hidden, head, targets, ignore_index=-100, options=options)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
