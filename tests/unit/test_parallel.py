"""Sharding's pure parts, without processes: the seeded init drawn by rows, activation
recomputation, and which strategy an island gets."""

import dataclasses

import pytest
import torch

from ostinato.config import ParallelConfig, load_config
from ostinato.model import llama
from ostinato.model.llama import Llama, normal_rows
from ostinato.train.parallel import recompute_activations, reshards_after_forward, strategy_of

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("shards", [1, 2, 3, 7])
def test_rows_drawn_shard_by_shard_are_the_rows_drawn_whole(monkeypatch, shards):
    # small blocks, so shard edges fall inside blocks and across them
    monkeypatch.setattr(llama, "BLOCK_VALUES", 48)
    shape = torch.Size([29, 10])
    whole = normal_rows(5, "w", shape, 0, 29, 0.02)
    chunk = -(-29 // shards)  # FSDP2 cuts dim 0 as torch.chunk does
    parts = [normal_rows(5, "w", shape, s, min(chunk, 29 - s), 0.02) for s in range(0, 29, chunk)]
    assert torch.equal(torch.cat(parts), whole)
    assert not torch.equal(normal_rows(6, "w", shape, 0, 29, 0.02), whole)  # the seed counts
    assert not torch.equal(normal_rows(5, "v", shape, 0, 29, 0.02), whole)  # and the name


def test_a_model_initialised_by_shards_equals_the_whole_one():
    cfg = load_config(None, ['model.size="tiny"']).model
    whole, cut = Llama(cfg), Llama(cfg)
    whole.init_weights(3)

    def second_half(param):  # as a rank holding the second of two shards would see it
        first = -(-param.shape[0] // 2)
        return param.data[first:], first

    cut.init_weights(3, local=second_half)
    for (name, a), b in zip(whole.named_parameters(), cut.parameters(), strict=True):
        half = -(-a.shape[0] // 2)
        assert torch.equal(a[half:], b[half:]), name


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_recomputed_activations_give_the_same_gradients(mode):
    cfg = load_config(None, ['model.size="tiny"']).model
    plain, recomputed = Llama(cfg), Llama(cfg)
    plain.init_weights(0)
    recomputed.init_weights(0)
    recompute_activations(recomputed, ParallelConfig(activation_checkpointing=mode))
    tokens = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    for model in (plain, recomputed):
        model(tokens[:, :-1], tokens[:, 1:]).backward()
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in recomputed.named_parameters()]
    for (name, a), b in zip(plain.named_parameters(), recomputed.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad), name  # the same forward, run twice: bit for bit


def test_the_strategy_an_island_gets():
    auto, fsdp, ddp = ParallelConfig(), ParallelConfig(strategy="fsdp"), ParallelConfig("ddp")
    assert strategy_of(auto, 1, in_fleet=False) == "single"
    assert strategy_of(auto, 2, in_fleet=False) == "fsdp"
    assert strategy_of(ddp, 2, in_fleet=False) == "ddp"
    # a fleet island's exchange runs on a whole host copy: auto replicates there; fsdp is asked
    assert strategy_of(auto, 2, in_fleet=True) == "ddp"
    assert strategy_of(fsdp, 2, in_fleet=True) == "fsdp"
    with pytest.raises(ValueError, match=r"parallel.replicate = 3: .* 4 ranks .*allowed: 1, 2, 4"):
        strategy_of(dataclasses.replace(auto, replicate=3), 4, in_fleet=False)
    assert strategy_of(dataclasses.replace(auto, replicate=3), 1, in_fleet=False) == "single"


def test_a_wrong_strategy_is_named_with_the_allowed_values():
    with pytest.raises(ValueError, match="parallel.strategy.*fsdp.*ddp"):
        load_config(None, ["parallel.strategy=zero3"])


def test_reshard_after_forward_policies():
    """TorchTitan's names: default keeps only the last layer gathered into its backward."""
    assert [reshards_after_forward("default", last) for last in (False, True)] == [True, False]
    assert [reshards_after_forward("always", last) for last in (False, True)] == [True, True]
    assert [reshards_after_forward("never", last) for last in (False, True)] == [False, False]
    with pytest.raises(ValueError, match="parallel.reshard_after_forward.*never"):
        load_config(None, ["parallel.reshard_after_forward=sometimes"])
