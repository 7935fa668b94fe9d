"""Offline optimum: a clairvoyant schedule that knows every arrival (YDS-style).

Each request j has release r_j = arrival, deadline d_j = arrival + SLO, c_j cycles and m_j
seconds of memory time. Yao-Demers-Shenker: repeatedly find the interval [r_i, d_k] of maximum
density  sum(c) / (d_k - r_i - sum(m))  over the requests inside it, run those at that speed,
cut the interval out of the timeline and repeat. With one FIFO server and a common relative
deadline the requests inside [r_i, d_k] are exactly i..k (agreeable deadlines), so densities
come from prefix sums (numpy, O(k^2) per peel). The trace splits into independent segments
wherever a request arrives after the previous deadline.

Then, per request: speed = max(YDS speed, critical speed) (slower than critical costs energy),
realised on the discrete OPPs by time-sharing the two neighbouring OPPs (the energy-optimal way
to emulate an intermediate speed, Ishihara & Yasuura 1998); memory time is spent at the lower
one. Idle time is all in the deepest idle state; no transition or exit latencies; no system
suspend. It is a floor for DVFS policies that keep the system up, not for policies that suspend.
"""
from __future__ import annotations

import numpy as np

from .model import domain_model
from .profile import Profile
from .traces import Trace


def yds_speeds(r: np.ndarray, d: np.ndarray, c: np.ndarray, m: np.ndarray) -> np.ndarray:
    """YDS speeds (cycles/s) for FIFO jobs with agreeable deadlines; inf if infeasible."""
    n = len(r)
    speed = np.zeros(n)
    # Segment where r_j >= d_{j-1}: no interval can span the boundary usefully.
    starts = [0] + [j for j in range(1, n) if r[j] >= d[j - 1]] + [n]
    for a, b in zip(starts[:-1], starts[1:]):
        idx = np.arange(a, b)
        rr, dd = r[idx].astype(float).copy(), d[idx].astype(float).copy()
        cc, mm = c[idx], m[idx]
        alive = np.ones(len(idx), bool)
        while alive.any():
            live = np.flatnonzero(alive)
            R, D, C, M = rr[live], dd[live], cc[live], mm[live]
            pc = np.concatenate([[0.0], np.cumsum(C)])
            pm = np.concatenate([[0.0], np.cumsum(M)])
            k = len(live)
            W = pc[None, 1:] - pc[:k, None]       # W[i,j] = sum C[i..j]
            Mm = pm[None, 1:] - pm[:k, None]
            L = D[None, :] - R[:, None] - Mm
            with np.errstate(divide="ignore", invalid="ignore"):
                dens = np.where(L > 0, W / L, np.inf)
            dens[np.tril_indices(k, -1)] = -np.inf  # only i <= j
            flat = int(np.argmax(dens))
            i0, j0 = divmod(flat, k)
            s = dens[i0, j0]
            sel = live[i0:j0 + 1]
            speed[idx[sel]] = s
            alive[sel] = False
            z0, z1 = R[i0], D[j0]
            ln = z1 - z0
            # Cut [z0, z1] out of the timeline for the remaining jobs.
            for arrname in ("rr", "dd"):
                v = rr if arrname == "rr" else dd
                inside = (v > z0) & (v < z1)
                after = v >= z1
                v[inside] = z0
                v[after] -= ln
    return speed


def optimal(prof: Profile, trace: Trace, record: bool = False):
    from .sim import Result
    dm = domain_model(prof)
    svc = prof.service
    arr = trace.arrivals.astype(float)
    c = svc.cycles * trace.work
    m = svc.mem_s * trace.work
    d = arr + svc.slo_s
    sp = yds_speeds(arr, d, c, m)
    freqs = np.array(dm.freqs)
    act = np.array(dm.active_w)
    crit = dm.critical_opp(svc.cycles, svc.mem_s)
    s_eff = np.maximum(sp, freqs[crit])
    s_eff = np.minimum(s_eff, freqs[-1])  # infeasible requests run flat out (and miss)
    hi = np.clip(np.searchsorted(freqs, s_eff - 1e-6), 0, len(freqs) - 1)
    lo = np.where(freqs[hi] > s_eff + 1e-6, np.maximum(hi - 1, 0), hi)
    f_hi, f_lo = freqs[hi], freqs[lo]
    # Fraction x of the cycles at f_hi so that c*x/f_hi + c*(1-x)/f_lo = c/s_eff.
    with np.errstate(divide="ignore", invalid="ignore"):
        x = np.where(hi == lo, 1.0, (1 / f_lo - 1 / s_eff) / (1 / f_lo - 1 / f_hi))
    x = np.clip(x, 0, 1)
    t_hi = c * x / f_hi
    t_lo = c * (1 - x) / f_lo
    run = t_hi + t_lo + m
    # FIFO replay for completion times.
    done = np.empty(len(arr))
    tcur = 0.0
    for j in range(len(arr)):
        tcur = max(tcur, arr[j]) + run[j]
        done[j] = tcur
    duration = max(float(done[-1]), float(arr[-1])) if len(arr) else 0.0
    busy = float(run.sum())
    e_busy = float(np.sum(act[hi] * t_hi + act[lo] * (t_lo + m)))
    energy = duration * dm.base_w + (duration - busy) * dm.deep_w + e_busy
    res = Result(policy="optimal", params={}, n=len(arr), duration_s=duration, energy_j=energy,
                 latencies=done - arr, slo_s=svc.slo_s, deep_idle_s=duration - busy, busy_s=busy,
                 static_floor_j=duration * (dm.base_w + dm.deep_w), work_served=float(trace.work.sum()))
    if record:
        from .sim import _bin
        rows = []
        start = done - run
        prev = 0.0
        for j in range(len(arr)):
            if start[j] > prev:  # idle gap: every service core in the deepest state
                rows.append((prev, start[j], freqs[0], 0, dm.base_w + dm.deep_w))
            prev = done[j]
            fmix = (f_hi[j] * t_hi[j] + f_lo[j] * (t_lo[j] + m[j])) / run[j]
            pmix = dm.base_w + (act[hi[j]] * t_hi[j] + act[lo[j]] * (t_lo[j] + m[j])) / run[j]
            rows.append((start[j], done[j], fmix, 1, pmix))
        res.timeline = _bin(rows, duration)
    return res
