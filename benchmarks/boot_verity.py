#!/usr/bin/env python3
"""Boot time to ready with the dm-verity root vs the same image without it (issue 3).

    .venv/bin/python benchmarks/boot_verity.py [--board qemu-arm64] [--runs 3]

Builds (or reuses, through the stage cache) one image of the board without the agent, then boots
it `--runs` times as built and `--runs` times from a copy whose slot-a kernel arguments lack
`appliance.verity=` (the initramfs then mounts the erofs root directly, no dm-verity; the hash
tree after the filesystem is simply not read). Baseline: the copy without verity, same run.
Time = QEMU start to the APPLIANCE-READY marker on the serial console (TCG, so absolute numbers
are several times a real board's; the ratio is what matters).
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def boot_time(image: Path, board, log: Path) -> float:
    from appliance.image.boot import READY_MARKER, start

    t0 = time.monotonic()
    with start(image, board=board, log_path=log) as vm:
        vm.expect(READY_MARKER, 900)
        return time.monotonic() - t0


def strip_verity(image: Path, out: Path) -> None:
    """Copy the image and drop appliance.verity= from a/slot.env in its FAT boot partition."""
    from appliance.image.inspect import partitions, read_vfat_file

    subprocess.run(["cp", "--sparse=always", str(image), str(out)], check=True)
    env = read_vfat_file(out, "boot", "/a/slot.env").decode()
    new = re.sub(r" appliance\.verity=\S+", "", env)
    assert new != env, "slot.env has no appliance.verity="
    start = next(p["start"] for p in partitions(out) if p["name"] == "boot") * 512
    with tempfile.NamedTemporaryFile("w", suffix=".env") as f:
        f.write(new)
        f.flush()
        subprocess.run(["mcopy", "-o", "-i", f"{out}@@{start}", f.name, "::/a/slot.env"], check=True,
                       env={**os.environ, "MTOOLS_SKIP_CHECK": "1"})


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--board", default="qemu-arm64")
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    from appliance.image.build import build
    from appliance.image.config import make_config

    with tempfile.TemporaryDirectory(prefix="bench-verity-") as d:
        d = Path(d)
        os.environ.setdefault("XDG_CONFIG_HOME", str(d / "xdg"))
        cfg = make_config(a.board, profile="debug", out_dir=d / "out", with_agent=False)
        res = build(cfg)
        plain = d / "no-verity.img"
        strip_verity(res.image, plain)
        times = {"verity": [], "no verity": []}
        for i in range(a.runs):   # interleaved, so drift in machine load hits both alike
            times["verity"].append(boot_time(res.image, cfg.board, d / f"v{i}.log"))
            times["no verity"].append(boot_time(plain, cfg.board, d / f"n{i}.log"))
            assert "appliance-verity: " in (d / f"v{i}.log").read_text(errors="replace")
            assert "appliance-verity: " not in (d / f"n{i}.log").read_text(errors="replace")
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"\nboot to APPLIANCE-READY, {a.board}, TCG, {a.runs} runs each (median)")
        print(f"{'variant':<12} {'median s':>9}  runs")
        for k, v in times.items():
            print(f"{k:<12} {med[k]:>9.1f}  {', '.join(f'{x:.1f}' for x in v)}")
        print(f"ratio verity / no verity: {med['verity'] / med['no verity']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
