"""`appliance-power`: host tool for the power manager.

  appliance-power simulate --board rk3588 --trace FILE|diurnal|steady|spiky
                           --policy ours[,ondemand,...] [--param KEY=VALUE] [--plot OUT.png] [--json]
  appliance-power gen-trace diurnal|steady|spiky -o FILE [--seed N] [--duration S] [--period S]
  appliance-power show --board rk3588          (the validated profile, calibrated constants)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import PowerError

PROG = "appliance-power"


def _parse_params(items: list[str]) -> dict:
    out = {}
    for it in items:
        if "=" not in it:
            raise PowerError(f"--param {it!r}: expected KEY=VALUE (e.g. headroom=0.4)")
        k, v = it.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def _trace(arg: str, seed: int, duration: float | None):
    from . import traces
    if arg in traces.KINDS:
        return traces.generate(arg, seed=seed, duration_s=duration)
    return traces.read_csv(Path(arg))


def cmd_simulate(a) -> int:
    from . import sim
    from .profile import load_board_profile
    prof = load_board_profile(a.board, a.boards_dir)
    tr = _trace(a.trace, a.seed, a.duration)
    params = _parse_params(a.param)
    policies = [p.strip() for p in a.policy.split(",") if p.strip()]
    for p in policies:
        if p not in sim.POLICIES:
            raise PowerError(f"--policy {p!r}: unknown (one of: {', '.join(sim.POLICIES)})")
    results = []
    for p in policies:
        results.append(sim.simulate(prof, tr, p, params if p == "ours" or len(policies) == 1 else {},
                                    record=bool(a.plot)))
    if a.json:
        print(json.dumps([r.summary() for r in results], indent=2))
    else:
        print(f"board {prof.name}, trace {tr.name}: {len(tr.arrivals)} requests over {tr.duration:.0f} s, "
              f"SLO {1e3 * prof.service.slo_s:.0f} ms")
        print(f"{'policy':<12}{'mJ/inf':>10}{'W mean':>9}{'p50 ms':>9}{'p99 ms':>9}{'misses':>8}{'asleep s':>10}")
        for r in results:
            s = r.summary()
            print(f"{r.policy:<12}{s['energy_per_inference_mj']:>10.2f}{s['mean_power_w']:>9.3f}{s['p50_ms']:>9.1f}"
                  f"{s['p99_ms']:>9.1f}{s['slo_misses']:>8}{s['asleep_s']:>10.0f}")
    if a.plot:
        from .plot import timeline
        timeline(results, Path(a.plot), f"{prof.name} / {tr.name}")
        print(f"plot: {a.plot}", file=sys.stderr)
    return 0


def cmd_gen_trace(a) -> int:
    from . import traces
    tr = traces.generate(a.kind, seed=a.seed, duration_s=a.duration, period_s=a.period)
    traces.write_csv(tr, Path(a.output))
    print(f"{a.output}: {len(tr.arrivals)} requests over {tr.duration:.0f} s")
    return 0


def cmd_show(a) -> int:
    from .profile import load_board_profile
    p = load_board_profile(a.board, a.boards_dir)
    out = {"name": p.name, "observe_only": p.observe_only, "k_cal": p.k_cal, "platform_w": p.platform_w,
           "policies": {x.name: {"cpus": list(x.cpus), "mhz": [o.khz // 1000 for o in x.opps]} for x in p.policies}}
    print(json.dumps(out, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description="Power manager host tools: simulate policies on traces.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("simulate", help="replay a trace through the queue + power model")
    s.add_argument("--board", required=True)
    s.add_argument("--boards-dir", type=Path, default=None, help="default: $APPLIANCE_BOARDS_DIR or the repo's boards/")
    s.add_argument("--trace", required=True, help="CSV file (arrival_s[,work]) or a generator: diurnal, steady, spiky, office")
    s.add_argument("--policy", default="ours", help="ours|ondemand|schedutil|performance|powersave|optimal, comma list ok")
    s.add_argument("--param", action="append", default=[], help="policy tunable KEY=VALUE (repeatable); with several policies it applies to 'ours' only")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--duration", type=float, default=None)
    s.add_argument("--plot", default=None, help="write a PNG (frequency, queue, power over time)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_simulate)
    g = sub.add_parser("gen-trace", help="write a reproducible trace CSV")
    g.add_argument("kind", choices=["diurnal", "steady", "spiky", "office"])
    g.add_argument("-o", "--output", required=True)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--duration", type=float, default=None)
    g.add_argument("--period", type=float, default=1800.0, help="diurnal period in s (a compressed day)")
    g.set_defaults(func=cmd_gen_trace)
    h = sub.add_parser("show", help="print the validated, calibrated profile")
    h.add_argument("--board", required=True)
    h.add_argument("--boards-dir", type=Path, default=None)
    h.set_defaults(func=cmd_show)
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return a.func(a)
    except PowerError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{PROG}: error: {e.filename or ''}: {e.strerror}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
