"""e2e (issue 3, Access): who can get into the booted qemu-arm64 image, and what is in it.

The production image has no console shell: everything there is checked over SSH with a
certificate from the session's factory CA (tests/conftest.py `ssh_ca`, baked in with --ssh-ca).
One boot per image, shared by the tests of this module, plus one boot of a second copy of
the production image (host keys and machine-id must differ). The debug image's boot adds
QEMU's i6300esb watchdog to prove that PID 1 drives a hardware watchdog.

Costs (warm cache, TCG): two ~20 s builds, three boots of ~60-100 s each.
"""
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

from appliance.image.boot import READY_MARKER, start

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(3600)]

RUNTIME_PORT = 8500
PROBE_PORT = 9999   # a port the firewall must drop even with something listening on it


# -- SSH helpers ---------------------------------------------------------------------------

def make_key(path: Path, comment: str = "test") -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)], check=True)
    return path


def certify(ca_key: Path, key: Path, principals: str = "root", validity: str = "-5m:+1d") -> Path:
    subprocess.run(["ssh-keygen", "-q", "-s", str(ca_key), "-I", f"test-{key.name}", "-n", principals,
                    "-V", validity, str(key) + ".pub"], check=True, capture_output=True)
    return Path(str(key) + "-cert.pub")


TRANSPORT_ERRORS = ("kex_exchange_identification", "Connection closed", "Connection reset", "banner exchange")


def ssh(port: int, key: Path, cmd: str, *, cert: bool = True, extra=(), timeout: float = 120,
        penalty_wait: float = 180):
    """The system OpenSSH client; the user's ~/.ssh/config and agent play no part.

    OpenSSH 10 (trixie) has PerSourcePenalties on: after a few failed logins (the negative
    tests here) sshd drops new connections from that source (QEMU's 10.0.2.2 for every
    forwarded one) for a while. A connection dropped before authentication is retried."""
    argv = ["ssh", "-F", "/dev/null", "-p", str(port), "-i", str(key), "-o", "IdentitiesOnly=yes",
            "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "ConnectTimeout=20", "-o", "LogLevel=ERROR", "-o", "IdentityAgent=none",
            "-o", f"CertificateFile={key}-cert.pub" if cert else "CertificateFile=none", *extra,
            "root@127.0.0.1", cmd]
    deadline = time.monotonic() + penalty_wait
    while True:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if (r.returncode == 255 and "Permission denied" not in r.stderr and time.monotonic() < deadline
                and any(e in r.stderr for e in TRANSPORT_ERRORS)):
            time.sleep(3)
            continue
        return r


def wait_ssh(port: int, key: Path, timeout: float = 300) -> None:
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        r = ssh(port, key, "true", timeout=60)
        if r.returncode == 0:
            return
        last = r.stderr.strip()
        time.sleep(3)
    pytest.fail(f"no SSH login on port {port} within {timeout:.0f} s: {last}")


def host_key_fp(port: int, wait: float = 180) -> str:
    """Fingerprint of the ed25519 host key the guest's sshd presents (retried while sshd's
    per-source penalty drops the connection, see ssh())."""
    import paramiko

    deadline = time.monotonic() + wait
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
                t = paramiko.Transport(s)
                t.get_security_options().key_types = ["ssh-ed25519"]
                t.start_client(timeout=30)
                fp = t.get_remote_server_key().fingerprint
                t.close()
            return fp
        except (paramiko.SSHException, OSError, EOFError):
            if time.monotonic() > deadline:
                raise
            time.sleep(3)


def copy_image(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)
    return dst


# -- boots ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def client(ssh_ca, tmp_path_factory):
    """A station key with a CA certificate for root."""
    d = tmp_path_factory.mktemp("access-client")
    key = make_key(d / "station")
    certify(ssh_ca.key, key)
    return key


@pytest.fixture(scope="module")
def prod(qemu_arm64_production, client, tmp_path_factory):
    """Copy A of the production image, booted; SSH and the runtime port forwarded."""
    cfg, res = qemu_arm64_production
    d = tmp_path_factory.mktemp("prod-a")
    img = copy_image(res.image, d / "copy-a.img")
    t0 = time.monotonic()
    # snapshot off: the copy keeps what the guest writes, for the reboot test at the end
    with start(img, board=cfg.board, forwards=[22, RUNTIME_PORT, PROBE_PORT], snapshot=False,
               log_path=d / "console.log") as vm:
        vm.image = img
        vm.expect(READY_MARKER, 900)
        vm.ready_s = time.monotonic() - t0
        vm.port = vm.forwards[22]
        wait_ssh(vm.port, client)
        vm.ssh = lambda cmd, **kw: ssh(vm.port, client, cmd, **kw)
        yield vm


