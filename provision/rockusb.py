"""flash --via rockusb: Rockchip boards (RK3588) in maskrom mode through `rkdeveloptool`.

The tool is the user's (built from Rockchip's sources, not in Debian); we only drive it:
download the SPL loader (`db`), write the image (`wl 0`), read every mapped range of the
bmap back (`rl`) and compare it with the bmap's checksums, then reset (`rd`).
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

from . import bmap as bmapmod
from .errors import ProvisionError

SECTOR = 512


def _tool() -> str:
    exe = shutil.which("rkdeveloptool")
    if not exe:
        raise ProvisionError("rkdeveloptool not found in PATH; build it from "
                             "https://github.com/rockchip-linux/rkdeveloptool and retry")
    return exe


def _run(args: list[str], what: str, timeout: float = 600) -> str:
    try:
        p = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ProvisionError(f"rkdeveloptool {what} timed out after {timeout:g} s") from None
    out = (p.stdout + p.stderr).strip()
    # rkdeveloptool often exits 0 on failure; it prints "fail"/"failed" then
    if p.returncode != 0 or "fail" in out.lower():
        last = out.splitlines()[-1] if out else f"exit status {p.returncode}"
        raise ProvisionError(f"rkdeveloptool {what} failed: {last}")
    return out


def flash_rockusb(image: Path, *, bmap_path: Path | None = None, loader: Path | None = None,
                  yes: bool = False) -> None:
    exe = _tool()
    image = Path(image)
    if not image.is_file():
        raise ProvisionError(f"{image}: image not found")
    bm = bmapmod.load(bmapmod.find_for(image, bmap_path))
    if not yes:
        # rockusb cannot show us the board's partition table before writing: always ask
        raise ProvisionError("rockusb overwrites the board's storage from sector 0; pass --yes")
    listing = _run([exe, "ld"], "ld", 30)
    if "maskrom" not in listing.lower() and "loader" not in listing.lower():
        raise ProvisionError("no Rockchip device in maskrom/loader mode found by `rkdeveloptool ld`; "
                             "hold the maskrom button while powering the board")
    if "maskrom" in listing.lower():
        if loader is None:
            raise ProvisionError("board is in maskrom mode: pass --loader (the rk3588 SPL loader .bin)")
        if not Path(loader).is_file():
            raise ProvisionError(f"{loader}: loader file not found")
        _run([exe, "db", str(loader)], "db (download loader)", 60)
    _run([exe, "wl", "0", str(image)], "wl (write image)")
    with tempfile.TemporaryDirectory(prefix="rockusb-verify-") as td:
        for r in bm.ranges:
            if r.checksum is None:
                continue
            start = r.first * bm.block_size
            end = min((r.last + 1) * bm.block_size, bm.image_size)
            out = Path(td) / "range.bin"
            _run([exe, "rl", str(start // SECTOR), str((end - start + SECTOR - 1) // SECTOR), str(out)],
                 f"rl (read back blocks {r.first}-{r.last})")
            data = out.read_bytes()[: end - start]
            if hashlib.new(bm.checksum_type, data).hexdigest() != r.checksum:
                raise ProvisionError(f"rockusb: verification failed: blocks {r.first}-{r.last} read back "
                                     f"differ from the image; the board's storage is bad")
    _run([exe, "rd"], "rd (reset)", 30)
