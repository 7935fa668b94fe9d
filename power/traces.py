"""Request-arrival traces: reproducible generators and the CSV format.

CSV format (what `appliance-power gen-trace` writes and `simulate --trace` reads):
    # comment lines start with '#'; `# period_s=3600` declares the daily period (optional)
    arrival_s,work
    0.1234,1.0
`arrival_s` is seconds from the start, non-decreasing; `work` (optional column, default 1.0)
scales the board's nominal request cost (service.cycles and service.mem_s).

Generators (numpy PCG64 seeded, so a (kind, seed, duration) triple is the same trace anywhere):
- diurnal: a compressed "day" of `period_s` (default 1800 s) repeated; rate follows
  lo + (hi-lo)*(1-cos(2*pi*t/period))/2 (trough at t=0, peak mid-period), plus bursts: episodes
  starting as a Poisson process (one per 300 s on average) lasting 10-40 s at 2.5x the rate.
- steady: constant low load (2 req/s), Poisson arrivals.
- spiky: 0.3 req/s background plus a spike every 20-120 s (uniform): 4-10 requests in 0.5 s.
- office: like diurnal but closed at night: rate = hi*max(0, (raised cosine - 0.3)/0.7), so
  about a third of each period has no requests at all (what suspend-to-RAM is for); bursts
  only during opening hours.
Work per request is lognormal around 1.0 (sigma 0.15): inputs differ a little in cost.
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import PowerError

KINDS = ("diurnal", "steady", "spiky", "office")


@dataclass
class Trace:
    arrivals: np.ndarray  # seconds, non-decreasing
    work: np.ndarray      # multiplier of the nominal request cost
    period_s: float = 86400.0
    name: str = "trace"

    @property
    def duration(self) -> float:
        return float(self.arrivals[-1]) if len(self.arrivals) else 0.0


def _poisson(rng: np.random.Generator, rate_fn, rmax: float, t0: float, t1: float) -> np.ndarray:
    """Non-homogeneous Poisson arrivals by thinning (Lewis & Shedler)."""
    n = rng.poisson(rmax * (t1 - t0))
    t = np.sort(rng.uniform(t0, t1, n))
    keep = rng.uniform(0, rmax, n) < rate_fn(t)
    return t[keep]


def generate(kind: str, seed: int = 0, duration_s: float | None = None, period_s: float = 1800.0,
             lo: float = 0.2, hi: float = 12.0) -> Trace:
    rng = np.random.default_rng(np.random.PCG64(seed))
    if kind == "diurnal":
        dur = duration_s or 2 * period_s
        # Burst episodes: Poisson starts, 10-40 s long, multiply the rate by 2.5.
        nb = rng.poisson(dur / 300.0)
        starts = np.sort(rng.uniform(0, dur, nb))
        lens = rng.uniform(10, 40, nb)

        def rate(t):
            base = lo + (hi - lo) * (1 - np.cos(2 * math.pi * t / period_s)) / 2
            mult = np.ones_like(t)
            for s, ln in zip(starts, lens):
                mult = np.where((t >= s) & (t < s + ln), 2.5, mult)
            return base * mult

        t = _poisson(rng, rate, hi * 2.5, 0.0, dur)
    elif kind == "office":
        dur = duration_s or 2 * period_s
        nb = rng.poisson(dur / 300.0)
        starts = np.sort(rng.uniform(0, dur, nb))
        lens = rng.uniform(10, 40, nb)

        def rate(t):
            shape = np.maximum(0.0, ((1 - np.cos(2 * math.pi * t / period_s)) / 2 - 0.3) / 0.7)
            mult = np.ones_like(t)
            for s, ln in zip(starts, lens):
                mult = np.where((t >= s) & (t < s + ln), 2.5, mult)
            return hi * shape * mult

        t = _poisson(rng, rate, hi * 2.5, 0.0, dur)
    elif kind == "steady":
        dur = duration_s or 1800.0
        t = _poisson(rng, lambda x: np.full_like(x, 2.0), 2.0, 0.0, dur)
    elif kind == "spiky":
        dur = duration_s or 1800.0
        bg = _poisson(rng, lambda x: np.full_like(x, 0.3), 0.3, 0.0, dur)
        spikes = []
        s = rng.uniform(5, 60)
        while s < dur:
            k = int(rng.integers(4, 11))
            spikes.append(s + np.sort(rng.uniform(0, 0.5, k)))
            s += rng.uniform(20, 120)
        t = np.sort(np.concatenate([bg] + spikes)) if spikes else bg
        t = t[t < dur]
    else:
        raise PowerError(f"unknown trace kind {kind!r} (one of: {', '.join(KINDS)})")
    work = rng.lognormal(mean=-0.5 * 0.15 ** 2, sigma=0.15, size=len(t))
    return Trace(arrivals=t, work=work, period_s=period_s if kind in ("diurnal", "office") else 86400.0,
                 name=f"{kind}-s{seed}")


def write_csv(trace: Trace, path: Path) -> None:
    """Atomic write: temp file in the same directory, fsync, rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a trace is not a secret
        with os.fdopen(fd, "w") as f:
            f.write(f"# appliance power trace {trace.name}\n# period_s={trace.period_s:g}\n")
            f.write("arrival_s,work\n")
            for a, w in zip(trace.arrivals, trace.work):
                f.write(f"{a:.6f},{w:.4f}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_csv(path: Path) -> Trace:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise PowerError(f"{path}: cannot read trace: {e.strerror}") from None
    except UnicodeDecodeError:
        raise PowerError(f"{path}: not a text CSV file") from None
    period = 86400.0
    arrivals: list[float] = []
    work: list[float] = []
    header_seen = False
    ncols = 0
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            body = line[1:].strip()
            if body.startswith("period_s="):
                try:
                    period = float(body.split("=", 1)[1])
                except ValueError:
                    raise PowerError(f"{path}: line {lineno}: period_s is not a number") from None
                if not period > 0:
                    raise PowerError(f"{path}: line {lineno}: period_s must be > 0")
            continue
        cells = [c.strip() for c in line.split(",")]
        if not header_seen:
            header_seen = True
            if cells[0] == "arrival_s":
                if cells not in (["arrival_s"], ["arrival_s", "work"]):
                    raise PowerError(f"{path}: line {lineno}: header must be 'arrival_s' or 'arrival_s,work', "
                                     f"got {line!r}")
                ncols = len(cells)
                continue
            ncols = len(cells)
        if len(cells) != ncols or ncols not in (1, 2):
            raise PowerError(f"{path}: line {lineno}: expected {ncols or 'arrival_s[,work]'} column(s), "
                             f"got {len(cells)}")
        try:
            a = float(cells[0])
        except ValueError:
            raise PowerError(f"{path}: line {lineno}: arrival_s {cells[0]!r} is not a number") from None
        if not math.isfinite(a) or a < 0:
            raise PowerError(f"{path}: line {lineno}: arrival_s must be a finite number >= 0, got {cells[0]}")
        if arrivals and a < arrivals[-1]:
            raise PowerError(f"{path}: line {lineno}: arrival_s {a} is before the previous one "
                             f"({arrivals[-1]}); sort the trace by time")
        w = 1.0
        if ncols == 2:
            try:
                w = float(cells[1])
            except ValueError:
                raise PowerError(f"{path}: line {lineno}: work {cells[1]!r} is not a number") from None
            if not math.isfinite(w) or w <= 0:
                raise PowerError(f"{path}: line {lineno}: work must be > 0, got {cells[1]}")
        arrivals.append(a)
        work.append(w)
    if not arrivals:
        raise PowerError(f"{path}: no requests in the trace (expected lines of arrival_s[,work])")
    return Trace(np.array(arrivals), np.array(work), period_s=period, name=path.stem)
