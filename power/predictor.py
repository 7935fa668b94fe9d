"""Demand predictors: next-interval request rate from per-bin arrival counts.

Pluggable: anything with `observe(rate)` (one call per completed bin) and `predict() -> float`
(requests/s expected in the next bin). `measure()` scores a predictor on a series so choices
are made on numbers (the benchmark prints them).

- EWMA: rate_hat = a*rate + (1-a)*rate_hat. Follows level changes, lags ramps.
- Seasonal: EWMA of the residual plus a per-phase mean over the daily period (one slot per bin
  of the period, itself an EWMA over days). Knows the morning ramp before it happens.
- Max: the larger of several predictors: used for floors, where under-prediction costs SLO.
"""
from __future__ import annotations

import math


class Ewma:
    name = "ewma"

    def __init__(self, alpha: float = 0.3):
        if not 0 < alpha <= 1:
            raise ValueError("alpha must be in (0, 1]")
        self.alpha = alpha
        self.level: float | None = None

    def observe(self, rate: float) -> None:
        self.level = rate if self.level is None else self.alpha * rate + (1 - self.alpha) * self.level

    def predict(self) -> float:
        return self.level or 0.0


class Seasonal:
    """EWMA level on the de-seasonalised series + daily profile of `slots` phase bins."""
    name = "seasonal"

    def __init__(self, bin_s: float, period_s: float = 86400.0, alpha: float = 0.3, day_alpha: float = 0.5):
        self.bin_s = bin_s
        self.slots = max(1, int(round(period_s / bin_s)))
        self.alpha = alpha
        self.day_alpha = day_alpha
        self.profile: list[float | None] = [None] * self.slots
        self.resid = Ewma(alpha)
        self.i = 0  # index of the next bin to observe

    def observe(self, rate: float) -> None:
        s = self.i % self.slots
        prev = self.profile[s]
        base = prev if prev is not None else rate
        self.resid.observe(rate - base)
        self.profile[s] = rate if prev is None else self.day_alpha * rate + (1 - self.day_alpha) * prev
        self.i += 1

    def predict(self) -> float:
        nxt = self.profile[self.i % self.slots]
        if nxt is None:  # first day: no seasonal memory yet, pure level
            last = self.profile[(self.i - 1) % self.slots]
            return max(0.0, (last or 0.0))
        # Residual decays toward the seasonal value: a burst now says little about tomorrow.
        return max(0.0, nxt + self.resid.predict())


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
