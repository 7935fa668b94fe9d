"""Power model shared by the simulator, the offline optimum and the daemon's planning.

P = k_cal * sum(u * C * V^2 * f) + leakage + idle-state power + platform power
with C in mainline's unit (uW/MHz/V^2), f in MHz, leakage = leakage_w_per_v * V per powered
core. Only the service domain's cores change state in the simulator; every other core sits in
its deepest idle state at its lowest OPP (the constant `base_w`).
"""
from __future__ import annotations

from dataclasses import dataclass

from .profile import Policy, Profile, deepest_sleep_w


def core_active_w(prof: Profile, pol: Policy, i: int) -> float:
    o = pol.opps[i]
    return prof.k_cal * pol.dynamic_power_coefficient * 1e-6 * (o.khz / 1e3) * o.volts ** 2 \
        + pol.leakage_w_per_v * o.volts


def core_shallow_idle_w(pol: Policy, i: int) -> float:
    """Clock-gated (WFI/C1): no dynamic power, leakage at the current voltage."""
    return pol.leakage_w_per_v * pol.opps[i].volts


@dataclass(frozen=True)
class DomainModel:
    """Per-OPP power of the service domain (all its threads together) and the constant rest."""
    freqs: list[float]       # Hz, ascending
    active_w: list[float]    # all service threads running at OPP i
    shallow_w: list[float]   # service threads clock-gated idle at OPP i
    deep_w: float            # service threads in the deepest idle state
    base_w: float            # platform + every other core asleep
    deep_exit_s: float
    deep_min_residency_s: float
    transition_s: float
    threads: int

    def opp_at_or_above(self, f: float) -> int:
        for i, x in enumerate(self.freqs):
            if x >= f - 1e-6:
                return i
        return len(self.freqs) - 1

    def opp_closest(self, f: float) -> int:
        return min(range(len(self.freqs)), key=lambda i: (abs(self.freqs[i] - f), self.freqs[i]))

    def critical_opp(self, cycles: float, mem_s: float) -> int:
        """OPP with the least extra energy per request over sleeping (the critical speed)."""
        best, best_e = 0, float("inf")
        for i, f in enumerate(self.freqs):
            e = (self.active_w[i] - self.deep_w) * (cycles / f + mem_s)
            if e < best_e - 1e-12:
                best, best_e = i, e
        return best


def domain_model(prof: Profile) -> DomainModel:
    assert prof.service is not None
    svc = prof.service
    pols = prof.service_policies()
    pol = pols[0]  # all service policies share one OPP table (validated)
    n = svc.threads
    # Cores of the service policies beyond `threads`, and all other policies: deepest sleep.
    base = prof.platform_w
    for p in prof.policies:
        idle_cores = len(p.cpus)
        if p.name in svc.policies:
            idle_cores = 0
        base += deepest_sleep_w(prof, p, p.opps[0].volts) * idle_cores
    spare = sum(len(p.cpus) for p in pols) - n
    base += deepest_sleep_w(prof, pol, pol.opps[0].volts) * spare
    deep = prof.idle_states[-1] if prof.idle_states else None
    return DomainModel(
        freqs=pol.freqs(),
        active_w=[core_active_w(prof, pol, i) * n for i in range(len(pol.opps))],
        shallow_w=[core_shallow_idle_w(pol, i) * n for i in range(len(pol.opps))],
        deep_w=deepest_sleep_w(prof, pol, pol.opps[0].volts) * n,
        base_w=base,
        deep_exit_s=(deep.exit_latency_us * 1e-6) if deep else 0.0,
        deep_min_residency_s=(deep.min_residency_us * 1e-6) if deep else 0.0,
        transition_s=pol.transition_latency_us * 1e-6,
        threads=n,
    )


def whole_board_w(prof: Profile, running: dict[str, tuple[int, int]] | None = None) -> float:
    """Board power with `running[policy] = (busy cores, opp index)`; other cores deepest idle.

    Used to check the calibration (idle and all-cores stress) against the wall numbers.
    """
    running = running or {}
    w = prof.platform_w
    for p in prof.policies:
        busy, i = running.get(p.name, (0, 0))
        w += core_active_w(prof, p, i) * busy
        w += deepest_sleep_w(prof, p, p.opps[0].volts) * (len(p.cpus) - busy)
    return w
