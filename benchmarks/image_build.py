#!/usr/bin/env python3
"""Image build benchmark: cold build vs bare mmdebstrap, warm rebuild, size, boot time.

    .venv/bin/python benchmarks/image_build.py [--board qemu-arm64] [--runs 1] [--skip-cold]

Baselines, measured in the same run:
  * cold build (empty stage cache) / bare `mmdebstrap` of the same package list   (target <= 1.3)
  * warm rebuild after a template-only change                                      (target <= 10 s)
  * image size and bmap-mapped bytes                                               (target mapped <= 300 MB)
  * boot to the APPLIANCE-READY marker under QEMU (TCG)
A cold run for arm64 takes ~10-15 minutes per mmdebstrap under qemu-user; --skip-cold reuses
the user cache and reports only the warm numbers. The cold pair builds without the agent
bundle (its stages are cached separately); the warm builds include it.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed(fn):
    t0 = time.monotonic()
    out = fn()
    return time.monotonic() - t0, out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--board", default="qemu-arm64")
    ap.add_argument("--runs", type=int, default=1, help="repetitions of the cold pair and warm build")
    ap.add_argument("--skip-cold", action="store_true")
    ap.add_argument("--no-boot", action="store_true")
    args = ap.parse_args()

    from rich.console import Console

    from appliance.image.boot import READY_MARKER, start
    from appliance.image.build import build
    from appliance.image.config import make_config
    from appliance.image.rootfs import plan_rootfs

    quiet = Console(stderr=True, quiet=True)
    rows: list[tuple[str, str, str]] = []
    work = Path(tempfile.mkdtemp(prefix="bench-image-"))
    cold, bare = [], []
    if not args.skip_cold:
        for i in range(args.runs):
            cache = work / f"cache{i}"
            os.environ["APPLIANCE_CACHE_DIR"] = str(cache)
            # The OS image only: the agent bundle has its own cached stages and is not part of
            # what a bare mmdebstrap produces.
            cfg = make_config(args.board, out_dir=work / f"cold{i}", with_agent=False)
            dt, _ = timed(lambda: build(cfg, quiet))
            cold.append(dt)
            plan = plan_rootfs(cfg)
            argv = ["mmdebstrap", "--mode=root", "--variant=apt", f"--arch={plan.arch}", "--format=tar",
                    f"--include={','.join(plan.packages)}", plan.suite, str(work / f"bare{i}.tar"), plan.mirror]
            dt, r = timed(lambda: subprocess.run(argv, capture_output=True))
            if r.returncode != 0:
                print("bare mmdebstrap failed:", r.stderr.decode()[-500:], file=sys.stderr)
                return 1
            bare.append(dt)
            subprocess.run(["rm", "-rf", str(cache), str(work / f"bare{i}.tar")])
        os.environ.pop("APPLIANCE_CACHE_DIR")
        c, b = statistics.median(cold), statistics.median(bare)
        rows += [("cold build (median)", f"{c:.0f} s", ""), ("bare mmdebstrap (median)", f"{b:.0f} s", ""),
                 ("cold / bare", f"{c / b:.2f}", "target <= 1.3")]

    cfg = make_config(args.board, out_dir=work / "warm0")
    build(cfg, quiet)  # make sure the cache is warm
    warm = []
    for i in range(max(args.runs, 3)):
        ov = work / f"ov{i}/rootfs/etc"
        ov.mkdir(parents=True)
        (ov / "motd.j2").write_text(f"bench run {i}\n")
        cfg = make_config(args.board, out_dir=work / f"warm{i + 1}", templates_overlay=work / f"ov{i}")
        dt, res = timed(lambda: build(cfg, quiet))
        assert res.rootfs_cache_hit
        warm.append(dt)
    m = res.manifest_data["image"]
    rows += [("warm rebuild, template change (median)", f"{statistics.median(warm):.1f} s", "target <= 10 s"),
             ("image size", f"{m['bytes'] / 1e6:.0f} MB", ""),
             ("bmap mapped", f"{m['mapped_bytes'] / 1e6:.0f} MB", "target <= 300 MB")]
    if not args.no_boot and res.manifest_data["board"].startswith("qemu"):
        t0 = time.monotonic()
        with start(res.image) as vm:
            vm.expect(READY_MARKER, 900)
        rows.append(("boot to READY marker (TCG)", f"{time.monotonic() - t0:.0f} s", ""))
    subprocess.run(["rm", "-rf", str(work)])
    w = max(len(r[0]) for r in rows)
    print(f"image build benchmark, board {args.board}")
    for name, val, note in rows:
        print(f"  {name:<{w}}  {val:>10}  {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