def test_production_console_has_no_shell(prod):
    """The serial console shows boot messages but gives nobody a prompt."""
    prod.send("\n\n")
    time.sleep(3)
    prod.send("echo CONSOLE''SHELL\n")
    with pytest.raises(TimeoutError):
        prod.expect(r"CONSOLESHELL", 10)
    r = prod.ssh("systemctl is-enabled serial-getty@ttyAMA0.service getty@tty1.service; pgrep -c agetty")
    assert r.stdout.split()[:2] == ["masked", "masked"], r.stdout
    assert r.stdout.split()[2] == "0", r.stdout


def test_password_and_keyboard_interactive_are_not_offered(prod, tmp_path):
    import paramiko

    with socket.create_connection(("127.0.0.1", prod.port), timeout=20) as s:
        t = paramiko.Transport(s)
        t.start_client(timeout=30)
        with pytest.raises(paramiko.BadAuthenticationType) as e:
            t.auth_none("root")
        assert e.value.allowed_types == ["publickey"]
        with pytest.raises(paramiko.BadAuthenticationType):
            t.auth_password("root", "root")
        t.close()
    # and the real client, asking only for password / keyboard-interactive
    key = make_key(tmp_path / "nokey")
    r = ssh(prod.port, key, "true", cert=False,
            extra=("-o", "PreferredAuthentications=password,keyboard-interactive", "-o", "PubkeyAuthentication=no"))
    assert r.returncode == 255 and "Permission denied (publickey)" in r.stderr, r.stderr


def test_only_ca_certificates_for_root_get_in(prod, ssh_ca, tmp_path, client):
    plain = make_key(tmp_path / "plain")                       # a key nobody signed
    r = ssh(prod.port, plain, "true", cert=False)
    assert r.returncode == 255 and "Permission denied" in r.stderr, r.stderr

    rogue_ca = make_key(tmp_path / "rogue-ca")                 # signed, by the wrong CA
    rogue = make_key(tmp_path / "rogue")
    certify(rogue_ca, rogue)
    r = ssh(prod.port, rogue, "true")
    assert r.returncode == 255 and "Permission denied" in r.stderr, r.stderr

    other = make_key(tmp_path / "other")                       # right CA, wrong principal
    certify(ssh_ca.key, other, principals="operator")
    r = ssh(prod.port, other, "true")
    assert r.returncode == 255 and "Permission denied" in r.stderr, r.stderr

    expired = make_key(tmp_path / "expired")                   # right CA, no longer valid
    certify(ssh_ca.key, expired, validity="20200101:20200102")
    r = ssh(prod.port, expired, "true")
    assert r.returncode == 255, r.stderr

    r = ssh(prod.port, client, "id -un; cat /etc/ssh/appliance-user-ca.pub")
    assert r.returncode == 0 and r.stdout.splitlines() == ["root", ssh_ca.pub.read_text().strip()], r.stdout
    r = prod.ssh("sshd -T 2>/dev/null | grep -Ei '^(authorizedkeysfile|passwordauthentication|permitrootlogin|"
                 "kbdinteractiveauthentication|trustedusercakeys|authenticationmethods) '")
    settings = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    assert settings == {"authorizedkeysfile": "none", "passwordauthentication": "no",
                        "permitrootlogin": "without-password", "kbdinteractiveauthentication": "no",
                        "trustedusercakeys": "/etc/ssh/appliance-user-ca.pub",
                        "authenticationmethods": "publickey"}, r.stdout


def test_no_passwords_anywhere(prod):
    r = prod.ssh("getent shadow | cut -d: -f1,2; getent passwd | cut -d: -f1,2")
    assert r.returncode == 0
    for line in r.stdout.splitlines():
        user, pw = line.split(":", 1)
        assert pw in ("*", "x") or pw.startswith("!"), f"{user} has a usable password field {pw[:4]}..."


