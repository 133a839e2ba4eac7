"""The `bitflip` fault: silent corruption of one number in memory, as a failing chip makes it."""

from __future__ import annotations

import torch

from ostinato.train.guards import WORD_TYPES


def flip_high_exponent_bit(tensor: torch.Tensor, generator: torch.Generator) -> int:
    """Flip the highest exponent bit of one element drawn from `generator`, in place; returns
    the element's flat index.

    That is bit 30 of an fp32 word (14 of a bf16 or fp16, 62 of an fp64): the flip multiplies a
    value below 2 in size by 2**128 (for fp32), or makes a larger one tiny. Either way the number
    stays plausible enough that nothing downstream notices unless a guard looks.
    """
    assert tensor.is_floating_point() and tensor.is_contiguous(), "a dense float tensor"
    bits = tensor.element_size() * 8
    index = int(torch.randint(tensor.numel(), (), generator=generator))
    words = tensor.detach().view(-1).view(WORD_TYPES[tensor.element_size()])
    words[index] ^= 1 << (bits - 2)
    return index
