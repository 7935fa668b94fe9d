"""Serial consoles on pyserial: a timestamped log, boot-stage recognition, wait/send steps,
and a U-Boot shell that recovers each command's exit status.

Split after labgrid's model: ``Console`` is the transport (bytes in, bytes out, log,
``expect``); ``UBootShell`` and ``BootStrategy`` know what a boot looks like and drive
the console through its states. Other commands (flash --via uboot-ums) use these.

Never lose the start of the output: pyserial's ``socket://`` handler calls
``reset_input_buffer()`` at the end of ``open()``, discarding whatever the target sent
between the TCP connect and that call. ``open_port`` uses a subclass that skips that
discard, and callers connect before the target starts (QEMU ``-chardev
socket,...,server=on,wait=on`` does not run the guest until the connection is accepted).
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import serial
from serial.urlhandler import protocol_socket

from .errors import ProvisionError

# What a boot looks like on the wire.
STAGES: dict[str, re.Pattern[bytes]] = {
    "uboot-banner": re.compile(rb"U-Boot \d{4}\.\d{2}"),
    "autoboot": re.compile(rb"Hit any key to stop autoboot:"),
    "uboot": re.compile(rb"(?m)^=> "),
    "kernel": re.compile(rb"Linux version \d+\.\d+\S*"),
    "login": re.compile(rb"(?m)^\S+ login: "),
    # appliance images announce themselves on the console when multi-user is up
    # (image area's appliance-ready.service; debug images have no login prompt)
    "ready": re.compile(rb"APPLIANCE-READY\b[^\r\n]*\r?\n"),  # the whole line
}


class _LosslessSocketSerial(protocol_socket.Serial):
    """socket:// without the input flush at the end of open()."""

    def open(self):
        real = self.reset_input_buffer
        self.reset_input_buffer = lambda: None  # type: ignore[method-assign]
        try:
            super().open()
        finally:
            self.reset_input_buffer = real  # type: ignore[method-assign]


def open_port(url: str, baudrate: int = 115200, timeout: float = 0.05):
    """A pyserial port for a device path, socket:// or rfc2217:// URL."""
    try:
        if url.startswith("socket://"):
            port = _LosslessSocketSerial(None, baudrate=baudrate, timeout=timeout)
            port.port = url
            port.open()
            return port
        if "://" not in url and not os.path.exists(url):
            raise ProvisionError(f"{url}: serial device not found")
        return serial.serial_for_url(url, baudrate=baudrate, timeout=timeout)
    except serial.SerialException as e:
        raise ProvisionError(f"{url}: cannot open console: {' '.join(str(e).split())}") from None
    except ValueError as e:
        raise ProvisionError(f"{url}: bad console URL: {e}") from None


class ConsoleTimeout(ProvisionError):
    pass