def test_only_ssh_and_runtime_ports_listen(prod):
    # the runtime binds once its models are loaded, which can trail READY under TCG
    deadline = time.monotonic() + 300
    while True:
        r = prod.ssh("ss -Hlnt")
        ports = {int(re.search(r":(\d+)$", line.split()[3]).group(1)) for line in r.stdout.splitlines()}
        if RUNTIME_PORT in ports or time.monotonic() > deadline:
            break
        time.sleep(5)
    assert ports == {22, RUNTIME_PORT}, r.stdout


def test_firewall_drops_everything_else(prod):
    r = prod.ssh("systemctl is-active nftables.service; nft list chain inet appliance input")
    assert r.stdout.startswith("active"), r.stdout
    assert "policy drop;" in r.stdout and "tcp dport 22 accept" in r.stdout, r.stdout
    assert f"tcp dport {RUNTIME_PORT} accept" in r.stdout, r.stdout
    # Something listens on PROBE_PORT inside the guest (a second sshd), yet from outside
    # nothing answers: the firewall drops the SYN (QEMU's user network accepts the host side,
    # then never gets a guest connection, so no banner arrives).
    r = prod.ssh(f"/usr/sbin/sshd -p {PROBE_PORT} -o PidFile=/run/probe-sshd.pid && sleep 1 && ss -Hlnt")
    assert f":{PROBE_PORT} " in r.stdout, r.stdout + r.stderr

    def banner(port, wait=15.0):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
                s.settimeout(wait)
                return s.recv(64)
        except OSError:
            return b""
    try:
        assert banner(prod.forwards[22]).startswith(b"SSH-2.0")
        assert banner(prod.forwards[PROBE_PORT]) == b""
        r = prod.ssh("nft list chain inet appliance input >/dev/null; "
                     f"timeout 5 bash -c 'exec 3<>/dev/tcp/127.0.0.1/{PROBE_PORT}; head -c 7 <&3'")
        assert r.stdout == "SSH-2.0", "the probe sshd itself works from inside: " + r.stdout + r.stderr
    finally:
        prod.ssh("kill $(cat /run/probe-sshd.pid)")


def test_no_package_manager_and_no_compiler(prod, qemu_arm64_production):
    r = prod.ssh("for p in /usr/bin/apt /usr/bin/apt-get /usr/bin/dpkg /usr/bin/dpkg-query /var/lib/dpkg "
                 "/var/lib/apt /var/cache/apt /etc/apt /usr/lib/apt; do test -e $p && echo PRESENT $p; done; "
                 "for c in gcc cc c++ g++ cpp as ld ld.bfd ld.gold clang tcc; do command -v $c; done; "
                 "ls /usr/bin | grep -E -- '-(gcc|g\\+\\+|as|ld)(-[0-9.]+)?$'; "
                 "systemctl list-timers --all --no-legend | grep -E 'apt|dpkg'; echo END")
    assert r.stdout.strip() == "END", f"left in the production image:\n{r.stdout}"
    # the SBOM was taken before the tools went: it still lists them
    names = {p["name"] for p in qemu_arm64_production[1].manifest_data["packages"]}
    assert {"dpkg", "apt"} <= names


def test_watchdogs_and_failed_units(prod):
    r = prod.ssh("systemctl show -p RuntimeWatchdogUSec -p RebootWatchdogUSec --value; "
                 "systemctl show appliance-runtime.service -p WatchdogUSec -p NotifyAccess -p Type --value; "
                 "systemctl is-system-running --wait; systemctl --failed --no-legend")
    lines = r.stdout.split("\n")
    assert lines[:2] == ["30s", "2min"], r.stdout
    assert lines[2:5] == ["notify", "main", "30s"], r.stdout
    assert lines[5] == "running", r.stdout


def test_machine_id_is_kept_on_data(prod):
    r = prod.ssh("cat /etc/machine-id /data/etc/machine-id; findmnt -no TARGET /etc/machine-id")
    live, saved = r.stdout.split()[:2]
    assert re.fullmatch(r"[0-9a-f]{32}", live) and saved == live, r.stdout


