"""e2e (issue 6): `provision fleet apply` configures the booted qemu-arm64 image over SSH.

The image is the production profile (no console shell), built with the session's factory CA
(`ssh_ca`, --ssh-ca) and the vendor's public key (a templates overlay: the build has no flag
for it yet). The station logs in as root with its own key and a certificate from that CA: the
image has no authorized_keys at all. The same CA then signs the device's host key and its
client key. The device gets its identity, its device key is read from its SoftHSM2 token
(made on first boot by appliance-store-init.service), and it receives a model encrypted for
that key and watermarked with its id; the self-test decrypts it on the device and reloads the
runtime. The image's own runtime unit then serves the delivered model, and its answer is
compared with the numpy reference of the watermarked copy. A second apply changes nothing.
"""
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from appliance.image.boot import READY_MARKER, start
from appliance.provision.cli import main
from appliance.provision.inventory import Inventory
from appliance.runtime.tinymodels import fully_connected_f32, reference_output
from appliance.secure.watermark import embed

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(3600)]

AGENT = "/opt/appliance/appliance-agent/appliance-agent"
SERIAL = "QEMU0001"
DEVICE_ID = "0x00000000c0ffee01"


def ssh(port, key, cmd, input=None, timeout=300):
    argv = ["ssh", "-F", "/dev/null", "-p", str(port), "-i", str(key), "-o", "IdentitiesOnly=yes",
            "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "ConnectTimeout=20", "-o", "LogLevel=ERROR", "-o", "IdentityAgent=none", "root@127.0.0.1", cmd]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input)


def wait_ssh(port, key, timeout=300):
    deadline = time.monotonic() + timeout
    while True:
        r = ssh(port, key, "true", timeout=60)
        if r.returncode == 0:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"no SSH on {port}: {r.stderr.strip()}")
        time.sleep(3)


def http(url, body=None, timeout=30):
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"} if body else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


@pytest.fixture
def station(ssh_ca, tmp_path):
    """The station's key pair, certified by the factory CA for root; vendor and watermark keys;
    the model to deliver."""
    k = tmp_path / "station"
    k.mkdir()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "station", "-f", str(k / "id")], check=True)
    subprocess.run(["ssh-keygen", "-q", "-s", str(ssh_ca.key), "-I", "factory-station-1", "-n", "root",
                    "-V", "-5m:+1d", str(k / "id.pub")], check=True)
    subprocess.run([sys.executable, "-m", "appliance.secure.cli", "vendor-key", str(k / "vendor.pem")],
                   check=True, capture_output=True)
    (k / "watermark.key").write_bytes(os.urandom(32))
    (k / "detector.tflite").write_bytes(fully_connected_f32(128, 64, seed=3))  # big enough to watermark
    return k


def fleet_toml(path: Path, k: Path, ssh_ca, port: int, version: str) -> Path:
    path.write_text(f"""
[fleet]
name = "qemu-e2e"
workers = 2
identity = "{k / 'id'}"
agent = "{AGENT}"
image_version = "{version}"
selftest = ["{{agent}} store check {{model_name}}", "systemctl reload appliance-runtime.service"]
connect_timeout = 20
command_timeout = 300       # keygen and store install under TCG take a while
ssh_wait = 300
retries = 2
backoff = 2.0
hostname_file = "/data/appliance/hostname"
identity_dir = "/data/appliance"
host_key = "/data/ssh/etc/ssh/ssh_host_ed25519_key.pub"
host_cert_reload = "systemctl reload ssh.service"
client_key = "/data/appliance/ssh/id_ed25519"
upload_dir = "/var/tmp"
runtime_port = 8500         # the self-test asks the image's runtime, from the device
predict_wait = 300

[ca]
key = "{ssh_ca.key}"
validity = "+52w"

[model]
file = "{k / 'detector.tflite'}"
name = "detector"
version = "1.0.0"
boards = ["qemu-arm64"]
signing_key = "{k / 'vendor.pem'}"
watermark_key = "{k / 'watermark.key'}"

[[device]]
serial = "{SERIAL}"
address = "127.0.0.1"
port = {port}
hostname = "edge-qemu-0001"
device_id = "{DEVICE_ID}"
""")
    return path


@pytest.fixture
def image(tmp_path, ssh_ca, station):
    """qemu-arm64 production with the CA and the vendor key; shares every cached stage with the
    session's images (a build costs ~20-40 s)."""
    from appliance.image.build import build
    from appliance.image.config import make_config

    overlay = tmp_path / "overlay" / "rootfs" / "etc" / "appliance"
    overlay.mkdir(parents=True)
    (overlay / "vendor-ed25519.pub.j2").write_bytes((station / "vendor.pem.pub").read_bytes())
    cfg = make_config("qemu-arm64", profile="production", out_dir=tmp_path / "out", ssh_ca=ssh_ca.pub,
                      boards_dir=Path(__file__).resolve().parents[2] / "boards",
                      templates_overlay=tmp_path / "overlay")
    return cfg, build(cfg)


