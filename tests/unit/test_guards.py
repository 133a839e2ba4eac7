"""Guards inside an island, without processes: the spike guard's math and state, the rank digest
and its majority, and the faults that prove them (bit flips, poisoned data)."""

import json
import math

import pytest
import torch

from ostinato.config import ConfigError, GuardsConfig
from ostinato.data.stream import TokenStream
from ostinato.faults.bitflip import flip_high_exponent_bit
from ostinato.faults.inject import island_faults
from ostinato.faults.poison import DataPoison
from ostinato.train.guards import (
    MAD_TO_STD,
    LossSpikeGuard,
    majority_rank,
    rank_digest,
    robust_z,
)
from tests.conftest import tiny_config

pytestmark = pytest.mark.timeout(30)


def test_robust_z_is_distance_from_the_median_in_scaled_mads():
    window = [1.0, 2.0, 3.0, 4.0, 5.0]  # median 3, MAD 1
    assert robust_z(6.0, window) == pytest.approx(3 / MAD_TO_STD)
    assert robust_z(2.0, window) < 0  # a falling loss is never a spike
    # one earlier spike in the window barely moves the median and the MAD
    assert robust_z(6.0, [*window, 100.0]) == pytest.approx(robust_z(6.0, window), rel=0.5)
    assert math.isfinite(robust_z(2.5, [2.0] * 10))  # equal losses: MAD 0, eps keeps it finite


def noisy_losses(n: int, seed: int = 0) -> list[float]:
    generator = torch.Generator().manual_seed(seed)
    return (3.0 + 0.1 * torch.randn(n, generator=generator, dtype=torch.float64)).tolist()


def test_a_spike_is_judged_only_after_the_warm_up_and_never_joins_the_window():
    cfg = GuardsConfig(spike_window=50, spike_warmup=20, spike_z=6.0)
    guard = LossSpikeGuard(cfg)
    assert guard.verdict(9.0) == "ok"  # still warming up: early losses are all over the place
    guard.losses.clear()
    assert [guard.verdict(x) for x in noisy_losses(60)] == ["ok"] * 60
    assert len(guard.losses) == 50
    before = list(guard.losses)
    assert guard.verdict(6.2) == "spike" and guard.last_z > 6.0
    assert list(guard.losses) == before
    assert guard.verdict(float("nan")) == "ok"  # the non-finite guard's to judge
    assert list(guard.losses) == before


def test_the_spike_guard_can_be_turned_off():
    guard = LossSpikeGuard(GuardsConfig(spike=False, spike_warmup=2))
    assert [guard.verdict(x) for x in [*noisy_losses(30), 50.0]] == ["ok"] * 31


def test_spike_guard_state_round_trips_through_json_bit_for_bit():
    cfg = GuardsConfig(spike_window=30, spike_warmup=10)
    guard = LossSpikeGuard(cfg)
    for loss in noisy_losses(40):
        guard.verdict(loss)
    copy = LossSpikeGuard(cfg)
    copy.load_state_dict(json.loads(json.dumps(guard.state_dict())))
    assert list(copy.losses) == list(guard.losses)
    for loss in [*noisy_losses(5, seed=1), 4.5, 3.0]:
        assert copy.verdict(loss) == guard.verdict(loss)
        assert copy.last_z == guard.last_z


def test_spike_warm_up_longer_than_the_window_is_refused():
    with pytest.raises(ConfigError, match="guards.spike_warmup"):
        tiny_config("guards.spike_window=10", "guards.spike_warmup=11")


def test_the_majority_digest_wins_and_rank_0_breaks_ties():
    a, b = torch.tensor([1, 2]), torch.tensor([1, 3])
    assert majority_rank([a, b]) == 0
    assert majority_rank([b, a]) == 0
    assert majority_rank([a, b, b]) == 1
    assert majority_rank([a, a, b, b, b]) == 2
    assert majority_rank([a, b, torch.tensor([9, 9])]) == 0


def test_a_flipped_high_exponent_bit_makes_a_small_value_huge_and_the_digest_sees_it():
    model = torch.nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.fill_(0.5)
        model.bias.fill_(5.0)
    clean = rank_digest(model)
    index = flip_high_exponent_bit(model.weight.data, torch.Generator().manual_seed(0))
    assert model.weight.view(-1)[index] == 0.5 * 2.0**128  # finite, absurd, silent
    assert not torch.equal(rank_digest(model), clean)
    flip_high_exponent_bit(model.weight.data, torch.Generator().manual_seed(0))  # same element
    assert torch.equal(rank_digest(model), clean)
    index = flip_high_exponent_bit(model.bias.data, torch.Generator().manual_seed(1))
    assert model.bias[index] == 5.0 * 2.0**-128  # a value of 2 or more turns tiny instead


def test_poison_covers_the_stream_positions_of_its_steps_with_seeded_random_tokens():
    poison = DataPoison([(3, 2)], sequences_per_step=8, vocab_size=50, seed=7)
    covered = [p for p in range(0, 64, 4) if poison.covers(p)]
    assert covered == [16, 20, 24, 28]  # steps 3 and 4 read sequences 16..31
    inputs, targets = poison.batch(16, rank=0, batch_size=4, seq_len=6)
    again, _ = poison.batch(16, rank=0, batch_size=4, seq_len=6)
    other, _ = poison.batch(16, rank=1, batch_size=4, seq_len=6)
    assert inputs.shape == targets.shape == (4, 6) and int(inputs.max()) < 50
    assert torch.equal(inputs, again) and not torch.equal(inputs, other)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])


def test_skipping_data_lands_where_reading_it_would():
    tokens = torch.arange(1000)
    read, skipped = TokenStream(tokens, 8, seed=3), TokenStream(tokens, 8, seed=3)
    for _ in range(5):
        read.next_batch(4)
    skipped.skip(20)
    assert torch.equal(read.next_batch(4)[0], skipped.next_batch(4)[0])


def test_the_island_takes_its_own_faults_and_leaves_crash_and_hang_to_chaos():
    plain = tiny_config("faults.schedule=nan@step=3; spike@step=5,window=2; bitflip@step=7")
    assert [f.kind for f in island_faults(plain)] == ["nan", "spike", "bitflip"]
    with pytest.raises(ValueError, match="ostinato chaos"):
        island_faults(tiny_config("faults.schedule=crash@island=a,step=3"))
    with pytest.raises(ValueError, match="link needs a fleet"):
        island_faults(tiny_config("faults.schedule=link@island=a,bandwidth=1mbit"))
    chaos = tiny_config(
        "fleet.coordinator=127.0.0.1:1",
        "fleet.island=b",
        "faults.islands=a,b",
        "faults.schedule=crash@island=b,step=3; bitflip@island=b,round=2; nan@island=a,step=4",
    )
    assert [(f.kind, f.island) for f in island_faults(chaos)] == [("bitflip", "b")]
