"""Boot an image in QEMU: command planning (pure) and a running machine with its console.

The console is a TCP chardev in server mode with wait=on: QEMU does not start the guest until
we are connected, so no early output is lost (pyserial's socket:// drops what arrived before
open()).
"""
from __future__ import annotations

import json
import re
import select
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .boards import Board, load_board
from .errors import BuildError

READY_MARKER = "APPLIANCE-READY"


@dataclass(frozen=True)
class BootPlan:
    argv: tuple[str, ...]
    console_port: int | None
    forwards: tuple[tuple[int, int], ...]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_manifest(image: Path) -> dict | None:
    for cand in (image.with_name(image.name.removesuffix(".img") + ".manifest.json"), image.with_name("manifest.json")):
        if cand.is_file():
            try:
                return json.loads(cand.read_text())
            except (OSError, json.JSONDecodeError):
                return None
    return None


def board_for_image(image: Path, board_name: str | None, boards_dir: Path | None = None) -> Board:
    if board_name is None:
        m = find_manifest(image)
        if m is None:
            raise BuildError(f"{image}: no manifest next to it; say which board it is with --board")
        board_name = m["board"]
    board = load_board(board_name, boards_dir)
    if board.qemu is None:
        raise BuildError(f"board {board.name!r} is real hardware with no QEMU model; flash it instead")
    return board


def plan_boot(board: Board, image: Path, *, console: str, forwards: list[tuple[int, int]] = (),
              snapshot: bool = True, vars_file: Path | None = None, memory_mib: int | None = None,
              drives: tuple[Path, ...] = (), reboot: bool = False) -> BootPlan:
    """console: 'stdio' (interactive) or 'tcp' (a waiting server socket on a free loopback port).
    drives: extra read-only disks (/dev/vdb, ...: a USB stick with an update, say). reboot: a guest
    reboot restarts the machine (A/B boot counting needs it) instead of ending QEMU."""
    q = board.qemu
    assert q is not None
    if shutil.which(q.system) is None:
        raise BuildError(f"{q.system} is not installed; run scripts/install-system-deps.sh")
    if not Path(q.firmware).is_file():
        raise BuildError(f"firmware {q.firmware} is missing (board {board.name}); run scripts/install-system-deps.sh")
    argv = [q.system, "-machine", q.machine, "-cpu", q.cpu, "-smp", str(q.smp),
            "-m", str(memory_mib or q.memory_mib), "-nodefaults", "-display", "none"]
    if not reboot:
        argv.append("-no-reboot")
    if board.boot == "uefi":
        argv += ["-drive", f"if=pflash,format=raw,readonly=on,file={q.firmware}"]
        if vars_file is not None:
            argv += ["-drive", f"if=pflash,format=raw,file={vars_file}"]
    else:
        argv += ["-bios", q.firmware]
    drive = f"if=none,id=hd0,format=raw,file={image}"
    if snapshot:
        drive += ",snapshot=on"
    argv += ["-drive", drive, "-device", "virtio-blk-pci,drive=hd0"]
    for i, extra in enumerate(drives, 1):
        argv += ["-drive", f"if=none,id=hd{i},format=raw,readonly=on,file={extra}",
                 "-device", f"virtio-blk-pci,drive=hd{i}"]
    hostfwd = "".join(f",hostfwd=tcp:127.0.0.1:{h}-:{g}" for h, g in forwards)
    argv += ["-netdev", f"user,id=n0{hostfwd}", "-device", "virtio-net-pci,netdev=n0"]
    argv += ["-device", "virtio-rng-pci"]
    port = None
    if console == "stdio":
        argv += ["-serial", "mon:stdio"]
    else:
        port = free_port()
        argv += ["-chardev", f"socket,id=con0,host=127.0.0.1,port={port},server=on,wait=on",
                 "-serial", "chardev:con0", "-monitor", "none"]
    return BootPlan(tuple(argv), port, tuple(forwards))


