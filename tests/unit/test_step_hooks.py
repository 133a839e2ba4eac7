"""The trainer's step hooks: where they are called, that empty hooks change nothing, and the
fault hooks behind them (nan, stall, slow, link) without processes."""

import threading
import time
from types import SimpleNamespace

import pytest
import torch

from ostinato.faults.inject import FaultHooks, Injector, island_faults, step_hooks
from ostinato.faults.spec import Fault, parse_faults
from ostinato.jsonl import read_jsonl
from ostinato.train.hooks import StepHooks
from ostinato.train.metrics import read_metrics
from ostinato.train.trainer import train
from tests.conftest import tiny_config

pytestmark = pytest.mark.timeout(120)
QUICK = ("train.steps=3", "checkpoint.every=0", "train.eval_problems=0", "train.samples=0")


class Recording(StepHooks):
    """Changes nothing; writes down every call."""

    def __init__(self):
        self.calls = []

    def start(self, state, place, out):
        self.calls.append(("start", state.step))

    def before_step(self, state, place):
        self.calls.append(("before", state.step))

    def batch(self, state, place, position, inputs, targets):
        self.calls.append(("batch", position))
        return inputs, targets

    def loss(self, state, loss):
        self.calls.append(("loss", state.step))
        return loss

    def after_step(self, state, place, elapsed_s):
        assert elapsed_s > 0
        self.calls.append(("after", state.step))


def test_the_hooks_are_called_in_step_order_and_empty_ones_change_nothing(tmp_path):
    cfg = tiny_config(*QUICK, "train.grad_accum=2")
    hooks = Recording()
    hooked = train(cfg, tmp_path / "hooked", "none", show_progress=False, hooks=hooks)
    plain = train(cfg, tmp_path / "plain", "none", show_progress=False)
    per_micro = cfg.train.batch_size  # sequences a micro-batch reads on one rank
    expected = [("start", 0)]
    for step in range(3):
        expected.append(("before", step))
        for micro in range(2):
            expected += [("batch", (2 * step + micro) * per_micro), ("loss", step)]
        expected.append(("after", step + 1))  # after the step: it is counted
    assert hooks.calls == expected
    assert hooked.parameter_digest == plain.parameter_digest


def test_a_schedule_without_hooks_to_inject_it_is_refused(tmp_path):
    cfg = tiny_config(*QUICK, "faults.schedule=nan@step=2")
    with pytest.raises(ValueError, match="faults.schedule is set but no step hooks"):
        train(cfg, tmp_path / "run", "none", show_progress=False)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_a_nan_through_the_hooks_is_skipped_by_the_guard(tmp_path):
    cfg = tiny_config(*QUICK, "faults.schedule=nan@step=2")
    train(cfg, tmp_path / "run", "none", show_progress=False, hooks=step_hooks(cfg))
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records if r["skipped"]] == [2]
    fired = read_jsonl(tmp_path / "run" / "faults.jsonl")
    assert [(f["kind"], f["at_step"]) for f in fired] == [("nan", 2)]


def test_stall_parses_like_the_other_kinds_and_needs_a_fleet():
    faults = parse_faults("stall@island=b,round=3; stall@island=a,step=40", ["a", "b"])
    assert faults == [Fault("stall", "b", round=3), Fault("stall", "a", step=40)]
    with pytest.raises(ValueError, match="stall needs island="):
        parse_faults("stall@step=3", ["a", "b"])
    with pytest.raises(ValueError, match="stall needs step= or round="):
        parse_faults("stall@island=a", ["a", "b"])
    with pytest.raises(ValueError, match="stall needs a fleet"):
        island_faults(tiny_config("faults.schedule=stall@island=a,step=3"))


def fleet_hooks(tmp_path, schedule: str) -> tuple[FaultHooks, SimpleNamespace]:
    """Fault hooks of island a of a fleet, started on the main rank of a stand-in state."""
    cfg = tiny_config("fleet.coordinator=127.0.0.1:1", f"faults.schedule={schedule}")
    hooks = step_hooks(cfg)
    member = SimpleNamespace(round_have=0, pad_exchange=None)
    state = SimpleNamespace(
        step=0, fleet=SimpleNamespace(member=member), events=None, stream=SimpleNamespace(seed=1)
    )
    place = SimpleNamespace(is_main=True, world_size=1, rank=0)
    hooks.start(state, place, tmp_path)
    return hooks, state


def test_a_stall_blocks_inside_the_step_and_strikes_once_per_run(tmp_path):
    hooks, state = fleet_hooks(tmp_path, "stall@island=a,step=2")
    hooks.before_step(state, None)  # before step 1: not yet
    loss = torch.tensor(1.5)
    assert hooks.loss(state, loss) is loss
    state.step = 1
    hooks.before_step(state, None)  # step 2: due
    returned = []
    step = threading.Thread(target=lambda: returned.append(hooks.loss(state, loss)), daemon=True)
    step.start()
    step.join(timeout=1.0)
    # A second is ample for a multiply; only a block keeps the thread (left blocked: a daemon).
    assert step.is_alive() and returned == []
    # Remembered before the step ran: the island restarted after the stall does not stall again.
    again = Injector(tiny_config("fleet.coordinator=127.0.0.1:1"), tmp_path, hooks.faults)
    again.before_step(state, 2, 1)
    assert not again.stall_next


def test_a_slow_island_takes_factor_times_as_long_and_a_link_pads_the_exchange(tmp_path):
    schedule = "slow@island=a,factor=3; link@island=a,latency=200ms,bandwidth=1mbit"
    hooks, state = fleet_hooks(tmp_path, schedule)
    hooks.before_step(state, None)  # both strike from the start
    started = time.perf_counter()
    hooks.after_step(state, None, elapsed_s=0.1)
    assert time.perf_counter() - started >= 0.2  # (factor - 1) x the step's time: a lower bound
    pad = state.fleet.member.pad_exchange
    # 2 x 200 ms latency + 8 x 12,500 bytes both ways / 1 Mbit/s = 0.4 + 0.2 s: at least that
    started = time.perf_counter()
    pad(started, 12_500, 12_500)
    assert time.perf_counter() - started >= 0.6


def test_a_slow_island_is_as_slow_after_a_restart_and_its_fault_is_recorded_once(tmp_path):
    hooks, state = fleet_hooks(tmp_path, "slow@island=a,factor=3; nan@island=a,step=1")
    hooks.before_step(state, None)
    assert hooks.injector.slowdown == 3 and hooks.injector.poison_next
    restarted, state = fleet_hooks(tmp_path, "slow@island=a,factor=3; nan@island=a,step=1")
    restarted.before_step(state, None)
    assert restarted.injector.slowdown == 3  # a condition: back on
    assert not restarted.injector.poison_next  # an event: struck once per run
    fired = read_jsonl(tmp_path / "faults.jsonl")
    assert sorted(f["kind"] for f in fired) == ["nan", "slow"]
