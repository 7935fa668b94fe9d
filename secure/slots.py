"""A/B root slots: the boot state shared with the boot loader.

On U-Boot boards (UBootSlots) the state is `bootstate.env` on the boot partition (vfat), in U-Boot's `env export -t` text form:

    BOOT_ORDER=b a      slots by preference
    BOOT_a_LEFT=3       tries left before the boot script gives a slot up
    BOOT_b_LEFT=2

U-Boot takes one try from the first slot in BOOT_ORDER with tries left and writes the file back
before it starts that slot's kernel. Linux changes the file only through the pure transitions
below, written crash-safely (temp name, fsync, rename: on vfat the rename rewrites one directory
entry, so a power cut leaves the old state or the new one). Semantics follow RAUC's U-Boot
integration: a slot being written is taken out of BOOT_ORDER first, so a half-written slot is
never tried. On UEFI boards (SdBootSlots) systemd-boot's boot-counted entries play that role.
"""
from __future__ import annotations

import fcntl
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from .errors import SecureError
from .fsutil import atomic_write, fsync_dir

SLOTS = ("a", "b")
BOOT_TRIES = 3
STATE_FILE = "bootstate.env"
BOOT_PARTITION = "/dev/disk/by-partlabel/boot"
RUN_DIR = Path("/run/appliance")
# On tmpfs: a lock never outlives a boot, and the kernel drops it when its holder dies.
BOOT_LOCK = RUN_DIR / "boot.lock"


class SlotError(SecureError):
    """The boot state or the slot layout is not usable (one-line reason)."""


@dataclass(frozen=True)
class BootState:
    order: tuple[str, ...] = ("a", "b")
    left: dict = field(default_factory=lambda: {s: BOOT_TRIES for s in SLOTS})

    def tries(self, slot: str) -> int:
        return int(self.left.get(slot, 0))

    def next_slot(self) -> str | None:
        """The slot the boot script will try next (None: it refills every slot and resets)."""
        for s in self.order:
            if self.tries(s) > 0:
                return s
        return None


def other(slot: str) -> str:
    if slot not in SLOTS:
        raise SlotError(f"unknown slot {slot!r} (one of {', '.join(SLOTS)})")
    return SLOTS[1 - SLOTS.index(slot)]


def parse_state(text: str) -> BootState:
    """Read the file as the boot script does: unknown names ignored, a missing value defaults."""
    values: dict[str, str] = {}
    for line in text.replace("\0", "\n").splitlines():
        name, sep, value = line.partition("=")
        if sep:
            values[name.strip()] = value.strip()
    order = tuple(s for s in values.get("BOOT_ORDER", "a b").split() if s in SLOTS) or ("a", "b")
    left = {}
    for s in SLOTS:
        raw = values.get(f"BOOT_{s}_LEFT")
        try:
            # setexpr in the boot script writes hex without a prefix; tries stay below 10.
            left[s] = int(raw, 16) if raw is not None else BOOT_TRIES
        except ValueError:
            left[s] = BOOT_TRIES
    return BootState(order, left)


def format_state(state: BootState) -> str:
    return (f"BOOT_ORDER={' '.join(state.order)}\n"
            + "".join(f"BOOT_{s}_LEFT={state.tries(s):x}\n" for s in SLOTS))


def begin_install(state: BootState, target: str) -> BootState:
    """Before the first byte goes to `target`: never try it until it is complete."""
    other(target)
    return BootState(tuple(s for s in state.order if s != target), {**state.left, target: 0})


def activate(state: BootState, target: str) -> BootState:
    """`target` is complete and verified: try it first, with a full set of tries."""
    return BootState((target, other(target)), {**state.left, target: BOOT_TRIES})


def mark_good(state: BootState, booted: str) -> BootState:
    """The booted slot came up healthy: refill its tries (the order stays as it is)."""
    other(booted)
    order = state.order if booted in state.order else (*state.order, booted)
    return replace(state, order=order, left={**state.left, booted: BOOT_TRIES})


def read_state(boot_dir: Path) -> BootState:
    p = boot_dir / STATE_FILE
    try:
        return parse_state(p.read_text(errors="replace"))
    except FileNotFoundError:
        return BootState()


def write_state(boot_dir: Path, state: BootState) -> None:
    atomic_write(boot_dir / STATE_FILE, format_state(state).encode(), mode=0o644)


