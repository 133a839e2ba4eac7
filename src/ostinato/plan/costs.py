"""From a scenario and a chip profile to the few numbers both models need: the unit costs.

Everything the closed form and the Monte Carlo share is computed here once, so the two can only
disagree about the statistics, never about the physics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ostinato.plan.chips import Profile, load_profile
from ostinato.plan.errors import PlanError
from ostinato.plan.scenario import COMPRESSION_BITS, Scenario

# Mixed-precision AdamW holds bf16 weights and gradients (2 + 2 bytes), fp32 master weights (4)
# and two fp32 moments (8) per parameter, sharded across the chips of an island.
STATE_BYTES_PER_PARAM = 16
# A recovering torchft replica group copies master weights and both moments from a healthy peer.
HEAL_BYTES_PER_PARAM = 12
# A recovering fleet island copies the fp32 global parameters and the outer Nesterov momentum.
DONOR_BYTES_PER_PARAM = 8
# bf16 gradients are all-reduced between islands at every step by sync and torchft.
GRAD_BYTES_PER_PARAM = 2
# Share of chip memory the training state may take; activations and buffers need the rest.
MEMORY_HEADROOM = 0.8
# A gradient all-reduce can hide behind the backward pass, about two thirds of a step's compute.
BACKWARD_SHARE = 2 / 3


@dataclass(frozen=True)
class FaultKind:
    name: str  # crash, hang or sdc
    share: float  # probability that a failure is of this kind
    extra_s: float  # downtime on top of the restart: detection of a hang or a corruption


@dataclass(frozen=True)
class Costs:
    """Unit costs of one scenario. A unit of work is a step (sync) or an island-round (others)."""

    strategy: str
    chips: int
    islands: int
    failing_units: int  # independent things that fail: the job (sync) or each island
    unit_rate_per_s: float  # failure rate of one failing unit
    kinds: tuple[FaultKind, ...]
    restart_s: float  # downtime after any failure: restart, plus the state copy for islands
    step_s: float  # compute of one inner step (the same on every island)
    exchange_s: float  # exposed inter-island communication per step (sync, torchft) or round
    inner_steps: int  # H: inner steps per round, 1 for sync and torchft
    units_needed: float  # steps (sync) or island-rounds (torchft, fleet) to train every token
    checkpoint_interval_s: float  # seconds of progress between checkpoints (sync)
    checkpoint_s: float  # seconds a checkpoint blocks (sync)
    bytes_per_unit: float  # bytes one island sends per step (sync, torchft) or round (fleet)
    power_w: float  # per chip
    price_per_chip_hour: float

    @property
    def unit_s(self) -> float:
        """Wall seconds of one unit of work without failures."""
        return self.inner_steps * self.step_s + self.exchange_s

    @property
    def compute_share(self) -> float:
        """Share of a unit that is computation rather than exposed communication."""
        return self.inner_steps * self.step_s / self.unit_s

    @property
    def ideal_s(self) -> float:
        """Wall seconds of pure computation for the whole run, all chips busy."""
        per_island = self.units_needed / (1 if self.strategy == "sync" else self.islands)
        return per_island * self.inner_steps * self.step_s

    @property
    def mean_extra_s(self) -> float:
        return sum(k.share * k.extra_s for k in self.kinds)

    @property
    def inter_island_bytes_per_s(self) -> float:
        """Rate each island must sustain for its exchange to keep up with its computation."""
        return self.bytes_per_unit / (self.inner_steps * self.step_s)


def derive(scenario: Scenario, profile: Profile | None = None) -> Costs:
    """Unit costs of `scenario`; refuses a model whose training state does not fit an island."""
    from ostinato.plan.closed_form import daly_interval  # closed_form imports Costs

    prof = profile or load_profile(scenario.hardware.profile)
    _check_memory(scenario, prof)
    hw, st, rel = scenario.hardware, scenario.strategy, scenario.reliability
    sync = st.kind == "sync"
    chip_flops = prof.peak_flops * (hw.mfu or prof.mfu)
    step_s = scenario.model.batch_tokens * scenario.model.flops_per_token / (hw.chips * chip_flops)
    exchange_s, bytes_per_unit = _exchange(scenario, step_s)
    kinds, chip_rate = _fault_kinds(scenario, prof)
    unit_chips = hw.chips if sync else hw.chips // hw.islands
    rate = unit_chips * chip_rate
    interval = st.checkpoint_interval_s
    if sync and interval == 0:
        interval = daly_interval(st.checkpoint_s, 1 / rate)
    inner = st.inner_steps if st.kind == "fleet" else 1
    steps = scenario.model.tokens / scenario.model.batch_tokens
    return Costs(
        strategy=st.kind,
        chips=hw.chips,
        islands=hw.islands,
        failing_units=1 if sync else hw.islands,
        unit_rate_per_s=rate,
        kinds=kinds,
        restart_s=rel.job_restart_s if sync else rel.island_restart_s + _state_copy_s(scenario),
        step_s=step_s,
        exchange_s=exchange_s,
        inner_steps=inner,
        units_needed=steps if sync else steps * hw.islands / inner,
        checkpoint_interval_s=interval if sync else 0.0,
        checkpoint_s=st.checkpoint_s if sync else 0.0,
        bytes_per_unit=bytes_per_unit,
        power_w=prof.power_w,
        price_per_chip_hour=scenario.run.price_per_chip_hour,
    )


def _check_memory(scenario: Scenario, prof: Profile) -> None:
    hw, params = scenario.hardware, scenario.model.params
    per_island = hw.chips // hw.islands
    need = params * STATE_BYTES_PER_PARAM
    have = per_island * prof.memory_bytes * MEMORY_HEADROOM
    if need > have:
        least = math.ceil(need / (prof.memory_bytes * MEMORY_HEADROOM))
        raise PlanError(
            f"model.params = {params:.3g} does not fit: its training state takes {need / 1e12:.2f} TB "
            f"({STATE_BYTES_PER_PARAM} bytes per parameter: bf16 weights and gradients, fp32 master "
            f"weights and two Adam moments), but an island of {per_island} {prof.name} holds "
            f"{have / 1e12:.2f} TB ({MEMORY_HEADROOM:.0%} of memory; activations need the rest). "
            f"Use at least {least} chips per island (hardware.chips / hardware.islands), fewer "
            f"islands, or a smaller model."
        )


def _exchange(scenario: Scenario, step_s: float) -> tuple[float, float]:
    """Exposed seconds and bytes per island of one exchange, by a ring all-reduce over islands."""
    hw, params = scenario.hardware, scenario.model.params
    if hw.islands == 1:
        return 0.0, 0.0  # communication inside an island is already in the MFU
    ring = 2 * (hw.islands - 1) / hw.islands
    link = hw.inter_island_gbit_s * 1e9 / 8
    if scenario.strategy.kind == "fleet":
        sent = ring * params * COMPRESSION_BITS[scenario.strategy.compression] / 8
        return sent / link, sent  # a round waits for its exchange to finish
    sent = ring * params * GRAD_BYTES_PER_PARAM
    return max(0.0, sent / link - BACKWARD_SHARE * step_s), sent


def _state_copy_s(scenario: Scenario) -> float:
    per_param = DONOR_BYTES_PER_PARAM if scenario.strategy.kind == "fleet" else HEAL_BYTES_PER_PARAM
    link = scenario.hardware.inter_island_gbit_s * 1e9 / 8
    return scenario.model.params * per_param / link


def _fault_kinds(scenario: Scenario, prof: Profile) -> tuple[tuple[FaultKind, ...], float]:
    """Fault kinds with their shares, and the total failure rate per chip per second."""
    rel = scenario.reliability
    crash_per_h = 1 / (rel.chip_mtbf_hours or prof.mtbf_chip_hours)
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
