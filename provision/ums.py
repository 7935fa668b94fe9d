"""flash --via uboot-ums: over the serial console, stop U-Boot, export the board's storage
as a USB mass-storage device (`ums 0 mmc 0`), wait for the block device to appear on the
host, flash + read-back verify it like any card, then stop ums and reset the board."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

from .console import BootStrategy, Console
from .errors import ProvisionError
from .flash import FlashResult, flash


def _block_devices(sys_block: Path = Path("/sys/block")) -> set[str]:
    try:
        return {p.name for p in sys_block.iterdir()}
    except OSError:
        return set()


def wait_for_device(device: str | None, before: set[str], timeout: float) -> Path:
    """The given device path once it is a block device, or the one new /sys/block entry."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if device:
            try:
                if stat.S_ISBLK(os.stat(device).st_mode):
                    return Path(device)
            except OSError:
                pass
        else:
            new = sorted(_block_devices() - before)
            new = [n for n in new if not n.startswith(("loop", "ram", "zram", "dm-"))]
            if len(new) == 1:
                return Path("/dev") / new[0]
            if len(new) > 1:
                raise ProvisionError(f"several block devices appeared ({', '.join(new)}); "
                                     f"name the board's one with --to")
        time.sleep(0.2)
    what = device or "a new USB block device"
    raise ProvisionError(f"{what} did not appear within {timeout:g} s after U-Boot's ums started; "
                         f"check the USB cable (device port) and --ums-command")


def flash_ums(image: Path, *, console_url: str, device: str | None, bmap_path: Path | None,
              yes: bool, ums_command: str = "ums 0 mmc 0", log_path: Path | None = None,
              appear_timeout: float = 60.0, boot_timeout: float = 120.0) -> FlashResult:
    log_path = log_path or Path(f"ums-console-{time.strftime('%Y%m%dT%H%M%S')}.log")
    with Console(console_url, log_path) as con:
        strat = BootStrategy(con)
        strat.transition("uboot", boot_timeout)
        before = _block_devices()
        strat.uboot.start(ums_command)
        try:
            dev = wait_for_device(device, before, appear_timeout)
            res = flash(image, dev, bmap_path=bmap_path, yes=yes)
        finally:
            # stop ums whatever happened, so the board is left at a usable prompt
            strat.uboot.stop()
        strat.uboot.start("reset")
        # the board is back when the boot loader greets us again
        con.expect(r"U-Boot (SPL )?\d{4}\.\d{2}", 60)
    return res
