"""Trace-driven simulator of the inference service under a frequency policy.

Queue model: one FIFO server (the inference service, `threads` cores of the service policies
in lock-step). A request needs c cycles plus m seconds of frequency-insensitive memory time, so
at frequency f it takes s(f) = c/f + m; across frequency changes the remaining *fraction* r of
the request drains at rate 1/s(f), which integrates s(f) exactly piecewise.
Effects modelled: OPP transition latency (no progress for `transition_latency_us` after a
change), idle states (an idle gap >= the deepest state's min residency is spent in it and the
next request pays its exit latency; shorter gaps are clock-gated idle at the current voltage:
the oracle choice a perfect cpuidle governor would make, identical for every policy),
system suspend for our policy when the profile allows it (requests arriving while suspended
wait for the resume latency).

Power: DomainModel (power/model.py): k_cal*sum(u*C*V^2*f) + leakage + idle-state + platform.
Governors are called the way the kernel calls them: at enqueue (arrival), dequeue (completion)
and the scheduler tick (HZ=250, every 4 ms) while the CPU is busy; nothing while idle (NOHZ).
Our policy instead runs on its own timer (`interval_s`) and only sees the queue depth then.
"""
from __future__ import annotations

import copy
import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from . import planner, predictor
from .errors import PowerError
from .model import DomainModel, domain_model
from .profile import Profile
from .traces import Trace

POLICIES = ("ours", "ondemand", "schedutil", "performance", "powersave", "optimal")
SCHED_TICK_S = 0.004  # CONFIG_HZ=250 (Debian arm64 and amd64 kernels)


@dataclass
class Result:
    policy: str
    params: dict
    n: int
    duration_s: float
    energy_j: float
    latencies: np.ndarray
    slo_s: float
    asleep_s: float = 0.0        # system suspended
    deep_idle_s: float = 0.0     # service cores in the deepest idle state
    busy_s: float = 0.0
    static_floor_j: float = 0.0  # duration x lowest possible power (everything asleep)
    work_served: float = 0.0
    timeline: dict | None = field(default=None, repr=False)

    @property
    def energy_per_inference_j(self) -> float:
        return self.energy_j / max(1, self.n)

    @property
    def misses(self) -> int:
        # 1 us tolerance: YDS finishes requests exactly at their deadline, and float time
        # stamps around t = 3000 s carry ~1e-12 s of rounding per step.
        return int(np.sum(self.latencies > self.slo_s + 1e-6))

    @property
    def miss_frac(self) -> float:
        return self.misses / max(1, self.n)

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) if self.n else 0.0

    def summary(self) -> dict:
        return {"policy": self.policy, "params": self.params, "requests": self.n,
                "duration_s": round(self.duration_s, 3), "energy_j": round(self.energy_j, 3),
                "energy_per_inference_mj": round(1e3 * self.energy_per_inference_j, 4),
                "mean_power_w": round(self.energy_j / max(self.duration_s, 1e-9), 4),
                "p50_ms": round(1e3 * self.pct(50), 3), "p99_ms": round(1e3 * self.pct(99), 3),
                "slo_ms": round(1e3 * self.slo_s, 3), "slo_misses": self.misses,
                "slo_miss_frac": round(self.miss_frac, 5), "asleep_s": round(self.asleep_s, 3),
                "deep_idle_s": round(self.deep_idle_s, 3)}


# ---------------------------------------------------------------- governors (kernel models)

class Governor:
    tick_s = SCHED_TICK_S
    sees_arrivals = True

    def __init__(self, dm: DomainModel):
        self.dm = dm
        self.opp = 0

    def update(self, t: float, event: str, running_before: bool, running_after: bool,
               depth: int, busy_total: float, arrived: int) -> int | None:
        return None

    def plan_idle(self, t: float, last_arrival: float, next_arrival: float) -> tuple[float, float] | None:
        return None


class Performance(Governor):
    def __init__(self, dm):
        super().__init__(dm)
        self.opp = len(dm.freqs) - 1


class Powersave(Governor):
    pass