@dataclass
class Console:
    """Reads into a buffer, logs every line with a timestamp, and matches patterns."""

    url: str
    log_path: Path | None = None
    baudrate: int = 115200
    port: object = None
    buffer: bytearray = field(default_factory=bytearray)
    pos: int = 0  # everything before pos has been consumed by an expect()
    seen: dict[str, float] = field(default_factory=dict)  # stage -> seconds since open
    _t0: float = 0.0
    _log = None
    _partial: bytes = b""
    _partial_t: float | None = None

    def open(self) -> "Console":
        self._t0 = time.monotonic()
        if self.port is None:
            self.port = open_port(self.url, self.baudrate)
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "ab", buffering=0)
            self._log_line(f"# console {self.url} opened".encode(), time.monotonic())
        return self

    def __enter__(self) -> "Console":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._partial:
            self._log_line(self._partial, self._partial_t or time.monotonic())
            self._partial = b""
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.port is not None:
            try:
                self.port.close()
            except Exception:
                pass
            self.port = None

    # -- log ---------------------------------------------------------------
    def _log_line(self, line: bytes, t: float) -> None:
        if self._log is None:
            return
        wall = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")
        self._log.write(f"{wall} +{t - self._t0:9.3f} ".encode() + line.rstrip(b"\r") + b"\n")

    def _feed(self, data: bytes) -> None:
        now = time.monotonic()
        start = len(self.buffer)
        self.buffer += data
        # stage recognition looks at a window around the new data
        window = bytes(self.buffer[max(0, start - 256):])
        for name, pat in STAGES.items():
            if name not in self.seen and pat.search(window):
                self.seen[name] = now - self._t0
        if self._partial_t is None:
            self._partial_t = now
        chunk = self._partial + data
        *lines, self._partial = chunk.split(b"\n")
        for ln in lines:
            self._log_line(ln, self._partial_t)
            self._partial_t = now
        if not self._partial:
            self._partial_t = None

    # -- I/O ---------------------------------------------------------------
    def read_some(self) -> bytes:
        try:
            n = max(1, self.port.in_waiting)
            data = self.port.read(n)
        except serial.SerialException as e:
            raise ProvisionError(f"{self.url}: console lost: {' '.join(str(e).split())}") from None
        if data:
            self._feed(data)
        return data

    def send(self, text: str | bytes) -> None:
        data = text.encode() if isinstance(text, str) else text
        self.port.write(data)
        self.port.flush()

    def sendline(self, text: str) -> None:
        self.send(text + "\n")

    def expect(self, patterns: str | bytes | re.Pattern | Iterable, timeout: float = 30.0):
        """Wait until one of PATTERNS matches the unconsumed output; consume through it.

        Returns (index, match). Raises ConsoleTimeout naming the patterns and the tail."""
        if isinstance(patterns, (str, bytes, re.Pattern)):
            patterns = [patterns]
        pats = [p if isinstance(p, re.Pattern) else
                re.compile(p.encode() if isinstance(p, str) else p) for p in patterns]
        deadline = time.monotonic() + timeout
        while True:
            best = None
            for i, p in enumerate(pats):
                m = p.search(self.buffer, self.pos)
                if m and (best is None or m.start() < best[1].start()):
                    best = (i, m)
            if best:
                self.pos = best[1].end()
                return best
            if time.monotonic() > deadline:
                tail = bytes(self.buffer[-120:]).decode(errors="replace").replace("\r", "")
                tail = " | ".join(s for s in tail.split("\n") if s.strip())[-160:]
                want = " or ".join(p.pattern.decode(errors="replace") for p in pats)
                raise ConsoleTimeout(f"{self.url}: no {want!r} within {timeout:g} s; last output: {tail!r}")
            self.read_some()

    def wait_stage(self, stage: str, timeout: float = 120.0) -> float:
        """Wait until a boot stage ('uboot', 'kernel', 'login', ...) has been seen."""
        deadline = time.monotonic() + timeout
        while stage not in self.seen:
            if time.monotonic() > deadline:
                raise ConsoleTimeout(f"{self.url}: boot stage {stage!r} not seen within {timeout:g} s "
                                     f"(seen: {', '.join(self.seen) or 'nothing'})")
            self.read_some()
        return self.seen[stage]


@dataclass(frozen=True)
class Step:
    """'wait for EXPECT, then send SEND'; either may be empty."""

    expect: str | None = None
    send: str | None = None
    timeout: float = 30.0


def run_steps(con: Console, steps: Iterable[Step]) -> list[bytes]:
    out = []
    for st in steps:
        if st.expect:
            _, m = con.expect(st.expect, st.timeout)
            out.append(m.group(0))
        if st.send is not None:
            con.sendline(st.send)
    return out


@dataclass(frozen=True)
class CommandResult:
    command: str
    output: str
    status: int

    @property
    def ok(self) -> bool:
        return self.status == 0


