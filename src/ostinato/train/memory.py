"""What one rank holds while training, as a formula: the planner reads it (plan/costs.py) to
say whether a model fits an island, and the trainer measures the same thing from its tensors
(summary.json's `state_bytes_per_rank`); tests/integration/test_fsdp.py holds the two together.

Strategy and recomputation names are those of the `[parallel]` section (train/parallel.py).
"""

from __future__ import annotations

import math

from ostinato.model.llama import LOSS_CHUNK_TOKENS

# Per parameter: fp32 master weights (4), their gradients (4; FSDP2 keeps the sharded gradient
# in the parameters' fp32 and reduces it in fp32 on accelerators too) and AdamW's two fp32
# moments (8). The bf16 copies an accelerator computes with are gathered one layer at a time.
STATE_BYTES_PER_PARAM = 16
# Activation values per token and hidden unit that one decoder layer saves for its backward pass,
# with fused attention (no sequence-squared term): Korthikanti et al. 2022, "Reducing Activation
# Recomputation in Large Transformer Models" (arXiv 2205.05198), eq. 1: 34 bytes in 16-bit.
LAYER_ACTIVATION_VALUES = 17
# What a recomputed layer keeps: its input.
LAYER_INPUT_VALUES = 1
# The loss head (model/llama.py: head_loss) holds the logits of LOSS_CHUNK_TOKENS tokens at a
# time (in the compute precision) and the fp32 log-softmax of them: (value bytes + 4) per token
# and vocabulary entry. It computes the head's weight gradient in the forward pass and holds it
# (in the compute precision) until the backward pass takes it, before any layer's backward.
LOG_SOFTMAX_BYTES = 4


def state_bytes_per_rank(params: float, strategy: str, ranks: int) -> float:
    """Parameters, gradients and optimizer state on one rank: ddp keeps all of it everywhere,
    fsdp one rank's share (FSDP2 pads each parameter to a multiple of the rank count)."""
    whole = params * STATE_BYTES_PER_PARAM
    return whole / ranks if strategy == "fsdp" else whole


def recomputed_layers(mode: str, n_layers: int) -> int:
    """Layers whose activations are recomputed: all (full), every other one (selective: the
    even-numbered, as train/parallel.py's `recomputes`), or none."""
    return {"none": 0, "full": n_layers, "selective": math.ceil(n_layers / 2)}[mode]


def activation_bytes_per_rank(
    n_layers: int,
    dim: int,
    tokens: int,
    recompute: str = "none",
    vocab_size: int = 0,
    value_bytes: int = 2,
) -> float:
    """Activations of one micro-batch of `tokens` tokens at the peak of its backward pass: the
    kept layers' saved tensors and the recomputed layers' inputs, with either one recomputed
    layer whole or (at the start of the backward pass) what the loss head holds: its weight's
    gradient and a chunk's logits (`vocab_size`; 0 leaves the head out). `value_bytes`: 2 for
    bf16 compute (accelerators), 4 for fp32 (CPU)."""
    kept = n_layers - recomputed_layers(recompute, n_layers)
    saved = kept * LAYER_ACTIVATION_VALUES + (n_layers - kept) * LAYER_INPUT_VALUES
    rebuilt = tokens * dim * LAYER_ACTIVATION_VALUES * value_bytes if kept < n_layers else 0
    chunk = min(tokens, LOSS_CHUNK_TOKENS) * vocab_size * (value_bytes + LOG_SOFTMAX_BYTES)
    head = vocab_size * dim * value_bytes + chunk if vocab_size else 0
    return tokens * dim * saved * value_bytes + max(rebuilt, head)