class Ondemand(Governor):
    """drivers/cpufreq/cpufreq_ondemand.c: every sampling_rate, load = busy/wall since the last
    sample (the previous load is reused once after an idle of > 2 samples, as dbs_update does);
    load > up_threshold -> fmax, else fmin + load*(fmax-fmin)/100, closest OPP (RELATION_C)."""

    def __init__(self, dm, sampling_rate_s: float = 0.010, up_threshold: float = 80.0):
        super().__init__(dm)
        self.rate = sampling_rate_s
        self.up = up_threshold
        self.last_t = 0.0
        self.last_busy = 0.0
        self.prev_load = 0.0

    def update(self, t, event, running_before, running_after, depth, busy_total, arrived):
        wall = t - self.last_t
        if wall < self.rate:
            return None
        busy = busy_total - self.last_busy
        self.last_t, self.last_busy = t, busy_total
        if wall > 2 * self.rate and self.prev_load:
            load, self.prev_load = self.prev_load, 0.0
        else:
            load = 100.0 * min(1.0, busy / wall)
            self.prev_load = load
        fmin, fmax = self.dm.freqs[0], self.dm.freqs[-1]
        if load > self.up:
            return len(self.dm.freqs) - 1
        return self.dm.opp_closest(fmin + load * (fmax - fmin) / 100.0)


class Schedutil(Governor):
    """kernel/sched/cpufreq_schedutil.c over frequency-invariant PELT (32 ms half-life):
    next_f = 1.25 * fmax * util, lowest OPP at or above (RELATION_L), at most one change per
    rate_limit; util_est (the task's EWMA util, weight 1/4, raised at once when exceeded) keeps
    the utilisation of a waking task."""

    def __init__(self, dm, rate_limit_s: float = 0.002, margin: float = 1.25, util_est: bool = True,
                 busy_hold: bool = False):
        super().__init__(dm)
        # Single-CPU policies (sugov_update_single_freq): no frequency reduction while the CPU
        # has not been idle since the last update (sugov_cpu_is_busy / sugov_hold_freq).
        self.busy_hold = busy_hold
        self.idle_seen = True
        self.rate_limit = rate_limit_s
        self.margin = margin
        self.use_est = util_est
        self.util = 0.0
        self.ewma = 0.0
        self.last_t = 0.0
        self.last_change = -math.inf

    def update(self, t, event, running_before, running_after, depth, busy_total, arrived):
        dt = t - self.last_t
        if dt > 0:
            y = 0.5 ** (dt / 0.032)
            contrib = self.dm.freqs[self.opp] / self.dm.freqs[-1] if running_before else 0.0
            self.util = self.util * y + contrib * (1 - y)
        self.last_t = t
        if not running_before or not running_after:
            self.idle_seen = True
        if running_before and not running_after and self.use_est:
            self.ewma = self.util if self.util >= self.ewma else self.ewma + (self.util - self.ewma) / 4
        eff = max(self.util, self.ewma) if (running_after and self.use_est) else self.util
        if t - self.last_change < self.rate_limit:
            return None
        nxt = self.dm.opp_at_or_above(self.margin * self.dm.freqs[-1] * eff)
        busy = not self.idle_seen
        self.idle_seen = not running_after
        if self.busy_hold and busy and nxt < self.opp:
            return None
        if nxt != self.opp:
            self.last_change = t
            return nxt
        return None


class Ours(Governor):
    """power/planner.py decisions on a timer; demand predictor on `bin_s` bins."""
    sees_arrivals = False

    def __init__(self, dm, prof: Profile, period_s: float, headroom=0.5, target_util=0.6,
                 interval_s=0.010, predictor_name="ewma", bin_s=10.0):
        super().__init__(dm)
        self.prof = prof
        self.tun = planner.Tunables(headroom=headroom, target_util=target_util, interval_s=interval_s)
        self.tick_s = interval_s
        self.bin_s = bin_s
        self.pred = predictor.make(predictor_name, bin_s, period_s)
        self.bin_end = bin_s
        self.bin_start_count = 0
        self._arrived = 0
        svc = prof.service
        self.c, self.m, self.slo = svc.cycles, svc.mem_s, svc.slo_s
        self.floor = dm.critical_opp(self.c, self.m)
        self.opp = self.decide(0, 0.0)

    @property
    def pending(self) -> int:
        return self._arrived - self.bin_start_count

    def roll(self, t: float, arrived: int) -> None:
        # Bins that ended before t: the arrivals counted so far belong to the first of them
        # (close enough at 10 s bins; the daemon does the same with its sampled counters).
        while t >= self.bin_end:
            self.pred.observe((arrived - self.bin_start_count) / self.bin_s)
            self.bin_start_count = arrived
            self.bin_end += self.bin_s
        self._arrived = arrived

    def decide(self, depth: int, rate: float) -> int:
        return planner.choose_opp(self.dm, depth, rate, self.c, self.m, self.slo, self.tun, floor_opp=self.floor)

    def update(self, t, event, running_before, running_after, depth, busy_total, arrived):
        self.roll(t, arrived)
        if event == "arrival":
            return None  # the daemon learns of the queue at its next poll
        return self.decide(depth, self.pred.predict())

    def plan_idle(self, t, last_arrival, next_arrival):
        """Suspend window for an idle gap, decided as the daemon would: the predictor rolls
        forward over empty bins; suspend once quiet for quiet_period_s and nothing is predicted
        (planner.plan_sleep), RTC alarm a resume latency before the next predicted demand.
        `next_arrival` is only used to skip work whose outcome cannot matter (the daemon would
        have seen that request before deciding)."""
        ip = self.prof.idle_policy
        if not ip.suspend_allowed or next_arrival <= last_arrival + ip.quiet_period_s:
            return None
        p = copy.deepcopy(self.pred)
        bin_end, pending = self.bin_end, self.pending
        ts = max(t, last_arrival + ip.quiet_period_s)
        while True:
            while bin_end <= ts:
                p.observe(pending / self.bin_s)
                pending, bin_end = 0, bin_end + self.bin_s
            if ts >= next_arrival:
                return None
            rate = p.predict()
            # Next predicted demand: roll a second copy forward over empty bins.
            q, be, nd = copy.deepcopy(p), bin_end, None
            while be - ts < ip.max_sleep_s:
                if q.predict() > self.tun.quiet_rate:
                    nd = be - self.bin_s - ts
                    break
                q.observe(0.0)
                be += self.bin_s
            plan = planner.plan_sleep(ts - last_arrival, rate, nd, ip.quiet_period_s, True,
                                      ip.max_sleep_s, self.tun.quiet_rate, ip.resume_latency_s)
            if plan.suspend:
                return ts, ts + plan.wake_after_s
            ts = bin_end  # predicted demand still above quiet: look again at the next bin


