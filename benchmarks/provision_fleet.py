#!/usr/bin/env python3
"""Factory provisioning benchmarks (issue 6). A script a person runs; prints tables.

1. Fleet: wall time of `provision fleet apply` (a subprocess, as a station runs it) for 50
   devices vs 1 device, each on a freshly set-up lab of real sshd devices
   (appliance.provision.testlab: own host key, SoftHSM2 token, device root). Target <= 5x.
   Also the station's own CPU seconds (the apply process and its children, ssh-keygen) and
   the devices' (each lab sshd with every session under it: appliance-agent, SoftHSM2 RSA
   keygen, shells), because on this box the 50 "devices" share the station's cores, unlike a
   real fleet: their sum / cores is a floor for the 50-device wall time here.
2. Flash: `provision flash` (bmaptool copy of the mapped blocks + read-back verify) and
   `bmaptool copy` alone vs `dd` of the whole image (conv=fsync), same image, same run.

    .venv/bin/python benchmarks/provision_fleet.py [--devices 50] [--repeats 3] [--image-mib 256]
        [--image out/qemu-arm64/qemu-arm64.img]   # a real built image instead of a made one
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from appliance.provision.fleet import DEFAULT_WORKERS
from appliance.provision.testlab import DeviceLab
from appliance.runtime.tinymodels import fully_connected_f32

PY = sys.executable


def keys(base: Path) -> dict:
    subprocess.run([PY, "-m", "appliance.secure.cli", "vendor-key", str(base / "vendor.pem")], check=True,
                   capture_output=True)
    (base / "wm.key").write_bytes(os.urandom(32))
    (base / "model.tflite").write_bytes(fully_connected_f32(128, 64, seed=1))
    return {"file": str(base / "model.tflite"), "name": "detector", "version": "1.0.0",
            "boards": ["qemu-arm64"], "signing_key": str(base / "vendor.pem"),
            "watermark_key": str(base / "wm.key")}


def timed_apply(fleet_file: Path) -> tuple[float, float]:
    """(wall seconds, station CPU seconds incl. its children) of one `provision fleet apply`."""
    t0 = time.monotonic()
    p = subprocess.Popen([PY, "-m", "appliance.provision.cli", "fleet", "apply", str(fleet_file),
                          "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.monotonic() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"apply failed: {p.stderr.read().decode()[-300:]}")
    return wall, ru.ru_utime + ru.ru_stime


def fleet_bench(n: int, repeats: int, workers: int | None, base: Path) -> None:
    model = keys(base)
    vendor_pub = (base / "vendor.pem.pub").read_bytes()
    res: dict[int, list[tuple[float, float, float]]] = {1: [], n: []}
    load = []
    for r in range(repeats):
        for size in (1, n):  # interleaved so background load hits both alike
            d = base / f"lab-{size}-{r}"
            lab = DeviceLab(d, size, vendor_pub=vendor_pub).setup()
            lab.start_all()
            try:
                ff = lab.fleet_toml(d / "fleet.toml", model=model, workers=workers, connect_timeout=10,
                                    ssh_wait=30)
                c0 = sum(dv.cpu_seconds() for dv in lab.devices)
                wall, station = timed_apply(ff)
                time.sleep(0.5)  # let each sshd reap its finished sessions
                res[size].append((wall, station, sum(dv.cpu_seconds() for dv in lab.devices) - c0))
            finally:
                lab.stop_all()
            shutil.rmtree(d, ignore_errors=True)
            load.append(os.getloadavg()[0])
            w, c, dc = res[size][-1]
            print(f"  run {r + 1}/{repeats}: {size:3d} device(s) {w:6.2f} s wall, station CPU {c:5.2f} s, "
                  f"devices' CPU {dc:5.2f} s, load {load[-1]:.1f}", flush=True)
    med = {size: [statistics.median(x[k] for x in res[size]) for k in range(3)] for size in res}
    w1, (wn, cn, dn) = med[1][0], med[n]
    cores = os.cpu_count()
    print(f"\nFleet apply, {workers or f'default (min(devices, {DEFAULT_WORKERS}))'} workers, {repeats} runs each, medians (load average 1 min after "
          f"each run: {min(load):.1f}-{max(load):.1f} on {cores} cores)")
    print(f"{'devices':>8} {'wall s':>8} {'wall/dev s':>10} {'station CPU s':>14} {'/dev':>6} "
          f"{'devices CPU s':>14} {'/dev':>6}")
    for size, (w, c, dc) in ((1, med[1]), (n, med[n])):
        print(f"{size:>8} {w:8.2f} {w / size:10.2f} {c:14.2f} {c / size:6.3f} {dc:14.2f} {dc / size:6.3f}")
    print(f"ratio wall {n}/1 = {wn / w1:.1f}x (target <= 5x)")
    # The lab's devices run on the station's own cores: the n-device run cannot finish before
    # all of its CPU work (station + devices) has run on them.
    floor = (cn + dn) / cores
    print(f"CPU floor for {n} devices on this box: (station {cn:.1f} + devices {dn:.1f}) CPU-s / {cores} cores "
          f"= {floor:.1f} s -> ratio >= {floor / w1:.1f}x here; with the devices' work on their own "
          f"boards: station {cn / cores:.1f} s")


def make_image(d: Path, mib: int) -> Path:
    img = d / "bench.img"
    with open(img, "wb") as f:
        f.truncate(mib << 20)
    subprocess.run(["sfdisk", "-q", str(img)], input="label: gpt\n,64M,L\n,,L\n", text=True, check=True)
    rnd = os.urandom(1 << 20)
    with open(img, "r+b") as f:  # ~12% mapped, spread over both partitions like a real rootfs
        for off in range(1, mib, 8):
            f.seek(off << 20)
            f.write(rnd)
    subprocess.run(["bmaptool", "-q", "create", str(img), "-o", str(img) + ".bmap"], check=True)
    return img


def drop(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


def flash_bench(mib: int, repeats: int, base: Path, image: Path | None = None) -> None:
    img = image or make_image(base, mib)
    mib = img.stat().st_size >> 20
    target = base / "card.img"
    times: dict[str, list[float]] = {"dd whole image": [], "bmaptool copy": [], "provision flash": []}
    for _ in range(repeats):
        for name in times:
            if target.exists():
                target.unlink()
            with open(target, "wb") as f:
                f.truncate(mib << 20)
            drop(img)
            t0 = time.monotonic()
            if name == "dd whole image":
                subprocess.run(["dd", f"if={img}", f"of={target}", "bs=4M", "conv=fsync,notrunc",
                                "status=none"], check=True)
            elif name == "bmaptool copy":
                subprocess.run(["bmaptool", "-q", "copy", "--bmap", f"{img}.bmap", str(img), str(target)],
                               check=True)
            else:
                subprocess.run([PY, "-m", "appliance.provision.cli", "flash", str(img), "--to", str(target)],
                               check=True, stdout=subprocess.DEVNULL)
            times[name].append(time.monotonic() - t0)
    base_t = statistics.median(times["dd whole image"])
    from appliance.provision.bmap import load
    bm = load(Path(f"{img}.bmap"))
    print(f"\nFlash {img.name}: {mib} MiB image, {bm.mapped_bytes / bm.image_size:.0%} mapped, to a file "
          f"on disk, {repeats} runs each, medians")
    print(f"{'method':>18} {'median s':>9} {'vs dd':>7}")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"{name:>18} {m:9.2f} {m / base_t:6.2f}x")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=50)
    ap.add_argument("--workers", type=int, help="default: the fleet's own default, min(devices, 32)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--image-mib", type=int, default=256)
    ap.add_argument("--image", type=Path, help="flash this image (with IMAGE.bmap) instead of a made one")
    ap.add_argument("--skip-fleet", action="store_true")
    ap.add_argument("--skip-flash", action="store_true")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="provision-bench-", dir="/var/tmp") as td:
        if not a.skip_flash:
            flash_bench(a.image_mib, a.repeats, Path(td), a.image)
        if not a.skip_fleet:
            fleet_bench(a.devices, a.repeats, a.workers, Path(td))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
