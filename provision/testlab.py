"""A virtual fleet for testing a factory station: N real `sshd` "devices" on loopback.

Each device has its own host key, PidFile, device root directory (manifest.json,
board.json, vendor key, PIN file), its own SoftHSM2 token (own softhsm2.conf and token
directory) and its own sshd_config: key/certificate auth only, ``UsePAM no``, ``StrictModes
no`` (keys live under /tmp). The device's environment (where its token, store and files
are) is set by its sshd with ``SetEnv``, as a real device's would be by its image;
``SHLVL=1`` keeps bash from sourcing root's ~/.bashrc (pyenv adds ~170 ms per command).

Used by tests/provision and benchmarks/provision_fleet.py; not a stand-in for anything.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .qemu import _listening

SOFTHSM = "/usr/lib/softhsm/libsofthsm2.so"


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(p.name))
    out, todo = [], [pid]
    while todo:
        c = todo.pop()
        for k in children.get(c, []):
            out.append(k)
            todo.append(k)
    return out


@dataclass
class LabDevice:
    index: int
    serial: str
    port: int
    root: Path
    proc: subprocess.Popen | None = None
    env: dict = field(default_factory=dict)  # what its sshd gives every session (SetEnv)
    runtime: subprocess.Popen | None = None

    @property
    def config(self) -> Path:
        return self.root / "etc" / "ssh" / "sshd_config"

    def cpu_seconds(self) -> float:
        """CPU time of this device so far: its sshd plus every finished session under it
        (sshd reaps its per-connection children, so their time lands in its cutime/cstime)."""
        if self.proc is None:
            return 0.0
        try:
            stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        except OSError:
            return 0.0
        f = stat[stat.rindex(")") + 2:].split()
        return sum(int(x) for x in f[11:15]) / os.sysconf("SC_CLK_TCK")


@dataclass
class DeviceLab:
    base: Path
    n: int
    image_version: str = "1.0.0"
    board: str = "qemu-arm64"
    vendor_pub: bytes | None = None
    pin: str = "123456"
    devices: list[LabDevice] = field(default_factory=list)

    def setup(self) -> "DeviceLab":
        self.base.mkdir(parents=True, exist_ok=True)
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
        self.station_key = self.base / "station_ed25519"
        self.ca_key = self.base / "factory_ca"
        for key in (self.station_key, self.ca_key):
            if not key.exists():
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", key.name, "-f", str(key)],
                               check=True)
        auth = self.base / "authorized_keys"
        auth.write_text(Path(str(self.station_key) + ".pub").read_text())
        ports = _free_ports(self.n)
        for i in range(self.n):
            serial = f"SN{i:04d}"
            root = self.base / "devices" / serial
            dev = LabDevice(i, serial, ports[i], root)
            self._make_device(dev, auth)
            self.devices.append(dev)
        return self

    def _make_device(self, dev: LabDevice, auth: Path) -> None:
        r = dev.root
        for d in ("etc/ssh", "etc/appliance", "var/lib/appliance/models", "var/lib/softhsm/tokens", "var/tmp", "run"):
            (r / d).mkdir(parents=True, exist_ok=True)
        hk = r / "etc/ssh/ssh_host_ed25519_key"
        if not hk.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{dev.serial}-host",
                            "-f", str(hk)], check=True)
        (r / "etc/appliance/manifest.json").write_text(json.dumps({"version": self.image_version,
                                                                    "board": self.board}))
        (r / "etc/appliance/board.json").write_text(json.dumps({"name": self.board}))
        if self.vendor_pub is not None:
            (r / "etc/appliance/vendor-ed25519.pub").write_bytes(self.vendor_pub)
        (r / "etc/appliance/token.pin").write_text(self.pin + "\n")
        conf = r / "etc/softhsm2.conf"
        conf.write_text(f"directories.tokendir = {r}/var/lib/softhsm/tokens\nobjectstore.backend = file\n"
                        f"log.level = ERROR\n")
        if not any((r / "var/lib/softhsm/tokens").iterdir()):
            subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "appliance",
                            "--pin", self.pin, "--so-pin", "so-" + self.pin],
                           env={**os.environ, "SOFTHSM2_CONF": str(conf)}, check=True, capture_output=True)
        env = {
            "SHLVL": "1",
            "PATH": f"{Path(sys.executable).parent}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "SOFTHSM2_CONF": str(conf),
            "APPLIANCE_PKCS11_MODULE": SOFTHSM,
            "APPLIANCE_TOKEN_LABEL": "appliance",
            "APPLIANCE_PIN_FILE": f"{r}/etc/appliance/token.pin",
            "APPLIANCE_STORE_DIR": f"{r}/var/lib/appliance/models",
            "APPLIANCE_VENDOR_KEY": f"{r}/etc/appliance/vendor-ed25519.pub",
            "APPLIANCE_BOARD_FILE": f"{r}/etc/appliance/board.json",
        }
        dev.env = env
        dev.config.write_text("\n".join([
            f"Port {dev.port}", "ListenAddress 127.0.0.1", f"HostKey {hk}",
            f"HostCertificate {hk}-cert.pub" if (r / "etc/ssh/ssh_host_ed25519_key-cert.pub").exists() else "",
            f"PidFile {r}/run/sshd.pid", f"AuthorizedKeysFile {auth}",
            "UsePAM no", "StrictModes no", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password", "Subsystem sftp internal-sftp", "PrintMotd no",
            "MaxStartups 100", "LogLevel ERROR",
            "SetEnv " + " ".join(f"{k}={v}" for k, v in env.items()), ""]))

    def start(self, dev: LabDevice) -> None:
        log = open(dev.root / "run" / "sshd.log", "ab")
        dev.proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(dev.config)],
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        log.close()

    def start_runtime(self, dev: LabDevice, port: int, reload_s: float = 0.5) -> None:
        """The device's inference runtime (`appliance-agent runtime serve`) on 127.0.0.1:PORT,
        serving the device's secure store with its token, as the image's runtime unit does;
        it picks up newly installed models by its hot reload (every RELOAD_S)."""
        log = open(dev.root / "run" / "runtime.log", "ab")
        dev.runtime = subprocess.Popen(
            [str(Path(sys.executable).parent / "appliance-agent"), "runtime", "serve",
             "--store-dir", dev.env["APPLIANCE_STORE_DIR"], "--board-json", dev.env["APPLIANCE_BOARD_FILE"],
             "--host", "127.0.0.1", "--port", str(port), "--reload-interval-s", str(reload_s),
             "--num-threads", "1", "--no-affinity", "--log-level", "WARNING"],
            env={**os.environ, **dev.env}, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            start_new_session=True)
        log.close()

    def wait_listening(self, devs: list[LabDevice], timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        for d in devs:
            while not _listening(d.port):
                if d.proc.poll() is not None:
                    raise RuntimeError(f"sshd for {d.serial} exited: "
                                       f"{(d.root / 'run' / 'sshd.log').read_text()[-300:]}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"sshd for {d.serial} not listening on {d.port}")
                time.sleep(0.02)

    def start_all(self) -> None:
        for d in self.devices:
            self.start(d)
        self.wait_listening(self.devices)

    def kill(self, dev: LabDevice) -> None:
        """Power cut: the sshd, every session under it and the runtime die at once."""
        if dev.runtime is not None:
            dev.runtime.kill()
            dev.runtime.wait(10)
            dev.runtime = None
        if dev.proc is None:
            return
        pids = [dev.proc.pid] + descendants(dev.proc.pid)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        dev.proc.wait(10)
        dev.proc = None

    def stop_all(self) -> None:
        for d in self.devices:
            self.kill(d)

    def fleet_toml(self, path: Path, *, model: dict | None = None, agent: str | None = None,
                   **fleet_settings) -> Path:
        agent = agent or str(Path(sys.executable).parent / "appliance-agent")
        settings = {"name": "lab", "workers": 8, "identity": str(self.station_key), "agent": agent,
                    "image_version": self.image_version, "connect_timeout": 3, "command_timeout": 60,
                    "ssh_wait": 10, "retries": 2, "backoff": 0.3, **fleet_settings}
        lines = ["[fleet]"] + [f"{k} = {json.dumps(v)}" for k, v in settings.items() if v is not None]
        lines += ["", "[ca]", f"key = {json.dumps(str(self.ca_key))}"]
        if model:
            lines += ["", "[model]"] + [f"{k} = {json.dumps(v)}" for k, v in model.items()]
        for d in self.devices:
            lines += ["", "[[device]]", f'serial = "{d.serial}"', 'address = "127.0.0.1"',
                      f"port = {d.port}", f"root = {json.dumps(str(d.root))}"]
        path.write_text("\n".join(lines) + "\n")
        return path
