"""Weights pushed to rollout islands: whole, or as quantized deltas with error feedback, over a
real store; what an island holds is the trainer's copy bit for bit, a late joiner gets there
too, and a payload changed on its way is never loaded."""

import pytest
import torch

from ostinato.fleet import wire
from ostinato.fleet.compress import QMAX
from ostinato.rl.weights import BLOCK, FULL_EVERY, Publisher, Receiver, rl_prefix

pytestmark = pytest.mark.timeout(60)
TOKEN = "t"
NUMEL = 3 * BLOCK + 5  # a last block that is not full


@pytest.fixture
def view():
    store = wire.serve_store("127.0.0.1:0")
    yield torch.distributed.PrefixStore(rl_prefix(TOKEN), store)


def versions(count: int) -> list[torch.Tensor]:
    """Weights as an optimizer moves them: small steps of varying size."""
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(NUMEL, generator=gen)]
    for _ in range(count - 1):
        weights.append(weights[-1] + 1e-3 * torch.randn(NUMEL, generator=gen))
    return weights


def test_a_full_push_is_exact(view):
    publisher, receiver = Publisher(view, TOKEN, "full"), Receiver(view, TOKEN, "full", NUMEL)
    for version, weights in enumerate(versions(3)):
        assert publisher.publish(weights, version) == 4 * NUMEL
        assert receiver.refresh()
        assert torch.equal(receiver.held, weights)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_deltas_keep_every_island_on_the_trainers_copy(view, kind):
    publisher, receiver = Publisher(view, TOKEN, kind), Receiver(view, TOKEN, kind, NUMEL)
    weights = versions(FULL_EVERY + 6)
    sizes = []
    for version, w in enumerate(weights):
        sizes.append(publisher.publish(w, version))
        assert receiver.refresh() and receiver.version == version
        assert torch.equal(receiver.held, publisher.held)  # the same additions, the same bits
        # error feedback: R is off W by at most half a quantization step of this one delta
        # (|delta| <= its block's absmax, which the scale divides into QMAX steps), however
        # many deltas came before; a delta's absmax is that of two steps (1e-3 * randn each)
        # plus the carried error, so 0.5 * 1e-2 / QMAX bounds it with room
        assert float((receiver.held - w).abs().max()) <= 0.5 * 1e-2 / QMAX[kind]
    assert sizes[0] == sizes[FULL_EVERY] == 4 * NUMEL  # a whole copy every FULL_EVERY
    # between them, a delta: one byte (int8) or half a byte (int4) a value, padded to whole
    # blocks, and a 4-byte scale a block
    blocks = -(-NUMEL // BLOCK)
    per_value = 1 if kind == "int8" else 0.5
    assert set(sizes[1:FULL_EVERY]) == {int(blocks * BLOCK * per_value) + 4 * blocks}
    # a late joiner: the last whole copy and the deltas after it
    late = Receiver(view, TOKEN, kind, NUMEL)
    assert late.refresh() and torch.equal(late.held, publisher.held)


def test_a_changed_delta_is_not_loaded(view):
    publisher, receiver = Publisher(view, TOKEN, "int8"), Receiver(view, TOKEN, "int8", NUMEL)
    weights = versions(3)
    publisher.publish(weights[0], 0)
    assert receiver.refresh()
    publisher.publish(weights[1], 1)
    raw = bytearray(view.get("delta/1"))
    raw[3] ^= 0x01  # one bit, on its way
    view.set("delta/1", bytes(raw))
    held = receiver.held.clone()
    assert not receiver.refresh()
    assert receiver.version == 0 and torch.equal(receiver.held, held)
    wrong_token = Receiver(view, "another", "int8", NUMEL)
    assert not wrong_token.refresh() and wrong_token.held is None
