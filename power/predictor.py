"""Demand predictors: next-interval request rate from per-bin arrival counts.

Pluggable: anything with `observe(rate)` (one call per completed bin) and `predict() -> float`
(requests/s expected in the next bin). `measure()` scores a predictor on a series so choices
are made on numbers (the benchmark prints them).

- EWMA: rate_hat = a*rate + (1-a)*rate_hat. Follows level changes, lags ramps.
- Seasonal: EWMA level plus the slope of a smoothed per-phase daily profile (one slot per bin of
  the period, each an EWMA over days). Knows the morning ramp before it happens.
- Max: the larger of several predictors: used for floors, where under-prediction costs SLO.
"""
from __future__ import annotations

import math


class Ewma:
    name = "ewma"

    def __init__(self, alpha: float = 0.7):
        # 0.7: measured best of 0.3/0.5/0.7 on the diurnal traces' 10 s rate series (bursts).
        if not 0 < alpha <= 1:
            raise ValueError("alpha must be in (0, 1]")
        self.alpha = alpha
        self.level: float | None = None

    def observe(self, rate: float) -> None:
        self.level = rate if self.level is None else self.alpha * rate + (1 - self.alpha) * self.level

    def predict(self) -> float:
        return self.level or 0.0


class Seasonal:
    """EWMA level plus the daily profile's expected change to the next bin.

    predict = level + (P[next] - P[now]), where P is a per-phase profile over the period
    (`slots` bins; each slot an EWMA across days, weight `day_alpha`) smoothed over +-k slots.
    Predicting the profile itself (or profile + residual) was measured worse: one day's slot
    is one noisy 10 s Poisson sample plus whatever burst hit it; its *slope* is what carries
    over from day to day (the morning ramp, the evening fall-off).
    """
    name = "seasonal"

    def __init__(self, bin_s: float, period_s: float = 86400.0, alpha: float = 0.7,
                 day_alpha: float = 0.3, k: int = 6):
        self.bin_s = bin_s
        self.slots = max(1, int(round(period_s / bin_s)))
        self.day_alpha = day_alpha
        self.k = min(k, (self.slots - 1) // 2)
        self.profile: list[float | None] = [None] * self.slots
        self.level = Ewma(alpha)
        self.i = 0  # index of the next bin to observe

    def _smooth(self, s: int) -> float | None:
        vals = [self.profile[(s + j) % self.slots] for j in range(-self.k, self.k + 1)]
        vals = [v for v in vals if v is not None]
        return sum(vals) / len(vals) if vals else None

    def observe(self, rate: float) -> None:
        s = self.i % self.slots
        prev = self.profile[s]
        self.profile[s] = rate if prev is None else self.day_alpha * rate + (1 - self.day_alpha) * prev
        self.level.observe(rate)
        self.i += 1

    def predict(self) -> float:
        if self.i < self.slots:  # first period: no seasonal memory yet, pure level
            return self.level.predict()
        nxt, now = self._smooth(self.i % self.slots), self._smooth((self.i - 1) % self.slots)
        return max(0.0, self.level.predict() + (nxt - now))


class MaxOf:
    name = "max"

    def __init__(self, *preds):
        self.preds = preds

    def observe(self, rate: float) -> None:
        for p in self.preds:
            p.observe(rate)

    def predict(self) -> float:
        return max(p.predict() for p in self.preds)


def make(name: str, bin_s: float, period_s: float):
    if name == "ewma":
        return Ewma()
    if name == "seasonal":
        return Seasonal(bin_s, period_s)
    if name == "max":
        return MaxOf(Ewma(), Seasonal(bin_s, period_s))
    raise ValueError(f"unknown predictor {name!r} (ewma, seasonal, max)")


def measure(pred, series: list[float]) -> dict:
    """One-step-ahead errors of `pred` over `series` (rates per bin): MAE, RMSE, under-rate."""
    errs = []
    under = 0
    for x in series:
        p = pred.predict()
        errs.append(p - x)
        under += p < x
        pred.observe(x)
    n = max(1, len(errs))
    return {"mae": sum(abs(e) for e in errs) / n,
            "rmse": math.sqrt(sum(e * e for e in errs) / n),
            "under": under / n}
