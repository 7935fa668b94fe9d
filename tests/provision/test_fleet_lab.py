"""`provision fleet apply` against real sshd "devices" on loopback (appliance.provision.
testlab): own host key, device root, SoftHSM2 token per device; the device side runs the
real `appliance-agent store` (SoftHSM2) and the real `appliance-secure package`."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from appliance.provision import fleet as F
from appliance.provision.cli import main
from appliance.provision.fleetconfig import load_fleet
from appliance.provision.inventory import Inventory
from appliance.provision.testlab import DeviceLab
from appliance.runtime.tinymodels import fully_connected_f32

PROBE = Path(__file__).with_name("predict_probe.py")


@pytest.fixture
def keys(tmp_path):
    k = tmp_path / "keys"
    k.mkdir()
    subprocess.run([sys.executable, "-m", "appliance.secure.cli", "vendor-key", str(k / "vendor.pem")],
                   check=True, capture_output=True)
    (k / "watermark.key").write_bytes(os.urandom(32))
    (k / "model.tflite").write_bytes(fully_connected_f32(128, 64, seed=3))
    return k


def model_cfg(k):
    return {"file": str(k / "model.tflite"), "name": "detector", "version": "1.0.0",
            "boards": ["qemu-arm64"], "signing_key": str(k / "vendor.pem"),
            "watermark_key": str(k / "watermark.key")}


@pytest.fixture
def make_lab(tmp_path, keys):
    labs = []

    def make(n, **kw):
        lab = DeviceLab(tmp_path / f"lab{len(labs)}", n, vendor_pub=(keys / "vendor.pem.pub").read_bytes(),
                        **kw).setup()
        labs.append(lab)
        lab.start_all()
        return lab

    yield make
    for lab in labs:
        lab.stop_all()


def ssh_keygen_L(path: Path) -> str:
    return subprocess.run(["ssh-keygen", "-L", "-f", str(path)], capture_output=True, text=True,
                          check=True).stdout


def test_apply_enrols_configures_and_is_idempotent(make_lab, keys, tmp_path, capsys):
    lab = make_lab(3)
    fleet_file = lab.fleet_toml(
        tmp_path / "fleet.toml", model=model_cfg(keys), workers=3,
        selftest=["{agent} store check {model_name}", f"{sys.executable} {PROBE} {{model_name}}"])
    assert main(["fleet", "apply", str(fleet_file), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "3 done, 0 failed of 3" in out
    inv = Inventory(f"sqlite:///{tmp_path}/inventory.sqlite", create=False)
    ca_fp = subprocess.run(["ssh-keygen", "-lf", str(lab.ca_key) + ".pub"], capture_output=True,
                           text=True).stdout.split()[1]
    ca_private = lab.ca_key.read_text()
    for d in lab.devices:
        rec = inv.get(d.serial)
        assert rec["state"] == "done" and rec["image_version"] == "1.0.0"
        r = d.root
        assert (r / "etc/hostname").read_text() == f"edge-{d.serial.lower()}\n"
        assert (r / "etc/appliance/device-id").read_text().strip() == rec["device_id"]
        # host certificate: on the device, recorded, signed by the factory CA, for its host key
        cert = (r / "etc/ssh/ssh_host_ed25519_key-cert.pub").read_text().strip()
        assert cert == rec["host_cert"]
        info = ssh_keygen_L(r / "etc/ssh/ssh_host_ed25519_key-cert.pub")
        assert "host certificate" in info and ca_fp in info and f"edge-{d.serial.lower()}" in info
        assert rec["host_key_fp"] in info
        client = ssh_keygen_L(r / "etc/appliance/ssh/id_ed25519-cert.pub")
        assert "user certificate" in client and f"device-{d.serial}" in client
        # the model is installed encrypted for this device, watermarked with its id
        assert rec["watermark_id"] == rec["device_id"] and rec["model_version"] == "1.0.0"
        assert "prediction ok detector 1.0.0" in rec["selftest"]
        assert not any(b"TFL3" in p.read_bytes() for p in (r / "var/lib/appliance/models").rglob("*")
                       if p.is_file())
        # the CA private key never reached a device
        for p in r.rglob("*"):
            if p.is_file() and p.stat().st_size < 1 << 20:
                assert ca_private not in p.read_text(errors="replace")
    events = len(inv.events())
    before = {d.serial: (d.root / "etc/ssh/ssh_host_ed25519_key-cert.pub").stat().st_mtime_ns
              for d in lab.devices}
    inv.close()

    # a second run changes nothing and issues nothing
    assert main(["fleet", "apply", str(fleet_file), "--no-progress"]) == 0
    inv = Inventory(f"sqlite:///{tmp_path}/inventory.sqlite", create=False)
    assert len(inv.events()) == events
    assert all(inv.get(d.serial)["runs"] == 2 for d in lab.devices)
    assert before == {d.serial: (d.root / "etc/ssh/ssh_host_ed25519_key-cert.pub").stat().st_mtime_ns
                      for d in lab.devices}
    capsys.readouterr()
    assert main(["fleet", "status", str(fleet_file), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["state"] for r in rows] == ["done"] * 3
    assert all(set(r["steps"].values()) == {"done"} for r in rows)
    assert main(["fleet", "status", str(fleet_file)]) == 0
    assert "SN0002" in capsys.readouterr().out


def test_one_bad_device_does_not_stop_the_others(make_lab, keys, tmp_path, capsys):
    lab = make_lab(4)
    (lab.devices[1].root / "etc/appliance/manifest.json").write_text('{"version": "0.9.0"}')
    (lab.devices[2].root / "etc/appliance/token.pin").write_text("999999\n")  # wrong PIN
    fleet_file = lab.fleet_toml(tmp_path / "fleet.toml", model=model_cfg(keys), workers=2)
    assert main(["fleet", "apply", str(fleet_file), "--no-progress"]) == 1
    out, err = capsys.readouterr()
    assert "2 done, 2 failed of 4" in out
    assert "FAILED SN0001: version: SN0001 (127.0.0.1:" in out and "image version 0.9.0, fleet expects 1.0.0" in out
    assert "FAILED SN0002: keygen:" in out
    assert err.strip().startswith("provision: error: 2 of 4 devices failed")
    inv = Inventory(f"sqlite:///{tmp_path}/inventory.sqlite", create=False)
    assert inv.get("SN0002")["state"] == "failed" and inv.step_state("SN0002", "identity") == "done"
    assert inv.step_state("SN0002", "keygen") == "failed"
    # fix the PIN: the re-run continues SN0002 from keygen; SN0001 still refuses
    (lab.devices[2].root / "etc/appliance/token.pin").write_text(lab.pin + "\n")
    assert main(["fleet", "apply", str(fleet_file), "--no-progress"]) == 1
    assert "3 done, 1 failed of 4" in capsys.readouterr().out
    assert inv.get("SN0002")["state"] == "done"
    assert inv.steps("SN0002")["identity"]["attempts"] == 1  # not redone
    inv.close()


def test_unreachable_device_fails_with_reason_within_its_deadline(make_lab, keys, tmp_path, capsys,
                                                                  monkeypatch):
    lab = make_lab(2)
    lab.kill(lab.devices[0])
    fleet_file = lab.fleet_toml(tmp_path / "fleet.toml", ssh_wait=1.5, retries=1, backoff=0.2)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)  # the rich progress path
    t0 = time.monotonic()
    assert main(["fleet", "apply", str(fleet_file)]) == 1
    assert time.monotonic() - t0 < 30
    out = capsys.readouterr().out
    assert "FAILED SN0000: ssh: SSH not reachable within 1.5 s" in out and "1 done, 1 failed" in out
    assert "SN0000 failed:" in out and "fleet lab" in out  # rich's live line and failure print


def test_changed_host_key_is_not_enrolled_again(make_lab, keys, tmp_path, capsys):
    lab = make_lab(2)
    # identity on a writable mount, as an image with a read-only (erofs) root needs
    fleet_file = lab.fleet_toml(tmp_path / "fleet.toml", identity_dir="/var/lib/appliance/identity",
                                hostname_file="/var/lib/appliance/identity/hostname")
    assert main(["fleet", "apply", str(fleet_file), "--no-progress"]) == 0
    ident = lab.devices[0].root / "var/lib/appliance/identity"
    assert (ident / "hostname").read_text() == "edge-sn0000\n" and (ident / "serial").read_text() == "SN0000\n"
    assert not (lab.devices[0].root / "etc/hostname").exists()
    dev = lab.devices[1]
    lab.kill(dev)
    hk = dev.root / "etc/ssh/ssh_host_ed25519_key"
    hk.unlink()
    Path(str(hk) + ".pub").unlink()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(hk)], check=True)
    lab.start(dev)
    lab.wait_listening([dev])
    capsys.readouterr()
    assert main(["fleet", "apply", str(fleet_file), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "FAILED SN0001: ssh: SN0001 (127.0.0.1:" in out and "host key changed since enrolment" in out
    inv = Inventory(f"sqlite:///{tmp_path}/inventory.sqlite", create=False)
    assert [e["kind"] for e in inv.events("SN0001")].count("host-cert-issued") == 1
    inv.close()


@pytest.mark.e2e
def test_fifty_devices_kill_restart_resume(make_lab, keys, tmp_path):
    n = 50
    lab = make_lab(n)
    fleet_file = lab.fleet_toml(tmp_path / "fleet.toml", model=model_cfg(keys), workers=8,
                                connect_timeout=10, ssh_wait=2, retries=1, backoff=0.3)
    fleet = load_fleet(fleet_file)
    url = f"sqlite:///{tmp_path}/inventory.sqlite"
    inv = Inventory(url)
    result = {}
    # power-cut devices: three before the run reaches them ...
    killed = list(lab.devices[-3:])
    for dev in killed:
        lab.kill(dev)
    t = threading.Thread(target=lambda: result.setdefault("s", F.apply(fleet, inv)))
    t.start()
    # ... and some in the middle of their steps (token operations included)
    in_flight = []
    deadline = time.monotonic() + 300
    while len(in_flight) < 4 and time.monotonic() < deadline and t.is_alive():
        for d in inv.devices():
            dev = lab.devices[int(d["serial"][2:])]
            if d["state"] == "running" and d["step"] in ("identity", "keygen", "host-cert", "client-cert", "model") \
                    and dev not in killed:
                lab.kill(dev)
                killed.append(dev)
                in_flight.append(dev)
                break
        time.sleep(0.02)
    t.join(600)
    s1 = result["s"]
    assert len(in_flight) >= 2
    killed_serials = {d.serial for d in killed}
    assert set(s1.failed) <= killed_serials
    assert {d.serial for d in lab.devices[-3:]} <= set(s1.failed)
    # a device cut mid-step either failed (to be resumed) or had already finished that step
    assert len(set(s1.failed) & {d.serial for d in in_flight}) >= 1
    assert set(s1.done) | set(s1.failed) == {d.serial for d in lab.devices}
    for serial, reason in s1.failed.items():
        assert reason and "\n" not in reason
    # power back: the re-run finishes them
    for dev in killed:
        lab.start(dev)
    lab.wait_listening(killed)
    s2 = F.apply(fleet, inv)
    assert s2.failed == {} and len(s2.done) == n
    for d in lab.devices:
        rec = inv.get(d.serial)
        assert rec["state"] == "done"
        assert all(inv.step_state(d.serial, s) == "done" for s in F.STEPS)
        # enrolled exactly once: one device key, one host and one client certificate
        kinds = [e["kind"] for e in inv.events(d.serial)]
        assert kinds.count("device-key") == 1
        assert kinds.count("host-cert-issued") == 1 and kinds.count("client-cert-issued") == 1
        assert (d.root / "etc/ssh/ssh_host_ed25519_key-cert.pub").read_text().strip() == rec["host_cert"]
        assert (d.root / "etc/appliance/ssh/id_ed25519-cert.pub").read_text().strip() == rec["client_cert"]
        assert rec["watermark_id"] == rec["device_id"]
        if d.serial in s1.failed:
            assert rec["runs"] == 2
    inv.close()


def test_host_cert_reload_runs_when_the_host_certificate_step_does(make_lab, tmp_path, capsys):
    """`host_cert_reload` (the image: `systemctl reload ssh.service`, sshd reads certificates at
    start) runs on each device after its host certificate is delivered, and not again once the
    step is done. Here it leaves a marker next to the device's board file."""
    lab = make_lab(2)
    marker = '"$(dirname "$APPLIANCE_BOARD_FILE")/sshd-reloaded"'
    fleet_file = lab.fleet_toml(tmp_path / "fleet.toml", workers=2, selftest=[],
                                host_cert_reload=f"date +%s%N >> {marker}")
    assert main(["fleet", "apply", str(fleet_file), "--no-progress"]) == 0
    for d in lab.devices:
        assert len((d.root / "etc/appliance/sshd-reloaded").read_text().splitlines()) == 1
        assert (d.root / "etc/ssh/ssh_host_ed25519_key-cert.pub").is_file()
    assert main(["fleet", "apply", str(fleet_file), "--no-progress"]) == 0
    for d in lab.devices:
        assert len((d.root / "etc/appliance/sshd-reloaded").read_text().splitlines()) == 1
    capsys.readouterr()