def test_fleet_apply_configures_the_booted_image(image, ssh_ca, station, tmp_path, capsys, wait_served):
    cfg, res = image
    k = station
    timings = {}
    t_boot = time.monotonic()
    with start(res.image, board=cfg.board, forwards=[22, 8500], log_path=tmp_path / "console.log") as vm:
        vm.expect(READY_MARKER, 900)
        port = vm.forwards[22]
        wait_ssh(port, k / "id")
        timings["boot"] = time.monotonic() - t_boot
        fleet = fleet_toml(tmp_path / "fleet.toml", k, ssh_ca, port, cfg.image_version)

        t0 = time.monotonic()
        rc = main(["fleet", "apply", str(fleet), "--no-progress"])
        timings["apply"] = time.monotonic() - t0
        out = capsys.readouterr().out
        assert rc == 0, out
        assert "1 done, 0 failed of 1" in out, out

        inv = Inventory(f"sqlite:///{tmp_path}/inventory.sqlite", create=False)
        rec = inv.get(SERIAL)
        assert rec["state"] == "done" and rec["image_version"] == cfg.image_version
        assert rec["watermark_id"] == DEVICE_ID[2:] and "store check" in rec["selftest"]
        assert ("runtime prediction detector 1.0.0 on 127.0.0.1:8500: output [1, 64] matches this "
                "device's model") in rec["selftest"], rec["selftest"]

        # On the device: identity files, the client certificate for its own key, the model in the store.
        r = ssh(port, k / "id", "cat /data/appliance/hostname /data/appliance/device-id /data/appliance/serial; "
                                "ssh-keygen -L -f /data/appliance/ssh/id_ed25519-cert.pub | grep -A1 Principals; "
                                f"{AGENT} store list --json")
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert lines[:3] == ["edge-qemu-0001", DEVICE_ID[2:], SERIAL], r.stdout
        assert lines[4].strip() == f"device-{SERIAL}", r.stdout
        listed = json.loads("\n".join(lines[5:]))
        assert [(m["name"], m["version"], m["status"]) for m in listed] == [("detector", "1.0.0", "ok")], listed

        # sshd now presents the CA-signed host certificate: a client that trusts only the CA
        # (no known host key) verifies the device strictly.
        kh = tmp_path / "known_hosts"
        kh.write_text(f"@cert-authority [127.0.0.1]:{port} {ssh_ca.pub.read_text().strip()}\n")
        r = subprocess.run(["ssh", "-F", "/dev/null", "-p", str(port), "-i", str(k / "id"), "-o", "IdentitiesOnly=yes",
                            "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={kh}",
                            "-o", "HostKeyAlgorithms=ssh-ed25519-cert-v01@openssh.com", "-o", "IdentityAgent=none",
                            "root@127.0.0.1", "true"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr

        # The image's own runtime unit (a dynamic user reading the store) serves the delivered
        # model: the answer is the watermarked copy's, marked with this device's id.
        base = f"http://127.0.0.1:{vm.forwards[8500]}"
        wait_served(base, "detector", "1.0.0")
        x = np.linspace(-1, 1, 128, dtype=np.float32).reshape(1, -1)
        out = http(base + "/v1/models/detector:predict", json.dumps({"inputs": x.tolist()}).encode())
        marked = embed((k / "detector.tflite").read_bytes(), (k / "watermark.key").read_bytes(), int(DEVICE_ID, 16))
        want = reference_output(marked.model, x)
        np.testing.assert_allclose(np.asarray(out["outputs"][0], dtype=np.float32), want, rtol=1e-5, atol=1e-5)
        assert not np.array_equal(want, reference_output((k / "detector.tflite").read_bytes(), x))

        # A second run: nothing issued twice, the device is left as it is.
        t0 = time.monotonic()
        assert main(["fleet", "apply", str(fleet), "--no-progress"]) == 0
        timings["reapply"] = time.monotonic() - t0
        capsys.readouterr()
        kinds = sorted(e["kind"] for e in inv.events(SERIAL))
        assert kinds == sorted(["device-key", "host-cert-issued", "client-cert-issued", "model-packaged",
                                "prediction"]), kinds
        assert inv.get(SERIAL)["host_cert"] == rec["host_cert"]
    print(f"fleet apply on the booted production image: boot to SSH {timings['boot']:.0f} s, "
          f"first apply {timings['apply']:.1f} s, second apply {timings['reapply']:.1f} s")
