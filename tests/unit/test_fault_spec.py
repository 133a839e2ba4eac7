"""Fault schedules: every kind parses, bad input is refused with reasons, storms are reproducible."""

import json

import pytest

from ostinato.faults.spec import (
    DOWNING,
    Fault,
    from_json,
    parse_bandwidth,
    parse_duration,
    parse_faults,
    to_json,
)

pytestmark = pytest.mark.timeout(30)

ISLANDS = ["a", "b", "c"]
EXAMPLE = (
    "crash@island=b,step=40; hang@island=a,round=3; nan@step=70; bitflip@island=c,round=5; "
    "slow@island=b,factor=3; link@island=a,bandwidth=10mbit,latency=50ms,loss=0.01; "
    "spike@step=20,window=4"
)


def parse(spec, **kw):
    return parse_faults(spec, ISLANDS, **{"steps": 100, "rounds": 10, **kw})


def test_every_kind_parses_in_moment_order():
    faults = parse(EXAMPLE)
    assert faults == [
        Fault("link", "a", params={"bandwidth": 1e7, "latency": 0.05, "loss": 0.01}),
        Fault("slow", "b", params={"factor": 3.0}),
        Fault("hang", "a", round=3),
        Fault("bitflip", "c", round=5),
        Fault("spike", "a", step=20, params={"window": 4}),
        Fault("crash", "b", step=40),
        Fault("nan", "a", step=70),
    ]
    assert faults[1].param("factor") == 3.0 and faults[0].param("nope", 7) == 7


def test_defaults_and_loose_spacing():
    slow, spike = parse(" spike@step=5 ;; slow@island=c,factor=2,round=4 ;")
    assert spike == Fault("spike", "a", step=5, params={"window": 1})
    assert slow == Fault("slow", "c", round=4, params={"factor": 2.0})
    assert parse("") == []


def test_units():
    assert parse_bandwidth("10mbit") == 1e7
    assert parse_bandwidth("64kbit") == 64e3
    assert parse_bandwidth("1.5gbit") == 1.5e9
    assert parse_duration("50ms") == pytest.approx(0.05)
    assert parse_duration("30s") == 30.0
    assert parse_duration("10m") == 600.0
    for bad in ("10mb", "10", "fast", "-1mbit", "0mbit"):
        with pytest.raises(ValueError, match="kbit, mbit or gbit"):
            parse_bandwidth(bad)
    for bad in ("50", "5h", "-3s", "soon"):
        with pytest.raises(ValueError, match="ms, s or m"):
            parse_duration(bad)


@pytest.mark.parametrize(
    "spec, match",
    [
        ("explode@island=a,step=1", "unknown fault kind 'explode'; allowed: crash, hang, nan"),
        ("crash@island=a,step=1,speed=3", "unknown key 'speed' for crash; allowed: island, step"),
        ("spike@round=3", "unknown key 'round' for spike; allowed: island, step, window"),
        ("crash@island=z,step=1", "island 'z' does not exist; islands: a, b, c"),
        ("crash@island=a,step=500", "step 500 is beyond the run's 100 steps"),
        ("hang@island=a,round=11", "round 11 is beyond the run's 10 rounds"),
        ("nan@step=-3", "must be a finite number >= 0"),
        ("nan@step=ten", "step='ten' is not a whole number"),
        ("nan@step=2.5", "not a whole number"),
        ("slow@island=a,factor=fast", "factor='fast' is not a number"),
        ("slow@island=a,factor=nan", "finite number"),
        ("slow@island=a,factor=0.5", "allowed >= 1"),
        ("slow@island=a", "slow needs factor="),
        ("crash@step=4", "crash needs island=; islands: a, b, c"),
        ("hang@round=2", "hang needs island="),
        ("crash@island=a,step=4,round=2", "either step= or round=, not both"),
        ("crash@island=a", "crash needs step= or round="),
        ("spike@island=a", "spike needs step="),
        ("crash@island=a,step", "'step' is not key=value"),
        ("crash@island=a,step=1,step=2", "step= is given twice"),
        ("link@island=a,bandwidth=10mb", "kbit, mbit or gbit"),
        ("link@island=a,latency=50", "ms, s or m"),
        ("link@island=a,loss=1.5", "0 <= loss < 1"),
        ("link@island=a", "at least one of bandwidth=, latency=, loss="),
        ("spike@step=3,window=0", "window .* allowed >= 1"),
        ("storm:seed=1", "storm needs mtbf="),
        ("storm:mtbf=fast", "ms, s or m"),
        ("storm:mtbf=30s,speed=2", "unknown key 'speed' for storm; allowed: mtbf, seed"),
        (
            "storm:mtbf=30s,kinds=crash+meteor",
            "'meteor' unknown; allowed: crash, hang, bitflip, nan",
        ),
        ("storm:mtbf=0s", "mtbf must be > 0"),
        ("storm:mtbf=1s,seed=1", "could never leave a quorum.*allowed mtbf >= 3.33"),
    ],
)
def test_bad_input_is_refused_with_the_reason(spec, match):
    with pytest.raises(ValueError, match=match):
        parse(spec, duration_s=60)


def test_storm_needs_a_duration_and_room_for_a_quorum():
    with pytest.raises(ValueError, match="positive duration="):
        parse("storm:mtbf=30s")
    with pytest.raises(ValueError, match="more islands than min_islands"):
        parse("storm:mtbf=30s,duration=60s", min_islands=3)
    # Faults that take no island down need no spare island.
    assert parse("storm:mtbf=30s,duration=600s,kinds=nan+bitflip", min_islands=3)


def test_storm_is_deterministic_for_a_seed():
    spec = "storm:mtbf=30s,seed=7,duration=600s; slow@island=b,factor=2"
    first = parse(spec)
    assert first == parse(spec)
    assert first != parse(spec.replace("seed=7", "seed=8"))
    storm = [f for f in first if f.at_s is not None]
    assert 5 < len(storm) < 60  # about 600 / 30 arrivals
    assert all(0 < f.at_s < 600 and f.kind in ("crash", "hang", "bitflip") for f in storm)
    assert [f.at_s for f in storm] == sorted(f.at_s for f in storm)
    assert {f.island for f in storm} == set(ISLANDS)


@pytest.mark.parametrize("min_islands, mtbf", [(1, "4s"), (2, "8s")])
def test_storm_never_breaks_the_quorum(min_islands, mtbf):
    restart_s = 10.0
    spec = f"storm:mtbf={mtbf},seed=3,duration=1200s,kinds=crash+hang+nan"
    faults = parse(spec, min_islands=min_islands, restart_s=restart_s)
    down_until: dict[str, float] = {}
    most_down = 0
    for fault in faults:
        t = fault.at_s
        assert down_until.get(fault.island, 0.0) <= t + 1e-3, "struck an island that is down"
        if fault.kind in DOWNING:
            down_until[fault.island] = t + restart_s
        most_down = max(most_down, sum(until > t + 1e-3 for until in down_until.values()))
    assert most_down == len(ISLANDS) - min_islands  # the cap was reached, never passed


def test_json_round_trip():
    faults = parse(EXAMPLE + "; storm:mtbf=20s,seed=1,duration=120s,kinds=crash+nan")
    text = json.dumps([to_json(f) for f in faults])
    assert [from_json(d) for d in json.loads(text)] == faults
    assert len(set(faults)) == len(faults)  # hashable
    with pytest.raises(ValueError, match="unknown fault kind"):
        from_json({"kind": "meteor", "island": "a"})
