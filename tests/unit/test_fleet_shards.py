"""Fleet shards (fleet/shards.py): the cut, who owns what, and that cutting the fleet state
changes none of a round's arithmetic. Pure math, no processes: the rounds run the members' own
exchange code with the network replaced (tests/unit/local_rounds.py)."""

import torch

from ostinato.config import FleetConfig
from ostinato.fleet.member import FleetMember
from ostinato.fleet.outer import flatten
from ostinato.fleet.round_guards import differing_shards
from ostinato.fleet.shards import ShardSet, island_digest, owned_shards, shard_bounds
from tests.unit.local_rounds import local_round
from tests.unit.test_streaming import tiny_llama, train_a_little


def fleet_cfg(**overrides) -> FleetConfig:
    return FleetConfig(**{"compression": "fp32", "block": 64, "island": "a", **overrides})


def test_the_cut_covers_every_element_once_and_every_shard_has_one_owner():
    for numel in (1, 7, 64, 1000, 1001):
        for shards in (1, 2, 3, 4, 8):
            bounds = shard_bounds(numel, shards)
            assert bounds[0][0] == 0 and bounds[-1][1] == numel
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
            for ranks in (1, 2, 3, 4):
                owned = [owned_shards(shards, r, ranks) for r in range(ranks)]
                assert sorted(k for ks in owned for k in ks) == list(range(shards))


def test_no_rank_holds_more_than_its_share_of_the_fleet_state():
    """An island of 4 ranks, 4 shards: each rank's global parameters, momentum and residual
    are its quarter (+ the rounding of the cut), and together they are the model, once."""
    model = tiny_llama(0)
    whole = flatten(model)
    cfg = fleet_cfg(shards=4)
    sets = [ShardSet(model, cfg, rank, 4) for rank in range(4)]  # reads only: no collective
    share = -(-whole.numel() // 4)
    for shard_set in sets:
        held = sum(o.global_params.numel() for o in shard_set.outer.values())
        assert held <= share
        assert shard_set.held_bytes() <= 2 * 4 * share  # params + residual, no momentum yet
    pieces = {k: s.outer[k].global_params for s in sets for k in s.mine}
    assert torch.equal(torch.cat([pieces[k] for k in range(4)]), whole)


def members_and_models(shards: int, compression: str = "fp32"):
    models = [tiny_llama(0), tiny_llama(0)]
    members = [
        FleetMember(fleet_cfg(island=n, shards=shards, compression=compression), m, {})
        for n, m in zip("ab", models, strict=True)
    ]
    return members, models


def test_cutting_the_fleet_state_changes_no_bit_of_a_round():
    """Averaging and the outer step are elementwise, so a fleet state cut into 3 shards must
    step to exactly the global parameters an uncut one does (fp32 on the wire: int8 blocks
    would start at each shard's first element, so there the cut does change the rounding)."""
    runs = {}
    for shards in (1, 3):
        members, models = members_and_models(shards)
        for number in (1, 2, 3):
            for seed, model in enumerate(models):
                train_a_little(model, 10 * number + seed)
            results = local_round(members, models, number, (100, 300))
            assert results[0]["digest"] == results[1]["digest"]
        runs[shards] = (members, models)
    (one, one_models), (three, three_models) = runs[1], runs[3]
    for a, b in zip(one_models, three_models, strict=True):
        assert torch.equal(flatten(a), flatten(b))
    cut = torch.cat([three[0].shards.outer[k].global_params for k in range(3)])
    assert torch.equal(cut, one[0].outer.global_params)
    assert island_digest([one[0].digest()]) == one[0].digest()  # one shard: its own digest


def test_a_flipped_bit_is_found_in_the_shard_that_holds_it():
    members, models = members_and_models(4, "int8")
    for seed, model in enumerate(models):
        train_a_little(model, seed)
    corrupt = members[0].shards.outer[2].global_params
    corrupt[3] = corrupt[3].view(torch.int32).bitwise_xor(1 << 30).view(torch.float32)
    results = local_round(members, models, 1, (100, 300), commit=False)
    assert results[0]["digest"] != results[1]["digest"]
    assert differing_shards(results[0], results[1]) == [2]


def test_an_island_cut_into_other_shards_is_refused_by_name(make_coordinator):
    """Shard k of one island must be shard k of every other: a different fleet.shards would
    pair unequal ranges, so the coordinator refuses it and names the field."""
    coordinator = make_coordinator()
    membership = coordinator.membership
    assert membership._mismatch({"shards": 2, "rounds": 10}) is None  # the first island's recipe
    assert membership._mismatch({"shards": 2, "rounds": 10}) is None
    refusal = membership._mismatch({"shards": 4, "rounds": 10})
    assert refusal is not None and "shards" in refusal and "fleet 2, island 4" in refusal


def test_a_payload_replayed_as_another_shard_is_refused():
    """Each shard's payload is sealed under its shard number: b's shard-0 payload sent again as
    its shard 1 (equal lengths: the cut is even here) fails its MAC at a, so a refuses b's
    payload for the round and averages its own alone."""
    members, models = members_and_models(2)
    for member in members:
        member.token = "fleet-secret"
    assert members[0].shards.size(0) == members[0].shards.size(1)
    for seed, model in enumerate(models):
        train_a_little(model, seed)
    sent: dict[tuple[int, str], torch.Tensor] = {}

    def replay(raw, sender, shard):
        sent[(shard, sender)] = raw
        return sent[(0, "b")] if (shard, sender) == (1, "b") else raw

    results = local_round(members, models, 1, (100, 300), tamper=replay, commit=False)
    assert all(r["refused"] == ["b"] for r in results)