class UBootSlots:
    """U-Boot boards: boot.scr reads bootstate.env; each slot's kernel arguments are in
    <slot>/slot.env next to its kernel."""

    name = "u-boot"

    def __init__(self, boot: Path):
        self.boot = boot

    def state(self) -> BootState:
        return read_state(self.boot)

    def take_out(self, target: str) -> None:
        write_state(self.boot, begin_install(self.state(), target))

    def stage(self, staging: Path, target: str, entry: str) -> None:
        (staging / "slot.env").write_text(entry)

    def activate(self, target: str, entry: str) -> None:
        write_state(self.boot, activate(self.state(), target))

    def mark_good(self, booted: str) -> None:
        st = self.state()
        new = mark_good(st, booted)
        if new != st:
            write_state(self.boot, new)


_ENTRY = re.compile(r"^slot-([ab])(?:\+(\d+)(?:-(\d+))?)?\.conf$")


class SdBootSlots:
    """UEFI boards: systemd-boot's own boot counting (Boot Loader Specification). An entry
    `slot-b+3.conf` has 3 tries; systemd-boot renames it to `slot-b+2-1.conf` on each try and
    sorts entries with none left after the others; among the rest the highest `version` boots.
    A good slot's entry has no counter (`slot-a.conf`)."""

    name = "systemd-boot"

    def __init__(self, boot: Path):
        self.boot = boot
        self.entries = boot / "loader" / "entries"

    def _files(self, slot: str) -> list[tuple[Path, int | None]]:
        out = []
        for p in sorted(self.entries.glob(f"slot-{slot}*.conf")):
            m = _ENTRY.match(p.name)
            if m and m.group(1) == slot:
                out.append((p, int(m.group(2)) if m.group(2) is not None else None))
        return out

    def _version(self, path: Path) -> tuple:
        for line in path.read_text(errors="replace").splitlines():
            k, _, v = line.strip().partition(" ")
            if k == "version":
                return tuple(int(x) if x.isdigit() else 0 for x in re.split(r"[.\-+]", v.strip()))
        return ()

    def state(self) -> BootState:
        left, ranked = {}, []
        for s in SLOTS:
            files = self._files(s)
            if not files:
                left[s] = 0
                continue
            path, tries = files[0]
            left[s] = BOOT_TRIES if tries is None else tries
            ranked.append((left[s] == 0, tuple(-x for x in self._version(path)), s))
        return BootState(tuple(s for *_, s in sorted(ranked)), left)

    def take_out(self, target: str) -> None:
        for p, _ in self._files(target):
            p.unlink()
        fsync_dir(self.entries)

    def stage(self, staging: Path, target: str, entry: str) -> None:
        pass

    def activate(self, target: str, entry: str) -> None:
        self.take_out(target)
        atomic_write(self.entries / f"slot-{target}+{BOOT_TRIES}.conf", entry.encode(), mode=0o644)

    def mark_good(self, booted: str) -> None:
        for p, tries in self._files(booted):
            if tries is not None:
                os.rename(p, self.entries / f"slot-{booted}.conf")
                fsync_dir(self.entries)


def for_boot(boot: Path):
    """The slot backend of this boot partition."""
    if (boot / "loader" / "entries").is_dir():
        return SdBootSlots(boot)
    if (boot / "boot.scr").is_file() or (boot / STATE_FILE).is_file():
        return UBootSlots(boot)
    raise SlotError(f"{boot}: neither boot.scr nor loader/entries: not an A/B boot partition")


def booted_slot(cmdline: str) -> str | None:
    return cmdline_value(cmdline, "appliance.slot")


def cmdline_value(cmdline: str, key: str) -> str | None:
    for arg in cmdline.split():
        if arg.startswith(key + "="):
            return arg.split("=", 1)[1]
    return None


SALVAGED = re.compile(r"(?i)^FSCK\d{4}\.REC$")
# fsck.fat's lines that say what it changed (the rest is banner and progress).
_FSCK_NOISE = re.compile(r"^(fsck\.fat \d|/dev/|\S+: \d+ files, |Performing changes|Starting check|"
                         r"Checking |Reclaiming unconnected|Checking for unused|  Auto-|\s*$)")