@dataclass
class Machine:
    """A running QEMU guest with its serial console (see `start`)."""

    proc: subprocess.Popen
    serial: object
    log_path: Path
    forwards: dict[int, int]
    _buf: str = ""
    _log: object = None
    _tmp: Path | None = None
    tee: object = None

    def _read(self, timeout: float) -> str:
        import serial

        try:
            # One recv per call, after our own wait: pyserial's socket read() loops over recv and,
            # when it meets EOF, raises and drops what it had already received in that call; the
            # last lines before QEMU exits (a panic, a reset) would never reach the log.
            ready, _, _ = select.select([self.serial.fileno()], [], [], timeout)
            data = b""
            if ready:
                self.serial.timeout = 0
                data = self.serial.read(4096)
        except serial.SerialException:
            # The console socket closes when QEMU exits (a guest panic with -no-reboot, say).
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            raise BuildError(f"QEMU exited (code {self.proc.returncode}) and closed the console; "
                             f"log: {self.log_path}") from None
        text = data.decode("utf-8", errors="replace") if data else ""
        if text:
            self._log.write(text)
            self._log.flush()
            if self.tee is not None:
                self.tee.write(text)
                self.tee.flush()
        return text

    def expect(self, pattern: str, timeout: float) -> re.Match:
        """Wait for a regex in the console output after the last match."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self._buf)
            if m:
                self._buf = self._buf[m.end():]
                return m
            exited = self.proc.poll() is not None
            left = deadline - time.monotonic()
            if left <= 0 and not exited:
                raise TimeoutError(f"no {pattern!r} on the console within {timeout:.0f} s; log: {self.log_path}")
            try:
                # Once QEMU has exited, what it wrote before is still in the socket: read it all
                # (up to EOF, which _read reports as BuildError) before giving up on the pattern.
                chunk = self._read(0.5 if exited else min(left, 0.5))
            except BuildError:
                chunk = None
            if chunk is None or (exited and not chunk):
                raise BuildError(f"QEMU exited (code {self.proc.returncode}) before {pattern!r}; log: {self.log_path}")
            self._buf = (self._buf + chunk)[-1_000_000:]

    def send(self, text: str) -> None:
        self.serial.write(text.encode())
        self.serial.flush()

    def run(self, command: str, timeout: float = 60) -> tuple[int, str]:
        """Run a shell command on the console's shell; returns (exit status, output)."""
        tag = uuid.uuid4().hex[:8]
        # The markers are assembled by the shell, so the echoed command line never matches them.
        self.send(f"echo B{tag}''B; {command}; echo E{tag}''E $?\n")
        self.expect(rf"B{tag}B\r?\n", timeout)
        m = self.expect(rf"(?s)(.*?)E{tag}E (\d+)\r?\n", timeout)
        return int(m.group(2)), m.group(1).replace("\r\n", "\n")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        try:
            self.serial.close()
        except Exception:
            pass
        if self._log:
            self._log.close()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> "Machine":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start(image: Path, *, board: Board | None = None, forwards: list = (), snapshot: bool = True,
          log_path: Path | None = None, tee=None, memory_mib: int | None = None, drives: tuple = (),
          reboot: bool = False) -> Machine:
    """Start QEMU on `image`. `forwards` items are guest TCP ports (exposed on free loopback
    ports, see Machine.forwards) or (host_port, guest_port) pairs."""
    # The console transport of the factory station: it keeps what the guest prints between the
    # TCP connect and the end of pyserial's open() (plain socket:// drops it).
    from appliance.provision.console import open_port
    from appliance.provision.errors import ProvisionError

    if not image.is_file():
        raise BuildError(f"{image}: no such image")
    board = board or board_for_image(image, None)
    tmp = Path(tempfile.mkdtemp(prefix="appliance-boot-"))
    vars_file = None
    if board.boot == "uefi" and board.qemu.firmware_vars:
        vars_file = tmp / "vars.fd"
        shutil.copy(board.qemu.firmware_vars, vars_file)
    fwd = [f if isinstance(f, tuple) else (free_port(), f) for f in forwards]
    plan = plan_boot(board, image, console="tcp", forwards=fwd, snapshot=snapshot, vars_file=vars_file,
                     memory_mib=memory_mib, drives=tuple(Path(d) for d in drives), reboot=reboot)
    log_path = log_path or tmp / "console.log"
    qlog = open(tmp / "qemu.stderr", "w")
    proc = subprocess.Popen(plan.argv, stdin=subprocess.DEVNULL, stdout=qlog, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    ser = None
    while ser is None:
        try:
            ser = open_port(f"socket://127.0.0.1:{plan.console_port}", timeout=0.5)
        except ProvisionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                err = (tmp / "qemu.stderr").read_text().strip()[-300:]
                raise BuildError(f"QEMU did not start: {err or 'no console socket'}") from None
            time.sleep(0.05)
    m = Machine(proc=proc, serial=ser, log_path=log_path, forwards={g: h for h, g in fwd}, tee=tee)
    m._log = open(log_path, "w")
    m._tmp = tmp  # removed by stop(), with the default log: pass log_path to keep a log
    return m
