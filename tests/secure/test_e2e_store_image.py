"""e2e: the secure model store in the booted qemu-arm64 image (debug profile, real SoftHSM2 in
the guest, the frozen appliance-agent).

The vendor's Ed25519 public key goes into /etc/appliance through a templates overlay (the
build has no flag for it yet). After boot: appliance-store-init.service has made the token,
the PIN and the device key; the host reads the device public key over the serial console,
packages the tiny model for that one device, sends the package in base64 over the console,
`appliance-agent store install`s it, reloads the runtime and gets a prediction over the
forwarded port equal to numpy's. The runtime (a dynamic user) restarts and serves it again
from the encrypted store. Finally the data partition of the image file (the guest wrote to
it: snapshot off) holds the package's ciphertext but not one window of the plaintext model.
"""
import base64
import hashlib
import json
import re
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from appliance.image.boot import READY_MARKER, start

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(3600)]

REPO = Path(__file__).resolve().parents[2]
AGENT = "/opt/appliance/appliance-agent/appliance-agent"
TINY = dict(in_features=16, out_features=4, batch=1, seed=7)  # tests/conftest.py's tiny model
PROMPT = r"root@qemu-arm64:[^\n]*# "


def _data_partition(image: Path) -> tuple[int, int]:
    table = json.loads(subprocess.run(["sfdisk", "--json", str(image)], check=True, capture_output=True,
                                      text=True).stdout)["partitiontable"]
    sector = table.get("sectorsize", 512)
    [p] = [p for p in table["partitions"] if p.get("name") == "data"]
    return p["start"] * sector, p["size"] * sector


def _found(image: Path, needles: list[bytes]) -> set[int]:
    """Indexes of the needles that occur in the image's data partition."""
    off, size = _data_partition(image)
    overlap = max(map(len, needles))
    hits, tail = set(), b""
    with open(image, "rb") as f:
        f.seek(off)
        left = size
        while left > 0:
            block = f.read(min(16 << 20, left))
            if not block:
                break
            left -= len(block)
            hay = tail + block
            hits |= {i for i, n in enumerate(needles) if i not in hits and n in hay}
            tail = hay[-overlap:]
    return hits


