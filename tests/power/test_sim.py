"""Simulator: exact queue/energy arithmetic on hand-made traces, conservation on generated
traces, faithful governor rules, the YDS optimum as the floor, trace CSV handling, the CLI."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from appliance.power import sim
from appliance.power.cli import main as cli_main
from appliance.power.errors import PowerError
from appliance.power.model import domain_model
from appliance.power.optimal import yds_speeds
from appliance.power.profile import load_board_profile
from appliance.power.traces import Trace, generate, read_csv, write_csv


@pytest.fixture(scope="module")
def rk():
    return load_board_profile("rk3588")


@pytest.fixture(scope="module")
def x86():
    return load_board_profile("x86-mini")


def one(t: float, work: float = 1.0) -> Trace:
    return Trace(np.array([t]), np.array([work]), name="one")


def test_single_request_exact_latency_and_energy(rk):
    dm = domain_model(rk)
    svc = rk.service
    # Arrives after 5 s idle: pays the CPU_SLEEP exit (120 us), then c/f + m at fmin.
    r = sim.simulate(rk, one(5.0), "powersave")
    s = svc.cycles / dm.freqs[0] + svc.mem_s
    assert r.latencies[0] == pytest.approx(120e-6 + s, rel=1e-9)
    expect = 5.0 * (dm.base_w + dm.deep_w) + (120e-6 + s) * (dm.base_w + dm.active_w[0])
    assert r.energy_j == pytest.approx(expect, rel=1e-9)
    p = sim.simulate(rk, one(5.0), "performance")
    assert p.latencies[0] == pytest.approx(120e-6 + svc.cycles / dm.freqs[-1] + svc.mem_s, rel=1e-9)


class _SwitchOnce(sim.Governor):
    """Test governor: fmin, then fmax at the first scheduler tick."""

    def update(self, t, event, *a):
        return len(self.dm.freqs) - 1 if event == "tick" else None


def test_service_time_integrates_across_a_frequency_change(rk):
    dm = domain_model(rk)
    svc = rk.service
    t0 = 1.0  # on the 4 ms tick grid: the first tick is at 1.004
    r = sim.simulate(rk, one(t0), "x", governor=_SwitchOnce(dm))
    s_lo = svc.cycles / dm.freqs[0] + svc.mem_s
    s_hi = svc.cycles / dm.freqs[-1] + svc.mem_s
    ran_lo = 0.004 - 120e-6                       # progress at fmin until the tick
    remaining = 1 - ran_lo / s_lo
    expect = 0.004 + 40e-6 + remaining * s_hi     # + 40 us OPP transition with no progress
    assert r.latencies[0] == pytest.approx(expect, rel=1e-9)


@pytest.mark.parametrize("policy", ["ours", "ondemand", "schedutil", "performance", "powersave", "optimal"])
@pytest.mark.parametrize("kind", ["diurnal", "spiky", "office"])
def test_conservation(rk, policy, kind):
    tr = generate(kind, seed=3, duration_s=600.0, period_s=300.0)
    r = sim.simulate(rk, tr, policy)
    assert r.n == len(tr.arrivals) and not np.isnan(r.latencies).any()   # every request served
    assert r.work_served == pytest.approx(float(tr.work.sum()))
    dm = domain_model(rk)
    fastest = rk.service.cycles * tr.work / dm.freqs[-1] + rk.service.mem_s * tr.work
    assert (r.latencies >= fastest - 1e-12).all()                        # nobody beats fmax
    assert r.energy_j >= r.static_floor_j                                 # energy >= static floor
    assert r.energy_j <= r.duration_s * (dm.base_w + dm.active_w[-1]) + 1e-9
    busy_fmin = float(np.sum(rk.service.cycles * tr.work / dm.freqs[-1]))
    assert r.energy_j - r.static_floor_j >= busy_fmin * (dm.active_w[0] - dm.deep_w) * 0.99


def test_ondemand_rules(rk):
    dm = domain_model(rk)
    od = sim.Ondemand(dm, sampling_rate_s=0.010, up_threshold=80)
    assert od.update(0.005, "tick", True, True, 1, 0.005, 1) is None       # inside sampling period
    assert od.update(0.010, "tick", True, True, 1, 0.0095, 1) == len(dm.freqs) - 1  # 95% > 80
    # 50% load: fmin + 0.5*(fmax - fmin) = 1.8 GHz, closest OPP.
    assert dm.freqs[od.update(0.020, "tick", True, True, 1, 0.0145, 1)] == 1.8e9
    # After a long idle the previous load (50) is reused once, then the real (low) load.
    assert dm.freqs[od.update(1.0, "arrival", False, True, 1, 0.0145, 1)] == 1.8e9
    assert od.update(1.010, "tick", True, True, 1, 0.0146, 1) == 0


def test_schedutil_pelt_and_rate_limit(rk):
    dm = domain_model(rk)
    su = sim.Schedutil(dm, rate_limit_s=0.010, util_est=False)
    su.opp = len(dm.freqs) - 1
    # Running at fmax for one half-life (32 ms): util 0.5 -> 1.25*0.5*2.4 GHz = 1.5 -> 1.608 GHz.
    nxt = su.update(0.032, "tick", True, True, 1, 0.032, 1)
    assert su.util == pytest.approx(0.5)
    assert dm.freqs[nxt] == 1.608e9
    su.opp = nxt
    assert su.update(0.036, "tick", True, True, 1, 0.036, 1) is None       # within rate limit


def test_yds_speeds_by_hand():
    # One job: c / (D - m). Two jobs in one window: both at the combined density.
    s = yds_speeds(np.array([0.0]), np.array([0.1]), np.array([1e6]), np.array([0.02]))
    assert s[0] == pytest.approx(1e6 / 0.08)
    s = yds_speeds(np.array([0.0, 0.01]), np.array([0.1, 0.11]), np.array([1e6, 1e6]), np.array([0.0, 0.0]))
    assert s == pytest.approx([2e6 / 0.11, 2e6 / 0.11])
    # A light job after a heavy one: the heavy interval is peeled first, the light one is slower.
    s = yds_speeds(np.array([0.0, 0.05]), np.array([0.1, 1.05]), np.array([4e6, 1e6]), np.array([0.0, 0.0]))
    assert s[0] == pytest.approx(4e6 / 0.1) and s[1] == pytest.approx(1e6 / 0.95)


@pytest.mark.parametrize("board", ["rk3588", "x86-mini"])
def test_optimal_is_the_floor_and_meets_deadlines(board):
    prof = load_board_profile(board)
    tr = generate("diurnal", seed=5, duration_s=600.0, period_s=300.0)
    opt = sim.simulate(prof, tr, "optimal")
    assert opt.misses == 0
    compared = 0
    for p in ("ours", "ondemand", "schedutil", "performance", "powersave"):
        r = sim.simulate(prof, tr, p)
        # The optimum bounds runs that meet every deadline and keep the system up.
        if r.asleep_s == 0 and r.misses == 0:
            compared += 1
            assert opt.energy_j <= r.energy_j * (1 + 1e-9), p
    assert compared >= 2


def test_ours_saves_against_ondemand_and_holds_slo(rk):
    tr = generate("diurnal", seed=2, duration_s=900.0, period_s=450.0)
    ours = sim.simulate(rk, tr, "ours")
    od = sim.simulate(rk, tr, "ondemand")
    assert ours.energy_per_inference_j < 0.9 * od.energy_per_inference_j
    assert ours.miss_frac <= 0.01


def test_suspend_only_when_allowed_and_wake_costs_latency(x86, rk):
    # Two requests 1000 s apart: x86-mini may suspend (after its 60 s quiet period), rk3588 not.
    tr = Trace(np.array([10.0, 1010.0]), np.ones(2), period_s=86400.0)
    rx = sim.simulate(x86, tr, "ours")
    # Quiet from 10 s; suspended 70..670 (max_sleep 600 s RTC alarm), awake and quiet for
    # 60 s, suspended again 730..1010 when the second request wakes it (wake-on-LAN).
    assert rx.asleep_s == pytest.approx(600 + 280)
    assert rx.latencies[1] >= x86.idle_policy.resume_latency_s
    rr = sim.simulate(rk, tr, "ours")
    assert rr.asleep_s == 0


def test_office_trace_suspends_at_night_on_x86_only(x86, rk):
    tr = generate("office", seed=4, duration_s=1200.0, period_s=600.0)
    # ~1/3 of each period has no requests: quiet nights.
    gaps = np.diff(tr.arrivals)
    assert gaps.max() > 120
    rx, od = sim.simulate(x86, tr, "ours"), sim.simulate(x86, tr, "ondemand")
    assert rx.asleep_s > 100 and rx.energy_j < od.energy_j
    assert rx.miss_frac <= 0.02          # only requests that wake the box pay the resume
    assert sim.simulate(rk, tr, "ours").asleep_s == 0


@pytest.mark.parametrize("kind", ["diurnal", "steady", "spiky", "office"])
def test_shipped_traces_are_what_the_generator_makes(kind):
    shipped = read_csv(Path(__file__).resolve().parents[2] / "benchmarks/traces" / f"{kind}-s0.csv")
    fresh = generate(kind, seed=0)
    assert len(shipped.arrivals) == len(fresh.arrivals)
    assert np.allclose(shipped.arrivals, fresh.arrivals, atol=1e-6)
    assert np.allclose(shipped.work, fresh.work, atol=1e-4)
    assert shipped.period_s == fresh.period_s


def test_trace_generator_reproducible_and_csv_roundtrip(tmp_path):
    a = generate("diurnal", seed=7, duration_s=300.0, period_s=150.0)
    b = generate("diurnal", seed=7, duration_s=300.0, period_s=150.0)
    c = generate("diurnal", seed=8, duration_s=300.0, period_s=150.0)
    assert np.array_equal(a.arrivals, b.arrivals) and not np.array_equal(a.arrivals[:50], c.arrivals[:50])
    assert (np.diff(a.arrivals) >= 0).all()
    p = tmp_path / "t.csv"
    write_csv(a, p)
    back = read_csv(p)
    assert back.period_s == 150.0 and np.allclose(back.arrivals, a.arrivals, atol=1e-6)
    assert [x.name for x in tmp_path.iterdir()] == ["t.csv"]  # no temp file left behind


@pytest.mark.parametrize("body, msg", [
    ("arrival_s,work\n0.5,1\nabc,1\n", "line 3: arrival_s 'abc' is not a number"),
    ("arrival_s,work\n0.5,1\n0.7\n", "line 3: expected 2 column(s), got 1"),
    ("arrival_s,work\n0.5,0\n", "line 2: work must be > 0"),
    ("arrival_s,size\n0.5,1\n", "line 1: header must be"),
    ("# nothing\n", "no requests in the trace"),
    ("0.5\n0.2\n", "line 2: arrival_s 0.2 is before the previous one"),
])
def test_bad_csv_one_line_error(tmp_path, body, msg):
    p = tmp_path / "bad.csv"
    p.write_text(body)
    with pytest.raises(PowerError) as e:
        read_csv(p)
    assert str(e.value).startswith(f"{p}: ") and msg in str(e.value) and "\n" not in str(e.value)


def test_cli_simulate_plot_and_errors(tmp_path, capsys):
    p = tmp_path / "t.csv"
    write_csv(generate("steady", seed=1, duration_s=120.0), p)
    png = tmp_path / "out.png"
    assert cli_main(["simulate", "--board", "rk3588", "--trace", str(p), "--policy", "ours,ondemand,optimal",
                     "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "ondemand" in out and "optimal" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = tmp_path / "b.csv"
    bad.write_text("arrival_s\nx\n")
    assert cli_main(["simulate", "--board", "rk3588", "--trace", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"appliance-power: error: {bad}: line 2: arrival_s 'x' is not a number"
    assert cli_main(["simulate", "--board", "nope", "--trace", "steady"]) == 2
    assert "no power profile for board 'nope'" in capsys.readouterr().err
    assert cli_main(["simulate", "--board", "rk3588", "--trace", "steady", "--policy", "turbo"]) == 2
