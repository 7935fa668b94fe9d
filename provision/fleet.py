"""`provision fleet apply|status`: configure devices over SSH, in parallel, resumably.

Shape: a bounded pool of worker threads (``--workers``), one fabric ``Connection`` per
device in flight. Each device runs the same ordered, idempotent steps; each step's state is
recorded in the inventory, so a re-run skips what is done and continues where a device
stopped. Every remote command has a deadline (``command_timeout``; Paramiko would otherwise
wait an hour for a vanished device), connection losses are retried with exponential backoff,
and a failing device never stops the others.

Steps (STEPS): ssh (wait for SSH, pin the host key), version (image manifest), identity
(hostname + device id files), keygen (device key pair in its token via `appliance-agent
store keygen`), host-cert / client-cert (ssh-keygen -s with the factory CA on the station),
model (package encrypted for the device's token key and watermarked with its id, install
with `appliance-agent store install`), selftest. "Enrolment" = keygen + certificates: a
device's key and certificates are issued once and reused on every later run.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Callable

from . import sshca
from .errors import ProvisionError
from .fleetconfig import Device, Fleet, load_fleet
from .inventory import Inventory, default_url
from .packaging import Packager

# Default pool size. One worker holds one device's connection while the device works
# (keygen, install, self-test: ~0.7 s per device on the loopback lab, seconds on real boards,
# 45 s on the emulated image), and the station spends ~0.06 CPU-s per device (measured,
# benchmarks/provision_fleet.py), mostly under the GIL. Workers = latency / station CPU keeps
# the station busy: ~12 for the fastest devices we have seen, more for slower ones; beyond
# that the station itself is the limit and more connections only wait. 32 covers devices up
# to ~2 s per device and bounds threads (two per connection: worker + Paramiko transport),
# memory and the burst of concurrent SSH handshakes.
DEFAULT_WORKERS = 32

STEPS = ["ssh", "version", "identity", "keygen", "host-cert", "client-cert", "model", "selftest"]
ALWAYS = {"ssh", "version"}  # cheap checks re-run every time (a re-flashed board shows here)



class Retryable(Exception):
    """The device or the link dropped: reconnect and try the step again."""


class StepFailed(ProvisionError):
    """The device answered, but wrongly: retrying will not help."""


def _pem_fingerprint(pem: str) -> str:
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_public_key(pem.encode())
    except ValueError:
        raise StepFailed(f"keygen did not print a PEM public key: {pem.strip()[:60]!r}") from None
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "SHA256:" + base64.b64encode(hashlib.sha256(der).digest()).decode().rstrip("=")


class DeviceRun:
    """Runs the steps for one device over one (re)connecting SSH session."""

    def __init__(self, fleet: Fleet, dev: Device, inv: Inventory, packager: Packager | None,
                 on_step: Callable[[str, str], None] | None = None):
        self.f = fleet.fleet
        self.fleet = fleet
        self.dev = dev
        self.inv = inv
        self.packager = packager
        self.conn = None
        self.log: list[str] = []
        self.attempt = 0  # retry number within this run of the current step
        self.on_step = on_step or (lambda serial, step: None)

    # -- transport ------------------------------------------------------------
    def note(self, msg: str) -> None:
        self.log.append(f"{time.strftime('%H:%M:%S')} {msg}")

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:
                pass
            self.conn = None

    def connect(self) -> None:
        """Wait for SSH: keep trying (with backoff) until ssh_wait runs out."""
        from fabric import Connection

        deadline = time.monotonic() + self.f.ssh_wait
        delay = max(0.1, self.f.backoff)
        ct = max(1, math.ceil(self.f.connect_timeout))
        while True:
            conn = Connection(self.dev.address, user=self.f.user, port=self.dev.port,
                              connect_timeout=ct,
                              connect_kwargs={"key_filename": [str(self.f.identity)],
                                              "look_for_keys": False, "allow_agent": False,
                                              "banner_timeout": ct, "auth_timeout": ct})
            try:
                conn.open()
                # Every step is a small request/response: without TCP_NODELAY, Nagle holds
                # back each command's last packet until the peer's delayed ACK (~40 ms per
                # command on loopback, measured; the same stall on a factory LAN).
                conn.client.get_transport().sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.conn = conn
                return
            except Exception as e:  # refused, reset, timeout, handshake: all mean "not yet"
                conn.close()
                reason = " ".join(str(e).split()) or type(e).__name__
                if "Authentication failed" in reason:
                    raise StepFailed(f"{self.where}: SSH authentication failed with {self.f.identity}")
                if time.monotonic() + delay > deadline:
                    raise Retryable(f"SSH not reachable within {self.f.ssh_wait:g} s: {reason}")
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    @property
    def where(self) -> str:
        return f"{self.dev.serial} ({self.dev.address}:{self.dev.port})"

    def run(self, cmd: str, ok_codes: tuple[int, ...] = (0,)) -> str:
        rc, out, err = self.call(cmd)
        out = out.decode(errors="replace")
        if rc not in ok_codes:
            lines = ([ln for ln in err.splitlines() if ln.strip()]  # the reason, if it gave one
                     or [ln for ln in out.splitlines() if ln.strip()])
            raise StepFailed(f"`{cmd[:100]}` exited {rc}: {lines[-1] if lines else 'no output'}")
        return out

    def call(self, cmd: str, stdin: bytes = b"") -> tuple[int, bytes, str]:
        """(exit status, stdout bytes, stderr text) of CMD; a lost link or a deadline is Retryable."""
        if self.conn is None:
            self.connect()
        try:
            rc, out, err = self._exec(cmd, stdin)
        except socket.timeout:
            raise Retryable(f"command timed out after {self.f.command_timeout:g} s: {cmd[:80]}") from None
        except (OSError, EOFError) as e:
            raise Retryable(f"connection lost: {type(e).__name__}: {e}") from None
        except Exception as e:
            if type(e).__module__.startswith("paramiko"):
                raise Retryable(f"connection lost: {type(e).__name__}: {e}") from None
            raise
        if rc == -1 or rc is None:  # the session died under the command
            raise Retryable(f"session lost during: {cmd[:80]}")
        return rc, out, err.decode(errors="replace")

    def _exec(self, cmd: str, stdin: bytes = b"") -> tuple[int, bytes, bytes]:
        """Run CMD in a new channel of the open connection: (exit status, stdout, stderr).

        Straight on the Paramiko channel of the fabric Connection, not `Connection.run`:
        invoke's runner starts three I/O threads per command and polls for the end in 10 ms
        sleeps, which cost ~50 ms per command here (measured: `cat` of a file 57 ms through
        it, 5 ms on the channel). The whole command, output included, must finish within
        command_timeout (socket.timeout otherwise). stdin gets STDIN, then EOF. stdout is read
        as it comes; stderr is buffered by Paramiko meanwhile (our commands write little)."""
        deadline = time.monotonic() + self.f.command_timeout
        left = lambda: max(0.01, deadline - time.monotonic())  # noqa: E731
        ch = self.conn.client.get_transport().open_session(timeout=self.f.command_timeout)
        try:
            ch.settimeout(left())
            ch.exec_command(cmd)
            if stdin:
                ch.sendall(stdin)
            ch.shutdown_write()
            def drain(recv) -> bytes:  # until EOF, each read within the command's deadline
                parts = []
                while True:
                    ch.settimeout(left())
                    b = recv(65536)
                    if not b:
                        return b"".join(parts)
                    parts.append(b)

            out, err = drain(ch.recv), drain(ch.recv_stderr)
            if not ch.status_event.wait(left()):
                raise socket.timeout("no exit status")
            return ch.exit_status, out, err
        finally:
            ch.close()

    def put(self, data: bytes, remote: str, mode: int = 0o644, atomic: bool = True) -> None:
        """Write a file on the device over SFTP: to a temp name in the same dir, then fsync and
        rename (atomic=False: straight to REMOTE, for a scratch file whose consumer checks it)."""
        if self.conn is None:
            self.connect()
        d = remote.rsplit("/", 1)[0] or "/"
        tmp = f"{remote}.tmp-provision" if atomic else remote
        try:
            sftp = self.conn.sftp()
            sftp.get_channel().settimeout(self.f.command_timeout)
            try:
                fh = sftp.open(tmp, "wb")
            except FileNotFoundError:  # first upload to this directory: one more round trip
                self.run(f"mkdir -p {shlex.quote(d)}")
                fh = sftp.open(tmp, "wb")
            with fh:
                fh.write(data)
                fh.flush()
            sftp.chmod(tmp, mode)
        except (OSError, EOFError) as e:
            raise Retryable(f"upload of {remote} failed: {type(e).__name__}: {e}") from None
        except Exception as e:
            if type(e).__module__.startswith("paramiko"):
                raise Retryable(f"upload of {remote} failed: {type(e).__name__}: {e}") from None
            raise
        if atomic:
            self.run(f"sync {shlex.quote(tmp)} 2>/dev/null || sync; mv -f {shlex.quote(tmp)} {shlex.quote(remote)}")

    def put_text(self, text: str, remote: str, then: str = "") -> str:
        """Atomic write of a one-line text file in ONE command, then THEN (a command whose
        failure fails the call, output discarded); returns what reads back."""
        q, tmp = shlex.quote(remote), shlex.quote(remote + ".tmp-provision")
        d = shlex.quote(remote.rsplit("/", 1)[0] or "/")
        after = f" && {{ {then}; }} >/dev/null" if then else ""
        return self.run(f"umask 022; mkdir -p {d} && printf '%s\\n' {shlex.quote(text)} > {tmp} && "
                        f"{{ sync {tmp} 2>/dev/null || true; }} && mv -f {tmp} {q}{after} && cat {q}")

    def read_many(self, *paths: str, prelude: str = "") -> list[str | None]:
        """Several small files in one round trip (None for a missing one), after PRELUDE (a
        command whose failure fails the call; its stdout is discarded)."""
        sep = "__PROVISION_SEP__"
        cmd = "; ".join(f"cat {shlex.quote(p)} 2>/dev/null || echo __MISSING__; echo {sep}" for p in paths)
        if prelude:
            cmd = f"{{ {prelude}; }} >/dev/null && {{ {cmd}; }}"
        parts = self.run(cmd).split(sep + "\n")
        return [None if part.strip() == "__MISSING__" else part for part in parts[:len(paths)]]

    def read(self, remote: str) -> str | None:
        out = self.run(f"cat {shlex.quote(remote)} 2>/dev/null || echo __MISSING__")
        return None if out.strip() == "__MISSING__" else out

    def agent(self, args: str) -> str:
        return self.run(f"{self.f.agent} store {args}")

    # -- steps ----------------------------------------------------------------
    def step_ssh(self, rec: dict) -> dict:
        self.close()
        self.connect()
        key = self.conn.client.get_transport().get_remote_server_key()
        fp = "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")
        if rec.get("host_key_fp") and rec["host_key_fp"] != fp:
            raise StepFailed(f"{self.where}: host key changed since enrolment (was {rec['host_key_fp']}, "
                             f"now {fp}); if the board was re-flashed, remove it from the inventory first")
        return {"host_key_fp": fp}, fp

    def step_version(self, rec: dict) -> tuple[dict, str]:
        path = self.dev.path(self.f.manifest_path)
        raw = self.read(path)
        if raw is None:
            raise StepFailed(f"{self.where}: no image manifest at {path}; is this an appliance image?")
        try:
            manifest = json.loads(raw)
            version = str(manifest["version"])
        except (ValueError, KeyError, TypeError):
            raise StepFailed(f"{self.where}: {path} is not a manifest with a 'version'") from None
        if self.f.image_version and version != self.f.image_version:
            raise StepFailed(f"{self.where}: image version {version}, fleet expects "
                             f"{self.f.image_version}; re-flash the board")
        return {"image_version": version}, version

    def step_identity(self, rec: dict) -> tuple[dict, str]:
        ident = self.f.identity_dir.rstrip("/")
        files = {self.dev.path(self.f.hostname_file): self.dev.hostname,
                 self.dev.path(f"{ident}/device-id"): self.dev.device_id,
                 self.dev.path(f"{ident}/serial"): self.dev.serial}
        script = ["set -e"]
        for path, value in files.items():
            q, tmp = shlex.quote(path), shlex.quote(path + ".tmp-provision")
            d = shlex.quote(path.rsplit("/", 1)[0])
            v = shlex.quote(value)
            # rewrite only when different: idempotent and keeps mtimes of settled devices
            script.append(f"if [ \"$(cat {q} 2>/dev/null)\" != {v} ]; then mkdir -p {d}; "
                          f"printf '%s\\n' {v} > {tmp}; sync {tmp} 2>/dev/null || true; mv -f {tmp} {q}; fi")
        self.run("; ".join(script))
        return {}, f"{self.dev.hostname} {self.dev.device_id}"

    def step_keygen(self, rec: dict) -> tuple[dict, str]:
        pem = self.agent("keygen" + (" --init-softhsm" if self.f.init_token else ""))
        fp = _pem_fingerprint(pem)
        if rec.get("device_key_fp") and rec["device_key_fp"] != fp:
            raise StepFailed(f"{self.where}: device key in the token changed since enrolment "
                             f"(was {rec['device_key_fp']}, now {fp}); token reset? refusing to re-enrol")
        if not rec.get("device_key_fp"):
            self.inv.event(self.dev.serial, "device-key", {"fp": fp})
        return {"device_pubkey": pem, "device_key_fp": fp}, fp

    def _cert(self, rec: dict, *, kind: str, pub_path: str, host: bool, prelude: str = "") -> tuple[dict, str]:
        cert_path = pub_path[: -len(".pub")] + "-cert.pub"
        pub, on_device = self.read_many(pub_path, cert_path, prelude=prelude)
        if pub is None:
            raise StepFailed(f"{self.where}: {pub_path} missing on the device")
        pub = sshca.check_public_key(pub, f"{self.where}: {pub_path}")
        key_fp = sshca.fingerprint(pub)
        if host and rec.get("host_key_fp") and key_fp != rec["host_key_fp"]:
            raise StepFailed(f"{self.where}: {pub_path} ({key_fp}) is not the key sshd presents "
                             f"({rec['host_key_fp']})")
        cert_col = f"{kind}_cert"
        cert = rec.get(cert_col)
        # reuse the certificate already issued for this very key: never enrol twice
        if cert and not self._cert_is_for(cert, pub):
            raise StepFailed(f"{self.where}: {pub_path} is not the key the recorded {kind} certificate "
                             f"was issued for; refusing to enrol the device a second time")
        if not cert:
            fmt = {"hostname": self.dev.hostname, "address": self.dev.address,
                   "serial": self.dev.serial, "device_id": self.dev.device_id}
            principals = [p.format(**fmt) for p in (self.fleet.ca.host_principals if host
                                                     else self.fleet.ca.user_principals)]
            cert, serial = sshca.sign(self.fleet.ca.key, pub, identity=f"{self.dev.serial}-{kind}",
                                      principals=principals, host=host, validity=self.fleet.ca.validity)
            # record before delivering: a crash after this reuses the same certificate
            self.inv.update(self.dev.serial, **{cert_col: cert, f"{kind}_cert_fp": sshca.fingerprint(cert)})
            self.inv.event(self.dev.serial, f"{kind}-cert-issued",
                           {"serial": serial, "principals": principals, "key_fp": key_fp})
        reload = self.f.host_cert_reload if host else ""
        if (on_device or "").strip() != cert:
            if self.put_text(cert, cert_path, then=reload).strip() != cert:
                raise Retryable(f"{cert_path} did not read back as written")
        elif reload:
            # every time the step runs, not only after a write: a retry after a dropped link
            # finds the certificate in place but sshd maybe not yet presenting it
            self.run(reload)
        return {cert_col: cert, f"{kind}_cert_fp": sshca.fingerprint(cert)}, sshca.fingerprint(cert)

    @staticmethod
    def _cert_is_for(cert: str, pub: str) -> bool:
        """Does CERT certify PUB? (ssh-keygen -L prints the certified key's fingerprint)"""
        with tempfile.NamedTemporaryFile("w", suffix="-cert.pub") as t:
            t.write(cert + "\n")
            t.flush()
            p = subprocess.run(["ssh-keygen", "-L", "-f", t.name], capture_output=True, text=True, timeout=30)
        want = sshca.fingerprint(pub)
        return p.returncode == 0 and any(ln.strip().startswith("Public key:") and ln.strip().endswith(want)
                                         for ln in p.stdout.splitlines())

    def step_host_cert(self, rec: dict) -> tuple[dict, str]:
        return self._cert(rec, kind="host", pub_path=self.dev.path(self.f.host_key), host=True)

    def step_client_cert(self, rec: dict) -> tuple[dict, str]:
        key = self.dev.path(self.f.client_key)
        q = shlex.quote(key)
        # the device makes its own client key; its private half never leaves it (made in the
        # same round trip that reads its public half)
        make = (f"test -s {q} || {{ mkdir -p $(dirname {q}) && "
                f"ssh-keygen -q -t ed25519 -N '' -C {shlex.quote(self.dev.serial)} -f {q}; }}")
        return self._cert(rec, kind="client", pub_path=key + ".pub", host=False, prelude=make)

    def _installed(self) -> dict | None:
        m = self.fleet.model
        try:
            items = json.loads(self.agent("list --json") or "[]")
        except ValueError:
            raise StepFailed(f"{self.where}: `store list --json` did not print JSON") from None
        for it in items:
            if it.get("name") == m.name and it.get("version") == m.version and it.get("status") == "ok":
                return it
        return None

    def step_model(self, rec: dict) -> tuple[dict, str]:
        m = self.fleet.model
        if m is None:
            return {}, "no model in the fleet file"
        # a first attempt cannot find our package installed; later ones ask the store first
        # (an install may have finished just before the link dropped)
        first = self.inv.steps(self.dev.serial).get("model", {}).get("attempts", 1) <= 1 and \
            self.attempt == 0 and not rec.get("package_sha256")
        have = None if first else self._installed()
        if have is not None:
            wm = have.get("watermark_id")
            return {"model_name": m.name, "model_version": m.version, "watermark_id": wm}, \
                f"{m.name} {m.version} watermark {wm or '-'} (already installed)"
        if not rec.get("device_pubkey"):
            raise StepFailed(f"{self.where}: no device key recorded; keygen must run first")
        pkg, info = self.packager.package(rec["device_pubkey"], self.dev.device_id)
        self.inv.event(self.dev.serial, "model-packaged",
                       {"version": m.version, "sha256": info["sha256"], "watermark_id": info["watermark_id"]})
        remote = self.dev.path(f"{self.f.upload_dir.rstrip('/')}/provision-{m.name}-{m.version}.pkg")
        # scratch file: `store install` verifies signature and GCM tags of what it reads
        self.put(pkg, remote, 0o600, atomic=False)
        q = shlex.quote(remote)
        said = self.run(f"{self.f.agent} store install {q}; rc=$?; rm -f {q}; exit $rc").strip()
        if f"installed {m.name} {m.version}" not in said:
            raise StepFailed(f"{self.where}: store install said {said[-100:]!r}, "
                             f"not 'installed {m.name} {m.version}'")
        wm = info["watermark_id"]
        return {"package_sha256": info["sha256"], "model_name": m.name, "model_version": m.version,
                "watermark_id": wm}, f"{m.name} {m.version} watermark {wm or '-'}"

    def step_selftest(self, rec: dict) -> tuple[dict, str]:
        out = []
        fmt = {"agent": self.f.agent, "serial": self.dev.serial, "hostname": self.dev.hostname,
               "root": self.dev.root, "device_id": self.dev.device_id,
               "model_name": self.fleet.model.name if self.fleet.model else "",
               "model_version": self.fleet.model.version if self.fleet.model else ""}
        for tmpl in self.f.selftest:
            if "{model_name}" in tmpl and not self.fleet.model:
                continue
            cmd = tmpl.format(**fmt)
            res = self.run(cmd).strip().splitlines()
            out.append(f"{cmd}: {res[-1] if res else 'ok'}")
        port = self.dev.runtime_port or self.f.runtime_port
        if port and self.fleet.model:
            out.append(self._predict(port))
        text = "; ".join(out) or "no self-test configured"
        return {"selftest": text[:1000]}, text

    def _http(self, port: int, method: str, path: str, body: bytes = b"",
              headers: dict | None = None) -> tuple[int, dict, bytes] | None:
        """One HTTP request made on the device to its 127.0.0.1:PORT; None if nothing listens."""
        from . import predict  # numpy: only for fleets with a prediction self-test

        rc, out, err = self.call(predict.http_command(port, method, path, len(body), headers,
                                                      timeout=self.f.command_timeout), stdin=body)
        if rc == predict.REFUSED:
            return None
        if rc != 0:
            why = [ln for ln in err.splitlines() if ln.strip()]
            raise StepFailed(f"{self.where}: HTTP {method} {path} on the device failed (exit {rc}"
                             f"{': ' + why[-1] if why else ''})")
        return predict.parse_http(out)

    def _predict(self, port: int) -> str:
        """The runtime on the device answers a prediction of the model delivered to it."""
        from . import predict

        m = self.fleet.model
        name = urllib.parse.quote(m.name, safe="")
        mine = self.packager.marked(self.dev.device_id)  # what this device was sent
        x, want = predict.expected_output(mine)
        deadline = time.monotonic() + self.f.predict_wait
        last = "nothing listening"
        while True:  # the runtime picks a new model up by hot reload (or the reload a self-test ran)
            r = self._http(port, "GET", f"/readyz/{name}")
            if r is not None:
                status, _, body = r
                try:
                    state = json.loads(body).get(m.name) or {}
                except (ValueError, AttributeError):
                    state = {}
                if status == 200 and state.get("version") == m.version:
                    break
                last = f"HTTP {status} {' '.join(body.decode(errors='replace').split())[:160]}"
            if time.monotonic() >= deadline:
                raise StepFailed(f"{self.where}: the runtime on 127.0.0.1:{port} does not serve {m.name} "
                                 f"{m.version} after {self.f.predict_wait:g} s ({last})")
            time.sleep(0.5)
        body = predict.encode_input(x)
        status, hdrs, answer = self._http(port, "POST", f"/v1/models/{name}:predict", body, {
            "Content-Type": "application/octet-stream", "X-Tensor-Shape": ",".join(map(str, x.shape))}) \
            or (0, {}, b"runtime stopped listening")
        if status != 200:
            raise StepFailed(f"{self.where}: runtime prediction of {m.name} answered HTTP {status}: "
                             f"{' '.join(answer.decode(errors='replace').split())[:160]}")
        got = predict.decode_output(hdrs, answer)
        served = hdrs.get("x-model-version")
        off = predict.mismatch(got, want)
        if served != m.version or off > 1:
            raise StepFailed(f"{self.where}: the runtime's prediction ({m.name} {served}, shape {list(got.shape)}) "
                             f"is not this device's model's ({m.version}, shape {list(want.shape)}): "
                             f"{off:.3g}x the tolerance off")
        # For the record: how far the answer of the unmarked model would have been.
        _, plain = predict.expected_output(self.packager.content)
        mark = predict.mismatch(plain, want)
        self.inv.event(self.dev.serial, "prediction", {
            "port": port, "version": served, "shape": list(got.shape),
            "off_vs_expected": off, "unmarked_off": mark})
        return (f"runtime prediction {m.name} {served} on 127.0.0.1:{port}: output {list(got.shape)} matches "
                f"this device's model ({off:.2g}x tolerance; the unmarked model's is {mark:.2g}x)")

    # -- driver ---------------------------------------------------------------
    def execute(self) -> None:
        serial = self.dev.serial
        for step in STEPS:
            if step not in ALWAYS and self.inv.step_state(serial, step) == "done":
                continue
            fn = getattr(self, "step_" + step.replace("-", "_"))
            self.inv.step_begin(serial, step)
            self.on_step(serial, step)
            delay = self.f.backoff
            for attempt in range(self.f.retries + 1):
                self.attempt = attempt
                try:
                    fields, detail = fn(self.inv.get(serial))
                    break
                except Retryable as e:
                    self.note(f"{step}: attempt {attempt + 1} failed: {e}")
                    self.close()
                    if attempt == self.f.retries:
                        self.inv.step_end(serial, step, "failed", str(e))
                        raise StepFailed(f"{step}: {e} (after {attempt + 1} attempts)") from None
                    time.sleep(delay)
                    delay *= 2
                except ProvisionError as e:
                    self.note(f"{step}: {e}")
                    self.inv.step_end(serial, step, "failed", str(e))
                    raise StepFailed(f"{step}: {e}") from None
            self.inv.update(serial, **fields)
            self.inv.step_end(serial, step, "done", detail)
            self.note(f"{step}: {detail}")


@dataclass
class Summary:
    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    workers: int = 0


def default_workers(fleet: Fleet, n_devices: int, override: int | None = None) -> int:
    """The pool size: --workers, else the fleet file's, else min(devices, DEFAULT_WORKERS)."""
    return max(1, override or fleet.fleet.workers or min(n_devices, DEFAULT_WORKERS))


def apply(fleet: Fleet, inv: Inventory, *, only: list[str] | None = None, workers: int | None = None,
          progress: Callable[[str, str, str], None] | None = None) -> Summary:
    """Provision every device (or ONLY); returns who finished and who failed with why."""
    devices = [d for d in fleet.device if not only or d.serial in only]
    unknown = set(only or []) - {d.serial for d in fleet.device}
    if unknown:
        raise ProvisionError(f"--only: {', '.join(sorted(unknown))} not in the fleet file")
    for d in devices:
        inv.ensure_device(d.serial, d.address, d.port, d.hostname, d.device_id)
    packager = Packager(fleet.model) if fleet.model else None
    cb = progress or (lambda serial, event, detail: None)
    summary = Summary()
    lock = threading.Lock()
    t0 = time.monotonic()

    def one(dev: Device) -> tuple[str, str | None]:
        run = DeviceRun(fleet, dev, inv, packager, on_step=lambda s, st: cb(s, "step", st))
        cb(dev.serial, "start", "")
        try:
            claimed = inv.claim(dev.serial)
        except ProvisionError as e:
            return dev.serial, str(e)
        if not claimed:  # another station sharing the inventory is on it right now
            return dev.serial, ("busy: another station sharing the inventory is provisioning it; "
                                "re-run apply once it is done")
        inv.start_run(dev.serial)
        try:
            run.execute()
            rec = inv.get(dev.serial)
            inv.update(dev.serial, state="done", step=None, error=None,
                       enrolled_at=rec.get("enrolled_at") or time.time())
            return dev.serial, None
        except ProvisionError as e:
            inv.update(dev.serial, state="failed", error=str(e))
            return dev.serial, str(e)
        except Exception as e:  # a bug must not take the other devices down with it
            reason = f"internal error: {type(e).__name__}: {' '.join(str(e).split())}"
            inv.update(dev.serial, state="failed", error=reason)
            return dev.serial, reason
        finally:
            run.close()
            try:
                inv.append_log(dev.serial, run.log)
                inv.release(dev.serial)
            except ProvisionError:
                pass

    summary.workers = default_workers(fleet, len(devices), workers)
    with ThreadPoolExecutor(max_workers=summary.workers,
                            thread_name_prefix="provision") as pool:
        futs = [pool.submit(one, d) for d in devices]
        for fut in as_completed(futs):
            serial, err = fut.result()
            with lock:
                if err is None:
                    summary.done.append(serial)
                    cb(serial, "done", "")
                else:
                    summary.failed[serial] = err
                    cb(serial, "failed", err)
    summary.seconds = time.monotonic() - t0
    return summary


# -- CLI -----------------------------------------------------------------------

def _overrides(args) -> dict:
    return {("ca", "key"): str(args.ca_key) if args.ca_key else None,
            ("fleet", "workers"): args.workers,
            ("model", "signing_key"): str(args.signing_key) if args.signing_key else None,
            ("model", "watermark_key"): str(args.watermark_key) if args.watermark_key else None}


def apply_cli(args) -> int:
    fleet = load_fleet(args.fleet_file, _overrides(args))
    inv = Inventory(args.inventory or default_url(args.fleet_file))
    n = len([d for d in fleet.device if not args.only or d.serial in args.only])
    use_rich = not args.no_progress and sys.stdout.isatty()
    if use_rich:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        counts = {"done": 0, "failed": 0, "running": 0}
        prog = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[status]}"), TimeElapsedColumn())
        task = prog.add_task(f"fleet {fleet.fleet.name}", total=n, status="")
        plock = threading.Lock()

        def cb(serial, event, detail):
            with plock:
                if event == "start":
                    counts["running"] += 1
                elif event in ("done", "failed"):
                    counts["running"] -= 1
                    counts[event] += 1
                    prog.advance(task)
                    if event == "failed":
                        prog.console.print(f"[red]{serial} failed:[/red] {detail}")
                prog.update(task, status=f"[green]{counts['done']} done[/green] "
                                          f"[red]{counts['failed']} failing[/red] "
                                          f"{counts['running']} in flight")
        with prog:
            summary = apply(fleet, inv, only=args.only, progress=cb)
    else:
        def cb(serial, event, detail):
            if event in ("done", "failed"):
                print(f"{serial}: {event}" + (f": {detail}" if detail else ""), flush=True)
        summary = apply(fleet, inv, only=args.only, progress=cb)
    print(f"fleet {fleet.fleet.name}: {len(summary.done)} done, {len(summary.failed)} failed "
          f"of {n} in {summary.seconds:.1f} s with {summary.workers} workers (inventory {inv.path})")
    for serial, reason in sorted(summary.failed.items()):
        print(f"  FAILED {serial}: {reason}")
    inv.close()
    if summary.failed:
        raise ProvisionError(f"{len(summary.failed)} of {n} devices failed (listed above); "
                             f"fix them and re-run apply: finished steps are skipped")
    return 0


