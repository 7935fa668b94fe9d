"""Start QEMU with its serial console on a loopback socket that waits for us.

``-chardev socket,server=on,wait=on`` makes QEMU hold the guest until a client connects,
so a Console opened on it sees the very first byte of U-Boot's output. Used by the tests
and by a factory station that provisions virtual boards.
"""

from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from .console import Console
from .errors import ProvisionError

UBOOT_ARM64 = Path("/usr/lib/u-boot/qemu_arm64/u-boot.bin")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class QemuBoard:
    extra: list[str] = field(default_factory=list)
    bios: Path = UBOOT_ARM64
    memory: str = "256"
    port: int = 0
    proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        return ["qemu-system-aarch64", "-machine", "virt", "-cpu", "cortex-a72", "-m", self.memory,
                "-bios", str(self.bios), "-display", "none", "-monitor", "none", "-nic", "none",
                "-chardev", f"socket,id=c0,host=127.0.0.1,port={self.port},server=on,wait=on",
                "-serial", "chardev:c0", *self.extra]

    def start(self) -> str:
        """Start QEMU (held until the console connects); return the console URL."""
        if not self.bios.exists():
            raise ProvisionError(f"{self.bios}: U-Boot binary missing; install u-boot-qemu")
        self.port = self.port or free_port()
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ProvisionError(f"qemu exited: {self.proc.stderr.read().decode().strip()[-200:]}")
            # a probe connect would use up the one connection QEMU waits for: look, don't touch
            if _listening(self.port):
                return f"socket://127.0.0.1:{self.port}"
            time.sleep(0.05)
        raise ProvisionError(f"qemu did not listen on 127.0.0.1:{self.port} within 20 s")

    def console(self, log_path: Path | None = None) -> Console:
        return Console(f"socket://127.0.0.1:{self.port}", log_path).open()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _listening(port: int) -> bool:
    """Is something listening on 127.0.0.1:PORT? (read /proc/net/tcp; never connects)"""
    want = f"0100007F:{port:04X}"
    try:
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            f = line.split()
            if f[1] == want and f[3] == "0A":
                return True
    except OSError:
        pass
    return False
