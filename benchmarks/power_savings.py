#!/usr/bin/env python3
"""Energy per inference of our power manager vs the Linux governors and the offline optimum.

For each board profile (rk3588, x86-mini), trace kind (diurnal, steady, spiky) and seed, every
policy is swept over its tunables; per policy family the best configuration whose SLO-miss
fraction is within the budget (default 1%) is kept ("equal SLO misses"), and ratios are taken
against the same trace and seed. Medians over seeds are printed. Energy-vs-p99 Pareto curves
(seed 0) and a timeline of the diurnal trace are written as PNGs.

    .venv/bin/python benchmarks/power_savings.py [--seeds 3] [--miss-budget 0.01] [--out DIR]

Targets (issue 7): ours/ondemand <= 0.75 on the diurnal trace; ours/optimal <= 1.15.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

from appliance.power import predictor, sim
from appliance.power.plot import pareto, timeline
from appliance.power.profile import load_board_profile
from appliance.power.traces import generate, write_csv

SWEEPS = {
    "ondemand": [dict(sampling_rate_s=s, up_threshold=u) for s, u in itertools.product((0.01, 0.02, 0.04), (60, 80, 95))],
    "schedutil": [dict(rate_limit_s=r, margin=m) for r, m in itertools.product((0.002, 0.010), (1.0, 1.25, 1.5))],
    "ours": [dict(headroom=h, target_util=u) for h, u in itertools.product((0.3, 0.5, 0.7, 0.9), (0.5, 0.7, 0.9))],
    "performance": [{}],
    "powersave": [{}],
    "optimal": [{}],
}


# Kernel defaults: ondemand sampling_rate 10 ms (as the issue specifies) and up_threshold 80;
# schedutil rate_limit_us 2 ms (default since Linux 6.8; 10 ms before) and the 1.25 margin.
DEFAULTS = {"ondemand": dict(sampling_rate_s=0.01, up_threshold=80),
            "schedutil": dict(rate_limit_s=0.002, margin=1.25)}


def label(params: dict) -> str:
    short = {"sampling_rate_s": "sr", "up_threshold": "up", "rate_limit_s": "rl", "margin": "m",
             "headroom": "h", "target_util": "u"}
    return ",".join(f"{short.get(k, k)}={v:g}" for k, v in params.items())


def run_one(prof, tr, budget: float):
    """All configurations on one trace; best per family within the miss budget."""
    rows, best = [], {}
    for fam, grid in SWEEPS.items():
        for params in grid:
            r = sim.simulate(prof, tr, fam, params)
            s = r.summary()
            s["label"] = label(params)
            rows.append((fam, r, s))
            ok = r.miss_frac <= budget
            if params == DEFAULTS.get(fam):
                best[f"{fam}-default"] = (r, s)  # the kernel's defaults, whatever their misses
            cur = best.get(fam)
            if ok and (cur is None or r.energy_j < cur[0].energy_j):
                best[fam] = (r, s)
    return rows, best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--miss-budget", type=float, default=0.01)
    ap.add_argument("--boards", default="rk3588,x86-mini")
    ap.add_argument("--traces", default="diurnal,steady,spiky,office")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "power")
    ap.add_argument("--traces-dir", type=Path, default=Path(__file__).resolve().parent / "traces")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    a.traces_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    summary = {}
    print(f"miss budget {a.miss_budget:.1%}; medians over {a.seeds} seeds; ratio = energy/inference of ours "
          f"(best config within budget) / baseline (best config within budget)\n")
    hdr = (f"{'board':<9}{'trace':<9}{'ours mJ':>9}{'/ondemand':>10}{'/schedutil':>11}{'/optimal':>9}"
           f"{'/perf':>7}{'/od-dflt':>9}{'/su-dflt':>9}  {'ours p99':>8}{'od p99':>8}{'ours cfg':>14}  {'above-idle /od':>14}")
    print(hdr)
    for board in a.boards.split(","):
        prof = load_board_profile(board)
        for kind in a.traces.split(","):
            per_seed = []
            for seed in range(a.seeds):
                tr = generate(kind, seed=seed)
                if seed == 0 and board == a.boards.split(",")[0]:
                    write_csv(tr, a.traces_dir / f"{kind}-s0.csv")  # the shipped reference traces
                rows, best = run_one(prof, tr, a.miss_budget)
                per_seed.append(best)
                if seed == 0:
                    curves = {}
                    for fam, r, s in rows:
                        if fam in ("performance", "powersave") and r.miss_frac > a.miss_budget:
                            continue
                        curves.setdefault(fam, []).append((s["p99_ms"], s["energy_per_inference_mj"],
                                                           s["label"] if fam == "ours" else ""))
                    pareto(curves, a.out / f"pareto-{board}-{kind}.png",
                           f"{board} / {kind} (seed 0): energy per inference vs p99; SLO {1e3 * prof.service.slo_s:.0f} ms")
                    if kind in ("diurnal", "office"):
                        recs = [sim.simulate(prof, tr, fam.split("-")[0], best[fam][1]["params"], record=True)
                                                for fam in ("ours", "ondemand-default", "schedutil-default", "optimal")
                                if fam in best]
                        timeline(recs, a.out / f"timeline-{board}-{kind}.png",
                                 f"{board} / {kind} (seed 0): ours (best within {a.miss_budget:.0%} misses), "
                                 "ondemand + schedutil at kernel defaults, optimum")

            def ratio(fam):
                vals = [b["ours"][0].energy_j / b[fam][0].energy_j for b in per_seed if "ours" in b and fam in b]
                return statistics.median(vals) if vals else float("nan")

            def above_idle_ratio(fam):
                vals = []
                for b in per_seed:
                    if "ours" in b and fam in b:
                        o, f = b["ours"][0], b[fam][0]
                        vals.append((o.energy_j - o.static_floor_j) / (f.energy_j - f.static_floor_j))
                return statistics.median(vals) if vals else float("nan")

            ours_mj = statistics.median(1e3 * b["ours"][0].energy_per_inference_j for b in per_seed if "ours" in b)
            row = {fam: ratio(fam) for fam in ("ondemand", "schedutil", "optimal", "performance",
                                               "ondemand-default", "schedutil-default")}
            row["above_idle_vs_ondemand"] = above_idle_ratio("ondemand")
            row["ours_mj"] = ours_mj
            row["ours_p99_ms"] = statistics.median(b["ours"][1]["p99_ms"] for b in per_seed if "ours" in b)
            row["ondemand_p99_ms"] = statistics.median(b["ondemand"][1]["p99_ms"] for b in per_seed if "ondemand" in b)
            cfgs = [b["ours"][1]["label"] for b in per_seed if "ours" in b]
            row["ours_cfg"] = max(set(cfgs), key=cfgs.count) if cfgs else "-"
            row["miss_frac"] = {fam: statistics.median(b[fam][0].miss_frac for b in per_seed if fam in b)
                                for fam in ("ours", "ondemand", "schedutil", "optimal",
                                            "ondemand-default", "schedutil-default")}
            row["best"] = [{fam: v[1] for fam, v in b.items()} for b in per_seed]
            summary[f"{board}/{kind}"] = row
            print(f"{board:<9}{kind:<9}{ours_mj:>9.1f}{row['ondemand']:>10.3f}{row['schedutil']:>11.3f}"
                  f"{row['optimal']:>9.3f}{row['performance']:>7.3f}{row['ondemand-default']:>9.3f}"
                  f"{row['schedutil-default']:>9.3f}  {row['ours_p99_ms']:>8.1f}"
                  f"{row['ondemand_p99_ms']:>8.1f}{row['ours_cfg']:>14}  {row['above_idle_vs_ondemand']:>14.3f}")
            sys.stdout.flush()

    # Predictors, measured on the diurnal trace's 10 s arrival-rate series.
    # Six compressed days: a device runs for weeks, and the seasonal part needs a day to learn.
    print("\npredictor one-step error on the diurnal arrival rate (6 periods, 10 s bins, seeds median):")
    for name in ("ewma", "seasonal", "max"):
        maes, unders = [], []
        for seed in range(a.seeds):
            tr = generate("diurnal", seed=seed, duration_s=6 * 1800.0)
            import numpy as np
            counts = np.histogram(tr.arrivals, bins=np.arange(0, tr.duration + 10, 10.0))[0] / 10.0
            m = predictor.measure(predictor.make(name, 10.0, tr.period_s), list(counts))
            maes.append(m["mae"])
            unders.append(m["under"])
        print(f"  {name:<9} MAE {statistics.median(maes):.3f} req/s   under-predicts {statistics.median(unders):.1%} of bins")
    # What the predictor changes in the policy: office trace (quiet nights), x86-mini (suspends).
    print("\nours on x86-mini / office (6 periods) by predictor (seeds median):")
    x86 = load_board_profile("x86-mini")
    for name in ("ewma", "seasonal", "max"):
        res = [sim.simulate(x86, generate("office", seed=seed, duration_s=6 * 1800.0), "ours",
                            dict(predictor_name=name)) for seed in range(a.seeds)]
        print(f"  {name:<9} {statistics.median(1e3 * r.energy_per_inference_j for r in res):8.1f} mJ/inf  "
              f"misses {statistics.median(r.miss_frac for r in res):.3%}  "
              f"asleep {statistics.median(r.asleep_s for r in res):.0f} s")
    (a.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"\nPNGs and summary.json in {a.out}; {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