class UBootShell:
    """U-Boot's hush shell on a Console: reach the prompt, run commands with exit status."""

    PROMPT = re.compile(rb"=> $|=> (?=\r?\n)|\n=> ")

    def __init__(self, con: Console, prompt_timeout: float = 60.0):
        self.con = con
        self.prompt_timeout = prompt_timeout
        self.at_prompt = False

    def interrupt_autoboot(self, timeout: float | None = None) -> None:
        """Wait for the autoboot countdown (by its text, not by timing) and stop it."""
        timeout = timeout or self.prompt_timeout
        deadline = time.monotonic() + timeout
        while True:
            seen = len(self.con.buffer)
            try:
                i, _ = self.con.expect([STAGES["autoboot"], self.PROMPT],
                                       min(5.0, max(0.1, deadline - time.monotonic())))
                break
            except ConsoleTimeout:
                if time.monotonic() >= deadline:
                    raise
                if len(self.con.buffer) == seen:
                    # silent line: the board may already sit at a prompt; Ctrl-C redraws it
                    self.con.send(b"\x03")
        if i == 0:
            # any key stops it; Ctrl-C also clears a half-typed line
            self.con.send(b"\x03")
        self.sync()

    def sync(self, timeout: float = 10.0) -> None:
        """Make sure we are at a fresh prompt: send a unique echo and wait for its output."""
        tag = "SYNC" + secrets.token_hex(4)
        deadline = time.monotonic() + self.prompt_timeout
        while True:
            self.con.sendline(f"echo {tag}")
            try:
                self.con.expect(re.compile(rb"(?m)^" + tag.encode() + rb"\r?$"), timeout)
                self.con.expect(self.PROMPT, timeout)
                self.at_prompt = True
                return
            except ConsoleTimeout:
                if time.monotonic() > deadline:
                    raise
                self.con.send(b"\x03")

    def run(self, command: str, timeout: float = 30.0) -> CommandResult:
        """Run COMMAND; return its output (between markers) and its exit status ($?)."""
        if not self.at_prompt:
            self.sync()
        tag = secrets.token_hex(4)
        begin, end = f"B{tag}", f"E{tag}"
        # markers must start a line in the output; the echoed command line starts with "=> "
        self.con.sendline(f"echo {begin}; {command}; echo {end}=$?")
        self.con.expect(re.compile(rb"(?m)^" + begin.encode() + rb"\r?\n"), timeout)
        start = self.con.pos
        _, m = self.con.expect(re.compile(rb"(?m)^" + end.encode() + rb"=(-?\d+)\r?$"), timeout)
        output = bytes(self.con.buffer[start:m.start()]).decode(errors="replace").replace("\r", "")
        self.con.expect(self.PROMPT, timeout)
        return CommandResult(command, output.rstrip("\n"), int(m.group(1)))

    def run_check(self, command: str, timeout: float = 30.0) -> str:
        res = self.run(command, timeout)
        if not res.ok:
            last = res.output.strip().splitlines()[-1:] or ["no output"]
            raise ProvisionError(f"{self.con.url}: U-Boot command {command!r} failed "
                                 f"(exit {res.status}): {last[0]}")
        return res.output

    def start(self, command: str) -> None:
        """Start a long-running command (ums, fastboot) without waiting for it to end."""
        if not self.at_prompt:
            self.sync()
        self.con.sendline(command)
        self.at_prompt = False

    def stop(self) -> None:
        """Ctrl-C a long-running command and get back to the prompt."""
        self.con.send(b"\x03")
        self.sync()


class BootStrategy:
    """Drive a board from power-on to a state: 'uboot' (shell), 'kernel', 'login', 'ready'."""

    def __init__(self, con: Console):
        self.con = con
        self.uboot = UBootShell(con)
        self.state = "unknown"

    def transition(self, state: str, timeout: float = 180.0) -> None:
        if state == "uboot":
            if self.state != "uboot":
                self.uboot.interrupt_autoboot(timeout)
        elif state in ("kernel", "login", "ready"):
            if self.state == "uboot":
                self.con.sendline("boot")
                self.uboot.at_prompt = False
            self.con.wait_stage(state, timeout)
        else:
            raise ProvisionError(f"unknown console state {state!r} (uboot, kernel, login, ready)")
        self.state = state


def run_console_cli(args) -> int:
    log = args.log or Path(f"console-{time.strftime('%Y%m%dT%H%M%S')}.log")
    with Console(args.url, log, args.baud) as con:
        strat = BootStrategy(con)
        for kind, value in args.steps_order:
            if kind == "expect":
                _, m = con.expect(value, args.timeout)
                print(f"matched: {m.group(0).decode(errors='replace').strip()}")
            elif kind == "send":
                con.sendline(value)
                # whatever was sent (e.g. `boot`) may have moved the board on
                strat.state = "unknown"
                strat.uboot.at_prompt = False
            elif kind == "uboot":
                strat.transition("uboot", args.timeout)
                res = strat.uboot.run(value, args.timeout)
                print(res.output)
                print(f"[exit {res.status}] {value}")
                if not res.ok:
                    raise ProvisionError(f"{args.url}: U-Boot command {value!r} exited {res.status}")
        if args.until:
            strat.transition(args.until, args.timeout)
            print(f"reached {args.until} after {con.seen.get(args.until, 0):.1f} s")
        if not args.steps_order and not args.until:
            # plain console: log until Ctrl-C
            print(f"logging {args.url} to {log}; Ctrl-C to stop")
            try:
                while True:
                    data = con.read_some()
                    if data:
                        os.write(1, data)
            except KeyboardInterrupt:
                pass
    return 0