def make_governor(name: str, dm: DomainModel, prof: Profile, trace: Trace, params: dict) -> Governor:
    try:
        if name == "performance":
            return Performance(dm)
        if name == "powersave":
            return Powersave(dm)
        if name == "ondemand":
            return Ondemand(dm, **params)
        if name == "schedutil":
            single = all(len(p.cpus) == 1 for p in prof.service_policies())
            return Schedutil(dm, **{"busy_hold": single, **params})
        if name == "ours":
            return Ours(dm, prof, trace.period_s, **params)
    except TypeError as e:
        raise PowerError(f"policy {name}: bad tunable: {e}") from None
    raise PowerError(f"unknown policy {name!r} (one of: {', '.join(POLICIES)})")


# ---------------------------------------------------------------- the event loop

class _Rec:
    """Piecewise-constant segments (t0, t1, freq, depth, power) for the plot."""

    def __init__(self, on: bool):
        self.on = on
        self.rows: list[tuple[float, float, float, int, float]] = []

    def add(self, t0, t1, f, depth, p):
        if self.on and t1 > t0:
            self.rows.append((t0, t1, f, depth, p))


def simulate(prof: Profile, trace: Trace, policy: str, params: dict | None = None,
             record: bool = False, governor: Governor | None = None) -> Result:
    """Replay `trace` under `policy` (a name from POLICIES; `governor` overrides it with an
    instance built on domain_model(prof), for tests and experiments)."""
    if prof.observe_only or prof.service is None:
        raise PowerError(f"{prof.source}: board {prof.name!r} is observe-only (no cpufreq): nothing to simulate")
    params = dict(params or {})
    if policy == "optimal":
        from .optimal import optimal
        return optimal(prof, trace, record=record)
    dm = domain_model(prof)
    gov = governor or make_governor(policy, dm, prof, trace, params)
    svc = prof.service
    arr = trace.arrivals
    n = len(arr)
    cyc = svc.cycles * trace.work
    mem = svc.mem_s * trace.work
    done = np.full(n, np.nan)
    rec = _Rec(record)

    t = 0.0
    fi = gov.opp
    q: deque[int] = deque()
    r = 1.0                 # remaining fraction of the head request
    stall_until = 0.0       # transition / idle-exit / resume: no progress before this
    busy_total = 0.0
    energy = 0.0
    asleep = deep_s = 0.0
    i = 0                   # next arrival
    last_arrival = 0.0
    resume_s = prof.idle_policy.resume_latency_s
    suspend_w = prof.idle_policy.suspend_w

    def set_opp(new):
        nonlocal fi, stall_until
        if new is not None and new != fi:
            fi = new
            gov.opp = new
            stall_until = max(stall_until, t) + dm.transition_s

    while i < n or q:
        if not q:
            # ---- idle gap until the next arrival (no governor calls: NOHZ idle)
            ta = arr[i]
            gap = ta - t
            wake_extra = 0.0
            plan = gov.plan_idle(t, last_arrival, ta)
            if plan and ta > plan[0]:
                s_at, w_at = plan
                # awake-idle until s_at, suspended until min(ta, w_at), and repeat after alarms
                energy += (s_at - t) * (dm.base_w + dm.deep_w)
                deep_s += s_at - t
                rec.add(t, s_at, dm.freqs[fi], 0, dm.base_w + dm.deep_w)
                cur = s_at
                while True:
                    end = min(ta, w_at)
                    energy += (end - cur) * suspend_w
                    asleep += end - cur
                    rec.add(cur, end, 0.0, 0, suspend_w)
                    if ta <= w_at:
                        wake_extra = resume_s  # woken by the request (wake-on-LAN)
                        break
                    # RTC alarm: awake again, quiet for another quiet period, suspend again
                    nxt = w_at + prof.idle_policy.quiet_period_s
                    if ta <= nxt:
                        energy += (ta - w_at) * (dm.base_w + dm.deep_w)
                        deep_s += ta - w_at
                        rec.add(w_at, ta, dm.freqs[fi], 0, dm.base_w + dm.deep_w)
                        break
                    energy += (nxt - w_at) * (dm.base_w + dm.deep_w)
                    deep_s += nxt - w_at
                    cur, w_at = nxt, nxt + prof.idle_policy.max_sleep_s
            elif gap >= dm.deep_min_residency_s:
                energy += gap * (dm.base_w + dm.deep_w)
                deep_s += gap
                rec.add(t, ta, dm.freqs[fi], 0, dm.base_w + dm.deep_w)
                wake_extra = dm.deep_exit_s
            else:
                energy += gap * (dm.base_w + dm.shallow_w[fi])
                rec.add(t, ta, dm.freqs[fi], 0, dm.base_w + dm.shallow_w[fi])
            t = ta
            stall_until = max(stall_until, t + wake_extra)
            q.append(i)
            last_arrival = ta
            i += 1
            r = 1.0
            if gov.sees_arrivals:
                set_opp(gov.update(t, "arrival", False, True, len(q), busy_total, i))
            next_tick = (math.floor(t / gov.tick_s) + 1) * gov.tick_s
            continue

        # ---- busy: run the head request until the next event
        j = q[0]
        f = dm.freqs[fi]
        s = cyc[j] / f + mem[j]
        start = max(t, stall_until)
        tc = start + r * s
        ta = arr[i] if i < n else math.inf
        t2 = min(tc, ta, next_tick)
        p = dm.base_w + dm.active_w[fi]
        energy += (t2 - t) * p
        rec.add(t, t2, f, len(q), p)
        busy_total += t2 - t
        if t2 > start:
            r -= (t2 - start) / s
        t = t2
        if t2 == tc:
            q.popleft()
            done[j] = t
            r = 1.0
            set_opp(gov.update(t, "complete", True, bool(q), len(q), busy_total, i))
        elif t2 == ta:
            q.append(i)
            last_arrival = ta
            i += 1
            if gov.sees_arrivals:
                set_opp(gov.update(t, "arrival", True, True, len(q), busy_total, i))
        else:
            next_tick += gov.tick_s
            set_opp(gov.update(t, "tick", True, True, len(q), busy_total, i))

    lat = done - arr
    floor_w = min(dm.base_w + dm.deep_w, suspend_w if prof.idle_policy.suspend_allowed else math.inf)
    res = Result(policy=policy, params=params, n=n, duration_s=t, energy_j=energy, latencies=lat,
                 slo_s=svc.slo_s, asleep_s=asleep, deep_idle_s=deep_s, busy_s=busy_total,
                 static_floor_j=t * floor_w, work_served=float(np.sum(trace.work[~np.isnan(done)])))
    if record:
        res.timeline = _bin(rec.rows, t)
    return res


def _bin(rows, duration: float, nbins: int = 600) -> dict:
    """Time-weighted means per bin (power, frequency) and max queue, for plotting."""
    a = np.array(rows, dtype=float) if rows else np.zeros((0, 5))
    edges = np.linspace(0, max(duration, 1e-9), nbins + 1)
    pw = np.zeros(nbins)
    fw = np.zeros(nbins)
    qmax = np.zeros(nbins)
    width = edges[1] - edges[0]
    for t0, t1, f, d, p in a:
        b0 = min(nbins - 1, int(t0 / width))
        b1 = min(nbins - 1, int(t1 / width))
        for b in range(b0, b1 + 1):
            ov = min(t1, edges[b + 1]) - max(t0, edges[b])
            if ov > 0:
                pw[b] += ov * p
                fw[b] += ov * f
            qmax[b] = max(qmax[b], d)
    return {"t": (edges[:-1] + edges[1:]) / 2, "power_w": pw / width, "freq_hz": fw / width, "queue": qmax}
