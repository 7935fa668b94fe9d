"""The kernel interfaces the daemon touches, every path under a configurable root.

Tests point `sysfs_root`/`procfs_root` at a temporary tree; on the device they are /sys, /proc.
Reads and writes are plain file I/O (what cpufreq, hotplug, thermal and RTC sysfs expect).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import PowerError


@dataclass
class Sysfs:
    sysfs_root: Path = Path("/sys")
    procfs_root: Path = Path("/proc")

    # ---- paths
    def policy_dir(self, policy: str) -> Path:
        return self.sysfs_root / "devices/system/cpu/cpufreq" / policy

    def cpu_online(self, cpu: int) -> Path:
        return self.sysfs_root / f"devices/system/cpu/cpu{cpu}/online"

    def thermal_dir(self) -> Path:
        return self.sysfs_root / "class/thermal"

    def wakealarm(self) -> Path:
        return self.sysfs_root / "class/rtc/rtc0/wakealarm"

    def power_state(self) -> Path:
        return self.sysfs_root / "power/state"

    def proc_stat(self) -> Path:
        return self.procfs_root / "stat"

    # ---- access
    @staticmethod
    def read(path: Path) -> str:
        return path.read_text().strip()

    @staticmethod
    def write(path: Path, value: str | int) -> None:
        try:
            with open(path, "w") as f:
                f.write(f"{value}\n")
        except OSError as e:
            raise PowerError(f"{path}: cannot write {value!r}: {e.strerror}") from None

    def has_cpufreq(self, policy: str) -> bool:
        return (self.policy_dir(policy) / "scaling_governor").is_file()

    def policy_get(self, policy: str, attr: str) -> str:
        return self.read(self.policy_dir(policy) / attr)

    def policy_set(self, policy: str, attr: str, value) -> None:
        self.write(self.policy_dir(policy) / attr, value)

    def governors(self, policy: str) -> list[str]:
        p = self.policy_dir(policy) / "scaling_available_governors"
        return self.read(p).split() if p.is_file() else []

    def cpu_times(self) -> dict[int, tuple[int, int]]:
        """cpuN -> (busy jiffies, total jiffies) from /proc/stat."""
        out = {}
        try:
            text = self.proc_stat().read_text()
        except OSError as e:
            raise PowerError(f"{self.proc_stat()}: cannot read: {e.strerror}") from None
        for line in text.splitlines():
            if line.startswith("cpu") and line[3:4].isdigit():
                parts = line.split()
                vals = [int(x) for x in parts[1:]]
                total = sum(vals[:8])  # user nice system idle iowait irq softirq steal
                idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
                out[int(parts[0][3:])] = (total - idle, total)
        return out

    def temperatures(self, zone_types: tuple[str, ...] = ()) -> dict[str, float]:
        """zone type -> degrees C, for the zones named (all zones if none named)."""
        out = {}
        d = self.thermal_dir()
        if not d.is_dir():
            return out
        for z in sorted(d.glob("thermal_zone*")):
            try:
                typ = self.read(z / "type")
                if zone_types and typ not in zone_types:
                    continue
                out[typ] = int(self.read(z / "temp")) / 1000.0
            except (OSError, ValueError):
                continue  # a zone whose sensor fails to read is skipped, not fatal
        return out

    def is_online(self, cpu: int) -> bool:
        p = self.cpu_online(cpu)
        return not p.is_file() or self.read(p) == "1"  # cpu0 often has no `online` file

    def set_online(self, cpu: int, on: bool) -> None:
        self.write(self.cpu_online(cpu), "1" if on else "0")

    def arm_wake_on_lan(self) -> list[str]:
        """Enable device wakeup on physical NICs (what `ethtool -s IF wol g` needs on top: the
        NIC's magic-packet mode, which r8169/igc/e1000e default to when wakeup is enabled).
        Returns the interfaces armed."""
        armed = []
        for dev in sorted((self.sysfs_root / "class/net").glob("*")):
            w = dev / "device/power/wakeup"
            if w.is_file():
                self.write(w, "enabled")
                armed.append(dev.name)
        return armed

    def suspend_with_alarm(self, wake_epoch: int) -> None:
        """What `rtcwake -m mem -t EPOCH` does: clear, set the RTC alarm, write `mem`."""
        self.write(self.wakealarm(), 0)
        self.write(self.wakealarm(), int(wake_epoch))
        self.write(self.power_state(), "mem")


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