def test_booted_image_serves_a_model_from_the_encrypted_store(tmp_path, tiny_model_io, wait_served,
                                                              runtime_http):
    from appliance.image.build import build
    from appliance.image.config import make_config
    from appliance.runtime.tinymodels import fully_connected_f32, reference_output
    from appliance.secure import cli as secure_cli

    t0 = time.monotonic()
    x, want = tiny_model_io
    model = fully_connected_f32(**TINY)
    np.testing.assert_allclose(reference_output(model, x), want)  # the same model as the fixture's

    vendor = tmp_path / "vendor-ed25519.pem"
    assert secure_cli.main(["vendor-key", str(vendor)]) == 0
    overlay = tmp_path / "overlay"
    (overlay / "rootfs/etc/appliance").mkdir(parents=True)
    (overlay / "rootfs/etc/appliance/vendor-ed25519.pub.j2").write_bytes(Path(f"{vendor}.pub").read_bytes())
    cfg = make_config("qemu-arm64", profile="debug", out_dir=tmp_path / "out", boards_dir=REPO / "boards",
                      templates_overlay=overlay)
    res = build(cfg)
    t_built = time.monotonic()

    # Needles: 32-byte windows of the plaintext model that the fresh image does not contain.
    windows = [model[i:i + 32] for i in range(0, len(model) - 32, 16)]
    baseline = _found(res.image, windows)
    needles = [w for i, w in enumerate(windows) if i not in baseline]
    assert len(needles) >= len(windows) // 2, "the model's bytes are too common to search for"

    with start(res.image, board=cfg.board, forwards=[8500], snapshot=False,
               log_path=tmp_path / "console.log") as vm:
        vm.expect(READY_MARKER, 900)
        t_ready = time.monotonic()
        vm.send("\n")
        vm.expect(PROMPT, 120)
        rc, out = vm.run("systemctl is-active appliance-store-init appliance-runtime", 60)
        assert out.split() == ["active", "active"], out + vm.run(
            "systemctl status appliance-store-init appliance-runtime --no-pager -l")[1]
        rc, out = vm.run("stat -c '%a %U %G' /data/secure/token.pin /data/secure/tokens", 60)
        assert out.split("\n")[:2] == ["600 root root", "2750 root softhsm"], out

        rc, out = vm.run(f"{AGENT} store keygen", 300)
        m = re.search(r"-----BEGIN PUBLIC KEY-----\n.*?-----END PUBLIC KEY-----\n", out, re.S)
        assert rc == 0 and m, out
        device_pub = tmp_path / "device.pub.pem"
        device_pub.write_text(m.group(0))

        pkg = tmp_path / "tiny.pkg"
        assert secure_cli.main(["package", _write(tmp_path / "tiny.tflite", model), "--name", "tiny",
                                "--version", "1.0.0", "--board", cfg.board.name, "--device-pubkey",
                                str(device_pub), "--signing-key", str(vendor), "-o", str(pkg)]) == 0
        blob = pkg.read_bytes()
        b64 = base64.b64encode(blob).decode()
        vm.run("rm -f /tmp/tiny.b64", 30)
        for i in range(0, len(b64), 512):  # short lines: the tty's line buffer is 4 KiB
            rc, _ = vm.run(f"echo {b64[i:i + 512]} >> /tmp/tiny.b64", 30)
            assert rc == 0
        rc, out = vm.run("base64 -d /tmp/tiny.b64 > /tmp/tiny.pkg && sha256sum /tmp/tiny.pkg", 30)
        assert out.split()[0] == hashlib.sha256(blob).hexdigest(), out

        rc, out = vm.run(f"{AGENT} store install /tmp/tiny.pkg", 300)
        assert rc == 0 and "installed tiny 1.0.0" in out, out
        rc, out = vm.run(f"{AGENT} store list --json", 300)
        [info] = json.loads(out[out.index("["):])
        assert (info["name"], info["version"], info["status"]) == ("tiny", "1.0.0", "ok"), out
        rc, _ = vm.run("systemctl reload appliance-runtime", 60)
        assert rc == 0

        base = f"http://127.0.0.1:{vm.forwards[8500]}"
        wait_served(base, "tiny", "1.0.0")  # the store's version string: served from the store
        status, out = runtime_http(base + "/v1/models/tiny:predict", json.dumps({"inputs": x.tolist()}).encode())
        assert status == 200 and out["version"] == "1.0.0", out
        np.testing.assert_allclose(np.asarray(out["outputs"][0], dtype=np.float32), want, rtol=1e-5, atol=1e-5)
        t_served = time.monotonic()

        # The runtime is not root, and a fresh start loads the model from the store again.
        rc, out = vm.run("ps -o user= -p $(systemctl show -p MainPID --value appliance-runtime)", 60)
        assert out.strip() and out.strip() != "root", out
        rc, _ = vm.run("systemctl restart appliance-runtime", 300)
        assert rc == 0
        wait_served(base, "tiny", "1.0.0")
        status, out = runtime_http(base + "/v1/models/tiny:predict", json.dumps({"inputs": x.tolist()}).encode())
        assert status == 200
        np.testing.assert_allclose(np.asarray(out["outputs"][0], dtype=np.float32), want, rtol=1e-5, atol=1e-5)
        vm.run("sync", 60)

    # On the data partition: the installed package's ciphertext (the search works) but no
    # window of the plaintext model.
    ciphertext = [blob[-48:-16], blob[len(blob) // 2:len(blob) // 2 + 32]]
    hits = _found(res.image, ciphertext + needles)
    assert {0, 1} <= hits, "the installed package is not on the data partition: the scan saw nothing"
    assert not hits - {0, 1}, f"{len(hits - {0, 1})} plaintext model windows found on the data partition"
    print(f"\nbuild {t_built - t0:.0f} s, boot to ready {t_ready - t_built:.0f} s, "
          f"keygen..served {t_served - t_ready:.0f} s, total {time.monotonic() - t0:.0f} s")


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)
