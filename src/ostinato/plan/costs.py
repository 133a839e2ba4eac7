"""From a scenario and its chip profiles to the few numbers both models need: the unit costs.

Everything the closed form and the Monte Carlo share is computed here once, so the two can only
disagree about the statistics, never about the physics. Islands may differ (profile, chips, link):
each kind of island gets its own step time, failure rate and restart, and the run advances in
units (a step for sync and torchft, a round for a fleet) that all islands start together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ostinato.fleet.compress import message_bytes
from ostinato.plan.chips import Profile, load_profile
from ostinato.plan.errors import PlanError
from ostinato.plan.intervals import daly_interval
from ostinato.plan.scenario import IslandSpec, Scenario
from ostinato.train.memory import (
    STATE_BYTES_PER_PARAM,
    activation_bytes_per_rank,
    state_bytes_per_rank,
)

# A recovering torchft replica group copies master weights and both moments from a healthy peer.
HEAL_BYTES_PER_PARAM = 12
# A recovering fleet island copies the fp32 global parameters and the outer Nesterov momentum.
DONOR_BYTES_PER_PARAM = 8
# bf16 gradients are all-reduced between islands at every step by sync and torchft.
GRAD_BYTES_PER_PARAM = 2
# Share of chip memory the training state and activations may take; communication buffers,
# the gathered layer of a sharded model and the allocator's cache need the rest.
MEMORY_HEADROOM = 0.8
# A gradient all-reduce can hide behind the backward pass, about two thirds of a step's compute.
BACKWARD_SHARE = 2 / 3


@dataclass(frozen=True)
class FaultKind:
    name: str  # crash, hang or sdc
    share: float  # probability that a failure is of this kind
    extra_s: float  # downtime on top of the restart: detection of a hang or a corruption


@dataclass(frozen=True)
class IslandCosts:
    """Unit costs of `count` identical islands."""

    profile: str
    count: int
    chips: int  # per island
    rate_per_s: float  # failure rate of one island: the sum of its chips' rates
    kinds: tuple[FaultKind, ...]
    restart_s: float  # downtime after a failure (torchft, fleet): restart plus the state copy
    step_s: float  # compute of one inner step
    steps: int  # inner steps per unit: H or what fits the time budget (fleet), else 1
    tokens_per_step: float
    power_w: float  # per chip
    price_per_chip_hour: float

    @property
    def compute_s(self) -> float:
        return self.steps * self.step_s

    @property
    def tokens_per_unit(self) -> float:
        return self.steps * self.tokens_per_step

    @property
    def mean_extra_s(self) -> float:
        return sum(k.share * k.extra_s for k in self.kinds)


@dataclass(frozen=True)
class Costs:
    """Unit costs of one scenario. A unit is a step (sync, torchft) or a round (fleet) of all
    islands together; for sync the failing unit is the whole job, otherwise each island."""

    strategy: str
    groups: tuple[IslandCosts, ...]
    exchange_s: float  # exposed inter-island communication per unit
    tokens: float  # tokens to train
    job_restart_s: float  # downtime after any failure of the job (sync)
    checkpoint_interval_s: float  # seconds of progress between checkpoints (sync)
    checkpoint_s: float  # seconds a checkpoint blocks (sync)
    bytes_per_unit: float  # bytes each island sends per unit
    # Seconds per unit outside any step, lost as waiting: the gaps (logging, evaluation) that
    # calibration measures in a recorded run; a planned run has none.
    idle_s: float = 0.0

    @property
    def chips(self) -> int:
        return sum(g.count * g.chips for g in self.groups)

    @property
    def islands(self) -> int:
        return sum(g.count for g in self.groups)

    @property
    def unit_s(self) -> float:
        """Wall seconds of one unit without failures: the slowest island's compute, then the
        exchange (and, for a calibrated run, its idle gaps)."""
        return max(g.compute_s for g in self.groups) + self.exchange_s + self.idle_s

    @property
    def units_needed(self) -> float:
        """Units to train every token when no island fails."""
        return self.tokens / sum(g.count * g.tokens_per_unit for g in self.groups)

    @property
    def compute_share(self) -> float:
        """Share of the chips' time in a failure-free unit that is computation."""
        busy = sum(g.count * g.chips * g.compute_s for g in self.groups)
        return busy / (self.chips * self.unit_s)

    @property
    def job_rate_per_s(self) -> float:
        """Failure rate of the whole job: any island failing."""
        return sum(g.count * g.rate_per_s for g in self.groups)

    @property
    def job_kinds(self) -> tuple[FaultKind, ...]:
        """Fault kinds of the whole job: each island kind's shares, weighted by its rate."""
        shares: dict[tuple[str, float], float] = {}
        for g in self.groups:
            for k in g.kinds:
                key = (k.name, k.extra_s)
                shares[key] = shares.get(key, 0.0) + k.share * g.count * g.rate_per_s
        return tuple(FaultKind(n, s / self.job_rate_per_s, x) for (n, x), s in shares.items())

    @property
    def job_extra_s(self) -> float:
        return sum(k.share * k.extra_s for k in self.job_kinds)

    @property
    def inter_island_bytes_per_s(self) -> float:
        """Rate each island must sustain for its exchange to keep up with its computation."""
        return self.bytes_per_unit / max(g.compute_s for g in self.groups)