def test_two_copies_of_one_image_differ(prod, qemu_arm64_production, client, tmp_path):
    cfg, res = qemu_arm64_production
    a_fp = host_key_fp(prod.port)
    a_id = prod.ssh("cat /etc/machine-id").stdout.strip()
    a_keys = prod.ssh("cat /data/ssh/etc/ssh/*.pub").stdout
    img = copy_image(res.image, tmp_path / "copy-b.img")
    with start(img, board=cfg.board, forwards=[22], log_path=tmp_path / "console-b.log") as vm:
        vm.expect(READY_MARKER, 900)
        port = vm.forwards[22]
        wait_ssh(port, client)
        b_fp = host_key_fp(port)
        b_id = ssh(port, client, "cat /etc/machine-id").stdout.strip()
        b_keys = ssh(port, client, "cat /data/ssh/etc/ssh/*.pub").stdout
        # none baked into the root: the root's /etc/ssh has no host key at all
        r = ssh(port, client, "ls /etc/ssh | grep -c ssh_host_ || true")
        assert r.stdout.strip() == "0", r.stdout
    assert a_fp != b_fp
    assert re.fullmatch(r"[0-9a-f]{32}", b_id) and a_id != b_id
    assert len(a_keys.splitlines()) == 3 and not set(a_keys.splitlines()) & set(b_keys.splitlines())


def test_machine_id_survives_a_reboot(prod, qemu_arm64_production, client, tmp_path):
    """Last test on copy A: it powers the copy off and boots it again."""
    cfg, _ = qemu_arm64_production
    before = prod.ssh("sync; cat /data/etc/machine-id").stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{32}", before)
    prod.stop()
    with start(prod.image, board=cfg.board, forwards=[22], snapshot=False, log_path=tmp_path / "console.log") as vm:
        vm.expect(READY_MARKER, 900)
        wait_ssh(vm.forwards[22], client)
        after = ssh(vm.forwards[22], client, "cat /etc/machine-id").stdout.strip()
    assert after == before


# -- debug image: console shell kept, hardware watchdog driven ---------------------------------

@pytest.fixture
def with_i6300esb(monkeypatch):
    """QEMU's virt machine has no watchdog unless one is plugged in: add the PCI i6300esb
    (Linux driver i6300esb, kept by the board's drivers/watchdog/*) to the boot command."""
    import dataclasses

    import appliance.image.boot as boot

    real = boot.plan_boot

    def plan(*a, **kw):
        p = real(*a, **kw)
        return dataclasses.replace(p, argv=tuple(p.argv) + ("-device", "i6300esb"))
    monkeypatch.setattr(boot, "plan_boot", plan)


def test_debug_image_keeps_console_and_pid1_drives_the_hardware_watchdog(qemu_arm64_debug, with_i6300esb,
                                                                         client, tmp_path):
    cfg, res = qemu_arm64_debug
    with start(res.image, board=cfg.board, forwards=[22], log_path=tmp_path / "console.log") as vm:
        vm.expect(READY_MARKER, 900)
        vm.send("\n")
        vm.expect(r"root@qemu-arm64:[^\n]*# ", 120)          # the debug profile's serial shell
        rc, out = vm.run("getent shadow root | cut -d: -f2; command -v dpkg")
        assert out.split() == ["*", "/usr/bin/dpkg"], out     # root still locked; debug keeps dpkg
        wait_ssh(vm.forwards[22], client)                     # the same CA works here
        rc, out = vm.run("cat /sys/class/watchdog/watchdog0/identity /sys/class/watchdog/watchdog0/state "
                         "/sys/class/watchdog/watchdog0/timeout")
        assert rc == 0 and out.split("\n")[:3] == ["i6300ESB timer", "active", "30"], out
        rc, out = vm.run("readlink /proc/1/fd/* | grep -c '^/dev/watchdog'")
        assert out.strip() == "1", f"PID 1 does not hold the watchdog open: {out}"
        # Hang the kernel: a panic that does not reboot by itself (the image boots with panic=-1,
        # an immediate reset, so switch that off first). Nobody pings the watchdog any more, so
        # only the watchdog can reset the board; QEMU runs with -no-reboot: the reset ends QEMU.
        rc, out = vm.run("sysctl -qw kernel.panic=0 kernel.sysrq=1 && cat /proc/sys/kernel/panic")
        assert rc == 0 and out.strip() == "0", out
        vm.send("sync; echo c > /proc/sysrq-trigger\n")
        vm.expect(r"end Kernel panic", 120)
        t0 = time.monotonic()
        vm.proc.wait(timeout=240)
        bite_s = time.monotonic() - t0
    print(f"watchdog reset {bite_s:.0f} s after the kernel hung")
    assert bite_s < 200