def status_rows(inv: Inventory) -> list[dict]:
    rows = []
    for d in inv.devices():
        steps = inv.steps(d["serial"])
        rows.append({
            "serial": d["serial"], "address": f"{d['address']}:{d['port']}", "hostname": d["hostname"],
            "device_id": d["device_id"], "state": d["state"], "step": d["step"], "error": d["error"],
            "image_version": d["image_version"], "host_key_fp": d["host_key_fp"],
            "device_key_fp": d["device_key_fp"], "host_cert_fp": d["host_cert_fp"],
            "client_cert_fp": d["client_cert_fp"], "watermark_id": d["watermark_id"],
            "model": f"{d['model_name']} {d['model_version']}" if d["model_name"] else None,
            "selftest": d["selftest"], "runs": d["runs"], "enrolled_at": d["enrolled_at"],
            "steps": {s: steps[s]["state"] for s in STEPS if s in steps},
            "log_excerpt": d["log_excerpt"],
        })
    return rows


def status_cli(args) -> int:
    if args.inventory:
        url = args.inventory
    elif args.fleet_file:
        url = default_url(args.fleet_file)
    else:
        raise ProvisionError("fleet status: give FLEET.toml or --inventory URL")
    inv = Inventory(url, create=False)
    rows = status_rows(inv)
    inv.close()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console as RichConsole
    from rich.table import Table

    t = Table(title=f"inventory {inv.path}")
    for col in ("serial", "address", "hostname", "state", "image", "steps", "host cert", "watermark", "error"):
        t.add_column(col)
    for r in rows:
        done = sum(1 for s in r["steps"].values() if s == "done")
        t.add_row(r["serial"], r["address"], r["hostname"], r["state"], r["image_version"] or "-",
                  f"{done}/{len(STEPS)}", (r["host_cert_fp"] or "-")[:19], r["watermark_id"] or "-",
                  (r["error"] or "")[:80])
    RichConsole(width=200).print(t)
    return 0
