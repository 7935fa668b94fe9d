"""Pure decisions of our policy, shared by the simulator and the daemon (no I/O here).

Frequency: the lowest OPP that (a) drains the current queue before the latency budget runs out
("Optimal Available", Yao-Demers-Shenker 1995, with only the queue depth known: every queued
request is assumed to have just arrived, minus a headroom), (b) keeps predicted utilisation under
`target_util`, (c) is not below the critical speed (below it, slower costs more energy), and
(d) respects the thermal cap. Sleep: park cores / suspend after a quiet period when the
predictor expects no demand.
"""
from __future__ import annotations

from dataclasses import dataclass

from .model import DomainModel


@dataclass(frozen=True)
class Tunables:
    headroom: float = 0.5        # fraction of the SLO the queue may use (rest: waiting + noise)
    target_util: float = 0.6     # predicted utilisation ceiling at the chosen OPP
    interval_s: float = 0.010    # decision period (daemon poll of /metrics)
    quiet_rate: float = 0.05     # req/s below which the future counts as "no demand"


def required_freq(depth: int, rate: float, cycles: float, mem_s: float, slo_s: float, t: Tunables) -> float:
    """Hz needed for `depth` queued requests and a predicted `rate` (req/s); inf if impossible."""
    need = 0.0
    if depth > 0:
        budget = t.headroom * slo_s - depth * mem_s
        need = float("inf") if budget <= 0 else depth * cycles / budget
    if rate > 0:
        spare = t.target_util - rate * mem_s
        need = max(need, float("inf") if spare <= 0 else rate * cycles / spare)
    return need


def choose_opp(dm: DomainModel, depth: int, rate: float, cycles: float, mem_s: float, slo_s: float,
               t: Tunables, cap_opp: int | None = None, floor_opp: int | None = None) -> int:
    """`floor_opp`: the critical OPP if the caller cached dm.critical_opp(cycles, mem_s)."""
    need = required_freq(depth, rate, cycles, mem_s, slo_s, t)
    i = dm.opp_at_or_above(need) if need != float("inf") else len(dm.freqs) - 1
    i = max(i, dm.critical_opp(cycles, mem_s) if floor_opp is None else floor_opp)
    if cap_opp is not None:
        i = min(i, cap_opp)
    return i


def thermal_cap(temp_c: float | None, limit_c: float, current_cap: int, nopps: int, band_c: float = 3.0) -> int:
    """Step the frequency cap down one OPP per decision above the limit, up again below
    limit - band (hysteresis), so the kernel's passive trip (above `limit_c`) never fires."""
    if temp_c is None:
        return nopps - 1
    if temp_c >= limit_c:
        return max(0, current_cap - 1)
    if temp_c < limit_c - band_c:
        return min(nopps - 1, current_cap + 1)
    return current_cap


@dataclass(frozen=True)
class SleepPlan:
    park: bool
    suspend: bool
    wake_after_s: float | None


def plan_sleep(quiet_for_s: float, predicted_rate: float, next_demand_in_s: float | None,
               quiet_period_s: float, suspend_allowed: bool, max_sleep_s: float,
               quiet_rate: float, resume_latency_s: float) -> SleepPlan:
    """After `quiet_period_s` with nothing and nothing predicted: park; suspend if allowed, with
    an RTC alarm a resume-latency before the next predicted demand (or `max_sleep_s`)."""
    if quiet_for_s < quiet_period_s or predicted_rate > quiet_rate:
        return SleepPlan(False, False, None)
    if not suspend_allowed:
        return SleepPlan(True, False, None)
    wake = max_sleep_s if next_demand_in_s is None else min(max_sleep_s, next_demand_in_s - resume_latency_s)
    if wake < 2 * resume_latency_s:  # not worth a suspend/resume cycle
        return SleepPlan(True, False, None)
    return SleepPlan(True, True, wake)
