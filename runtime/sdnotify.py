"""systemd notification protocol over a plain datagram socket (no python-systemd dependency)."""
from __future__ import annotations

import asyncio
import os
import socket


def notify(*lines: str) -> bool:
    """Send ``KEY=value`` lines to $NOTIFY_SOCKET; False when not run by systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):  # abstract namespace
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall("\n".join(lines).encode())
        return True
    except OSError:
        return False


def watchdog_interval() -> float | None:
    """Half of WATCHDOG_USEC in seconds, if the watchdog is meant for this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid.isdigit() and int(pid) != os.getpid()):
        return None
    try:
        return max(int(usec) / 2e6, 0.01)
    except ValueError:
        return None


def watchdog_task() -> asyncio.Task | None:
    """Pet the watchdog from the event loop: if the loop wedges, pings stop and systemd
    restarts the service."""
    interval = watchdog_interval()
    if interval is None:
        return None

    async def run():
        while True:
            notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    return asyncio.get_running_loop().create_task(run(), name="sd-watchdog")