def derive(scenario: Scenario) -> Costs:
    """Unit costs of `scenario`; refuses a model whose training state does not fit an island."""
    profiles = [
        load_profile(i.profile, scenario.field_name(n, "profile"))
        for n, i in enumerate(scenario.islands)
    ]
    for n, (island, prof) in enumerate(zip(scenario.islands, profiles, strict=True)):
        _check_memory(scenario, n, island, prof)
    step_s = [_step_s(scenario, i, p) for i, p in zip(scenario.islands, profiles, strict=True)]
    steps = _steps_per_unit(scenario.strategy, step_s)
    exchange_s, bytes_per_unit = _exchange(scenario, max(step_s))
    groups = tuple(
        _island_costs(scenario, i, p, s, n)
        for i, p, s, n in zip(scenario.islands, profiles, step_s, steps, strict=True)
    )
    st = scenario.strategy
    costs = Costs(
        strategy=st.kind,
        groups=groups,
        exchange_s=exchange_s,
        tokens=scenario.model.tokens,
        job_restart_s=scenario.reliability.job_restart_s,
        checkpoint_interval_s=st.checkpoint_interval_s if st.kind == "sync" else 0.0,
        checkpoint_s=st.checkpoint_s if st.kind == "sync" else 0.0,
        bytes_per_unit=bytes_per_unit,
    )
    if st.kind == "sync" and costs.checkpoint_interval_s == 0:
        interval = daly_interval(st.checkpoint_s, 1 / costs.job_rate_per_s)
        costs = replace(costs, checkpoint_interval_s=interval)
    return costs


def _step_s(scenario: Scenario, island: IslandSpec, prof: Profile) -> float:
    """Compute of one inner step. Every chip takes the same share of the batch, as data parallel
    ranks do, so a step's time depends on the chip alone: batch FLOPs / (all chips x its FLOP/s)."""
    batch_flops = scenario.model.batch_tokens * scenario.model.flops_per_token
    return batch_flops / (scenario.chips * prof.peak_flops * (island.mfu or prof.mfu))


def _steps_per_unit(strategy, step_s: list[float]) -> list[int]:
    """Inner steps each island kind runs per unit. A fleet on a time budget gives every island
    the slowest island's H steps of time; the small epsilon keeps that island at exactly H."""
    if strategy.kind != "fleet":
        return [1] * len(step_s)
    if strategy.budget == "steps":
        return [strategy.inner_steps] * len(step_s)
    budget = strategy.inner_steps * max(step_s)
    return [math.floor(budget / s + 1e-9) for s in step_s]


def _island_costs(
    scenario: Scenario, island: IslandSpec, prof: Profile, step_s: float, steps: int
) -> IslandCosts:
    kinds, chip_rate = _fault_kinds(scenario, island, prof)
    return IslandCosts(
        profile=prof.name,
        count=island.count,
        chips=island.chips,
        rate_per_s=island.chips * chip_rate,
        kinds=kinds,
        restart_s=scenario.reliability.island_restart_s + _state_copy_s(scenario, island),
        step_s=step_s,
        steps=steps,
        tokens_per_step=scenario.model.batch_tokens * island.chips / scenario.chips,
        power_w=prof.power_w,
        price_per_chip_hour=island.price_per_chip_hour,
    )