def check_boot(boot: str | os.PathLike) -> str:
    """fsck.fat -a on the unmounted boot partition; returns what it repaired ('' if clean).

    A power cut while boot files are written leaves clusters allocated to no file (a rerun of
    the update then finds no room for the slot) or a damaged directory (the kernel remounts the
    partition read-only). U-Boot only reads it; every writer comes through mounted_boot, so
    repairing here, before each mount, is enough. fsck.fat -a salvages lost chains into
    FSCKnnnn.REC files in the root directory; mounted_boot deletes those (they are parts of a
    slot the update rewrites anyway, never the boot state, which is only ever renamed into place).
    """
    if _is_mounted(boot):
        return ""  # someone mounted it by hand: checking under a live mount would do harm
    fsck = shutil.which("fsck.fat")
    if fsck is None:
        # An image without dosfstools still updates as before; say so rather than fail the boot
        # blessing that runs through here.
        print(f"{boot}: fsck.fat missing (dosfstools not in the image): boot partition not checked",
              file=sys.stderr)
        return ""
    r = subprocess.run([fsck, "-a", "-w", str(boot)], capture_output=True, text=True)
    if r.returncode == 0:
        return ""
    # 1 means "errors found" (corrected, with -a) or an inconsistency it could not fix: a
    # read-only second pass tells the two apart.
    again = subprocess.run([fsck, "-n", str(boot)], capture_output=True, text=True)
    said = _fsck_said(r)
    if again.returncode != 0:
        # fsck.fat names the file on one line and the fault on the next: keep both.
        left = _fsck_said(again)
        why = ": ".join(left[:2] or said[:2]) or f"fsck.fat exit {r.returncode}"
        raise SlotError(f"{boot}: vfat boot partition damaged beyond repair by fsck.fat ({why[:160]}); "
                        "reflash the device")
    return "; ".join(dict.fromkeys(ln for ln in said if ln))[:400] or "dirty flag cleared"


def _fsck_said(proc: subprocess.CompletedProcess) -> list[str]:
    return [ln.strip() for ln in (proc.stdout + proc.stderr).splitlines() if not _FSCK_NOISE.match(ln)]


def _is_mounted(dev: str | os.PathLike) -> bool:
    st = os.stat(dev)
    if not stat.S_ISBLK(st.st_mode):  # an image file (tests)
        return False
    want = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[2] == want for line in f)


def drop_salvaged(root: Path) -> list[str]:
    """Delete the FSCKnnnn.REC files check_boot's fsck.fat left in the boot partition's root."""
    gone = sorted(p.name for p in root.iterdir() if SALVAGED.match(p.name) and p.is_file())
    for name in gone:
        (root / name).unlink()
    return gone


@contextmanager
def boot_lock(boot: str | os.PathLike, lock: Path = BOOT_LOCK):
    """Exclusive use of the boot partition among this device's processes.

    The boot-time mark-good service, `update status` and `update install` all fsck, mount and
    write the same partition; fsck.fat -a running while another process has it mounted and is
    renaming bootstate.env damages the directory beyond repair (found by the power-cut test).
    Waits as long as the holder needs: an install holds it for its whole root write.
    """
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"{boot}: waiting for another user of the boot partition (update install, status or "
                  "mark-good) to finish", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextmanager
def mounted_boot(boot: str | os.PathLike = BOOT_PARTITION, lock: Path = BOOT_LOCK):
    """The boot partition, checked and mounted privately for the duration, under boot_lock (it
    is not mounted in normal operation, so nothing else writes to it). A directory is used as
    it is (tests)."""
    boot = Path(boot)
    if boot.is_dir():
        yield boot
        return
    if not boot.exists():
        raise SlotError(f"{boot}: no boot partition (is this an A/B image booted by U-Boot?)")
    with boot_lock(boot, lock):
        with _mounted_boot(boot) as mnt:
            yield mnt


@contextmanager
def _mounted_boot(boot: Path):
    repaired = check_boot(boot)
    if repaired:
        print(f"{boot}: fsck.fat repaired the boot partition: {repaired}", file=sys.stderr)
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    mnt = Path(tempfile.mkdtemp(prefix="boot-", dir=RUN_DIR))
    r = subprocess.run(["mount", "-t", "vfat", "-o", "rw,nosuid,nodev,noexec,flush", str(boot), str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        mnt.rmdir()
        raise SlotError(f"mounting {boot} failed: {r.stderr.strip()[:200]}")
    try:
        drop_salvaged(mnt)
        yield mnt
    finally:
        os.sync()
        subprocess.run(["umount", str(mnt)], capture_output=True)
        try:
            mnt.rmdir()
        except OSError:
            pass
