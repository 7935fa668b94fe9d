"""Demand predictors: behaviour on series whose right answer is known, and the measurement."""
from __future__ import annotations

import math

import numpy as np
import pytest

from appliance.power import predictor


def test_ewma_converges_to_level_and_follows_steps():
    p = predictor.Ewma(alpha=0.5)  # explicit: the default is 0.7
    assert p.predict() == 0.0
    for _ in range(20):
        p.observe(4.0)
    assert p.predict() == pytest.approx(4.0)
    p.observe(0.0)
    assert p.predict() == pytest.approx(2.0)


def test_ewma_rejects_bad_alpha():
    with pytest.raises(ValueError):
        predictor.Ewma(alpha=0.0)


def _days(ndays: int, slots: int, noise: float = 0.0, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    base = [5 + 5 * math.sin(2 * math.pi * i / slots) for i in range(slots)]
    return [max(0.0, base[i % slots] + rng.normal(0, noise)) for i in range(ndays * slots)]


def test_seasonal_anticipates_the_ramp():
    slots = 48
    day = [0.0] * 20 + [float(i) for i in range(1, 15)] + [14.0 - i for i in range(14)]
    assert len(day) == slots
    ew, se = predictor.Ewma(), predictor.Seasonal(bin_s=1.0, period_s=slots, k=1)
    for x in day * 2:
        ew.observe(x)
        se.observe(x)
    for x in day[:20]:           # day 3: the quiet night
        ew.observe(x)
        se.observe(x)
    # The ramp starts at the next bin: EWMA still says 0, seasonal already expects demand.
    assert ew.predict() == pytest.approx(0.0, abs=1e-6)
    assert se.predict() > 0.5


def test_measure_prefers_seasonal_on_daily_pattern_and_max_under_predicts_least():
    slots = 96
    series = _days(4, slots, noise=0.3, seed=1)
    ew = predictor.measure(predictor.Ewma(), series)
    se = predictor.measure(predictor.Seasonal(1.0, slots), series)
    mx = predictor.measure(predictor.make("max", 1.0, slots), series)
    assert se["mae"] < ew["mae"]
    assert mx["under"] <= min(ew["under"], se["under"])
    assert set(ew) == {"mae", "rmse", "under"}


def test_make_unknown():
    with pytest.raises(ValueError, match="unknown predictor"):
        predictor.make("oracle", 1.0, 10.0)