def test_every_command_has_a_deadline_and_failures_name_their_output(make_lab, tmp_path, capsys):
    """A command that hangs is cut at command_timeout (retried once, then the device fails with
    the reason); a command that fails reports its last line of stderr."""
    lab = make_lab(2)
    fleet_file = lab.fleet_toml(tmp_path / "fleet.toml", workers=2, command_timeout=1.5, retries=1, backoff=0.1,
                                selftest=['case "$APPLIANCE_BOARD_FILE" in */SN0000/*) sleep 30;; '
                                          '*) echo some output; echo "no runtime here" >&2; exit 3;; esac'])
    t0 = time.monotonic()
    assert main(["fleet", "apply", str(fleet_file), "--no-progress"]) == 1
    assert time.monotonic() - t0 < 20
    out = capsys.readouterr().out
    assert "FAILED SN0000: selftest: command timed out after 1.5 s" in out and "(after 2 attempts)" in out
    assert "FAILED SN0001: selftest: `case" in out and "exited 3: no runtime here" in out
    inv = Inventory(f"sqlite:///{tmp_path}/inventory.sqlite", create=False)
    assert inv.step_state("SN0000", "model") == "done" and inv.steps("SN0000")["selftest"]["attempts"] == 1
    inv.close()


def test_selftest_asks_the_devices_runtime_for_a_prediction(make_lab, keys, tmp_path, capsys):
    """runtime_port: each device's own runtime (a real `appliance-agent runtime serve` over its
    secure store) is asked, from the device, for a prediction of the model just delivered; the
    answer must be this device's (watermarked) model's. SN0002's port leads to SN0000's runtime:
    a runtime serving another device's copy is caught by its answer. SN0003 has no runtime."""
    from appliance.provision.testlab import _free_ports

    lab = make_lab(4)
    ports = _free_ports(3)
    for d, port in zip(lab.devices, ports[:2]):
        lab.start_runtime(d, port)
    fleet_file = lab.fleet_toml(tmp_path / "fleet.toml", model=model_cfg(keys), workers=4, predict_wait=8,
                                selftest=[])
    text = fleet_file.read_text()
    dev_ports = [ports[0], ports[1], ports[0], ports[2]]
    for d, port in zip(lab.devices, dev_ports):
        text = text.replace(f'serial = "{d.serial}"', f'serial = "{d.serial}"\nruntime_port = {port}')
    fleet_file.write_text(text)
    assert main(["fleet", "apply", str(fleet_file), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "2 done, 2 failed of 4" in out
    assert "FAILED SN0002: selftest:" in out and "is not this device's model's (1.0.0" in out
    assert (f"FAILED SN0003: selftest: SN0003 (127.0.0.1:{lab.devices[3].port}): the runtime on "
            f"127.0.0.1:{ports[2]} does not serve detector 1.0.0 after 8 s (nothing listening)") in out
    inv = Inventory(f"sqlite:///{tmp_path}/inventory.sqlite", create=False)
    for d in lab.devices[:2]:
        rec = inv.get(d.serial)
        assert rec["state"] == "done"
        assert f"runtime prediction detector 1.0.0 on 127.0.0.1:{dev_ports[d.index]}: output [1, 64] " \
               "matches this device's model" in rec["selftest"]
        ev = json.loads(inv.events(d.serial, "prediction")[0]["detail"])
        # the watermark moves the answer by more than the tolerance: the check tells copies apart
        assert ev["off_vs_expected"] <= 1 < ev["unmarked_off"]
    assert inv.step_state("SN0002", "model") == "done" and inv.step_state("SN0002", "selftest") == "failed"
    inv.close()


def test_two_stations_share_one_postgres_inventory(make_lab, keys, tmp_path, postgres, capsys):
    """Two stations apply the same fleet at once against one PostgreSQL: every device is
    enrolled exactly once; a station finding a device claimed reports it busy; a later run
    (either station) finds everything done; `fleet status --inventory URL` reads it."""
    lab = make_lab(6)
    fleet_file = lab.fleet_toml(tmp_path / "fleet.toml", model=model_cfg(keys), workers=3)
    fleet = load_fleet(fleet_file)
    results = {}

    def station(name):
        inv = Inventory(postgres)
        results[name] = F.apply(fleet, inv)
        inv.close()

    threads = [threading.Thread(target=station, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    a, b = results["a"], results["b"]
    serials = {d.serial for d in lab.devices}
    assert set(a.done) | set(b.done) == serials
    for reason in list(a.failed.values()) + list(b.failed.values()):
        assert reason.startswith("busy: another station")
    inv = Inventory(postgres, create=False)
    for s in serials:
        kinds = [e["kind"] for e in inv.events(s)]
        for kind in ("device-key", "host-cert-issued", "client-cert-issued", "model-packaged"):
            assert kinds.count(kind) == 1, (s, kinds)
    inv.close()
    assert main(["fleet", "apply", str(fleet_file), "--inventory", postgres, "--no-progress"]) == 0
    assert "6 done, 0 failed of 6" in capsys.readouterr().out
    assert main(["fleet", "status", "--inventory", postgres, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert sorted(r["serial"] for r in rows) == sorted(serials)
    assert all(r["state"] == "done" and set(r["steps"].values()) == {"done"} for r in rows)
    inv = Inventory(postgres, create=False)
    assert len(inv.events(kind="host-cert-issued")) == 6
    inv.close()
