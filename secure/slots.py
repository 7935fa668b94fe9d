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

import os
import re
import subprocess
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


@contextmanager
def mounted_boot(boot: str | os.PathLike = BOOT_PARTITION):
    """The boot partition, mounted privately for the duration (it is not mounted in normal
    operation, so nothing else writes to it). A directory is used as it is (tests)."""
    boot = Path(boot)
    if boot.is_dir():
        yield boot
        return
    if not boot.exists():
        raise SlotError(f"{boot}: no boot partition (is this an A/B image booted by U-Boot?)")
    base = Path("/run/appliance")
    base.mkdir(parents=True, exist_ok=True)
    mnt = Path(tempfile.mkdtemp(prefix="boot-", dir=base))
    r = subprocess.run(["mount", "-t", "vfat", "-o", "rw,nosuid,nodev,noexec,flush", str(boot), str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        mnt.rmdir()
        raise SlotError(f"mounting {boot} failed: {r.stderr.strip()[:200]}")
    try:
        yield mnt
    finally:
        os.sync()
        subprocess.run(["umount", str(mnt)], capture_output=True)
        try:
            mnt.rmdir()
        except OSError:
            pass