def _check_memory(scenario: Scenario, index: int, island: IslandSpec, prof: Profile) -> None:
    """Refuse what the trainer could not run: its own formulas (train/memory.py) for the state
    of `strategy.parallel` on one chip of the island, and, when the model's shape is given, the
    activations of one sequence with `strategy.activation_checkpointing`."""
    model, st = scenario.model, scenario.strategy
    state = state_bytes_per_rank(model.params, st.parallel, island.chips)
    activations = 0.0
    if model.n_layers and model.dim:
        recompute = st.activation_checkpointing
        tokens = model.seq_len * model.micro_batch
        activations = activation_bytes_per_rank(
            model.n_layers, model.dim, tokens, recompute, model.vocab_size
        )
    have = prof.memory_bytes * MEMORY_HEADROOM
    if state + activations <= have:
        return
    fixes = []
    if st.parallel == "ddp":
        fixes.append("strategy.parallel = fsdp (shards the state over the island)")
    elif activations < have:  # more chips shrink each one's share of the state, not activations
        least = math.ceil(state_bytes_per_rank(model.params, "fsdp", 1) / (have - activations))
        fixes.append(f"at least {least} chips per island ({scenario.field_name(index, 'chips')})")
    if activations and st.activation_checkpointing != "full":
        fixes.append("strategy.activation_checkpointing = full")
    if activations >= have:  # ostinato cuts no sequence across chips (no tensor parallelism)
        fixes.append("a shorter model.seq_len")
    raise PlanError(
        f"model.params = {model.params:.3g} does not fit: one {prof.name} of an island of "
        f"{island.chips} would hold {state / 1e9:.1f} GB of training state ({st.parallel}: "
        f"{STATE_BYTES_PER_PARAM} bytes per parameter, fp32 weights, gradients and two Adam "
        f"moments{', sharded' if st.parallel == 'fsdp' else ', all of it'}) and "
        f"{activations / 1e9:.1f} GB of activations ({model.micro_batch} x {model.seq_len} "
        f"tokens, recomputation {st.activation_checkpointing}), more than its {have / 1e9:.1f} GB "
        f"({MEMORY_HEADROOM:.0%} of memory). Use {' or '.join(fixes)}, fewer islands, or a "
        f"smaller model."
    )


def _exchange(scenario: Scenario, step_s: float) -> tuple[float, float]:
    """Exposed seconds and bytes each island sends in one exchange. A fleet all-gathers, as
    fleet/member.py does: every member sends its sealed message (fleet/compress.py's
    message_bytes, the size the fleet asserts before sending) to each of the n - 1 others, so
    the round waits for (n - 1) messages at the slowest link. sync and torchft all-reduce bf16
    gradients in a ring (2 (n - 1) / n of them per island), hidden behind the backward pass as
    far as it goes; `step_s` is the slowest island's step, the earliest that can end."""
    n, params = scenario.island_count, scenario.model.params
    if n == 1:
        return 0.0, 0.0  # communication inside an island is already in the MFU
    link = min(_link(i) for i in scenario.islands)
    if scenario.strategy.kind == "fleet":
        st = scenario.strategy
        sent = (n - 1) * message_bytes(math.ceil(params), st.compression, st.block)
        return sent / link, sent  # a round waits for its exchange to finish
    sent = 2 * (n - 1) / n * params * GRAD_BYTES_PER_PARAM
    return max(0.0, sent / link - BACKWARD_SHARE * step_s), sent


def _link(island: IslandSpec) -> float:
    return island.inter_island_gbit_s * 1e9 / 8


def _state_copy_s(scenario: Scenario, island: IslandSpec) -> float:
    """The state copy from a donor, at the slower of this island's link and the fastest donor's."""
    per_param = DONOR_BYTES_PER_PARAM if scenario.strategy.kind == "fleet" else HEAL_BYTES_PER_PARAM
    donors = [_link(i) for i in scenario.islands if i is not island or i.count > 1]
    link = min(_link(island), max(donors, default=_link(island)))
    return scenario.model.params * per_param / link


def _fault_kinds(
    scenario: Scenario, island: IslandSpec, prof: Profile
) -> tuple[tuple[FaultKind, ...], float]:
    """Fault kinds with their shares, and the total failure rate per chip per second."""
    rel = scenario.reliability
    crash_per_h = 1 / (island.chip_mtbf_hours or prof.mtbf_chip_hours)
    if rel.node_mtbf_hours:
        crash_per_h += 1 / (rel.node_mtbf_hours * prof.chips_per_node)
    hang_per_h = 1 / rel.hang_mtbf_chip_hours if rel.hang_mtbf_chip_hours else 0.0
    sdc_per_h = 1 / rel.sdc_mtbf_chip_hours if rel.sdc_mtbf_chip_hours else 0.0
    # A fleet compares parameter digests at every round, so a corruption costs only the round it
    # spoils; the others find it by the loss guards, after sdc_detect_s more of wasted work.
    sdc_extra = 0.0 if scenario.strategy.kind == "fleet" else rel.sdc_detect_s
    total = crash_per_h + hang_per_h + sdc_per_h
    kinds = (
        FaultKind("crash", crash_per_h / total, 0.0),
        FaultKind("hang", hang_per_h / total, rel.hang_detect_s),
        FaultKind("sdc", sdc_per_h / total, sdc_extra),
    )
    return tuple(k for k in kinds if k.share > 0), total / 3600
