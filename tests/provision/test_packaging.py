"""The station's in-process packager (appliance.provision.packaging) against the secure
area's own tools: the same watermarked model as `watermark.embed`, a package the real device
store installs, and one-line errors for bad keys."""

import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from appliance.provision.packaging import Packager, PackagingError
from appliance.runtime.tinymodels import fully_connected_f32, fully_connected_int8
from appliance.secure import watermark as W
from appliance.secure.envelope import parse_package


@pytest.fixture
def keys(tmp_path):
    subprocess.run([sys.executable, "-m", "appliance.secure.cli", "vendor-key", str(tmp_path / "vendor.pem")],
                   check=True, capture_output=True)
    (tmp_path / "wm.key").write_bytes(os.urandom(32))
    return tmp_path


def settings(d, model: bytes, watermark=True, **kw):
    (d / "model.tflite").write_bytes(model)
    return SimpleNamespace(**{"file": d / "model.tflite", "name": "detector", "version": "1.2.0",
                              "boards": ["qemu-arm64"], "signing_key": d / "vendor.pem",
                              "watermark_key": d / "wm.key" if watermark else None, "oaep_hash": "SHA-1", **kw})


@pytest.mark.parametrize("make", [lambda: fully_connected_f32(128, 64, seed=4),
                                  lambda: fully_connected_int8(256, 32, seed=5)], ids=["f32", "int8"])
def test_marked_model_is_what_watermark_embed_makes(keys, make):
    model = make()
    p = Packager(settings(keys, model))
    key = (keys / "wm.key").read_bytes()
    for did in ("0000000000000001", "7fa3c2d1e0b49a65"):
        got = p.marked(did)
        assert got == W.embed(model, key, int(did, 16)).model
        assert got != model
        r = W.verify(got, key)
        assert r.detected and r.device_id == int(did, 16)
    assert p.marked("0000000000000001") != p.marked("0000000000000002")


def test_package_is_for_the_device_and_carries_its_watermark(keys, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    dev = rsa.generate_private_key(65537, 2048)
    pem = dev.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    model = fully_connected_f32(128, 64, seed=2)
    p = Packager(settings(keys, model))
    pkg, info = p.package(pem, "00000000000000aa")
    parsed = parse_package(pkg)
    assert parsed.manifest.watermark_id == "00000000000000aa" == info["watermark_id"]
    assert parsed.manifest.name == "detector" and parsed.manifest.version == "1.2.0"
    assert info["size"] == len(pkg)
    # two packages for one device differ (fresh data key) but hold the same marked model
    pkg2, _ = p.package(pem, "00000000000000aa")
    assert pkg2 != pkg and parse_package(pkg2).manifest.sha256 == parsed.manifest.sha256
    plain = Packager(settings(keys, model, watermark=False))
    _, info = plain.package(pem, "00000000000000aa")
    assert info["watermark_id"] is None and plain.marked("00000000000000aa") == model


def test_bad_keys_are_one_line_errors(keys):
    model = fully_connected_f32(128, 64)
    (keys / "short.key").write_bytes(b"x" * 8)
    with pytest.raises(PackagingError, match=r"watermark_key .*short.key is shorter than 16 bytes"):
        Packager(settings(keys, model, watermark_key=keys / "short.key")).marked("01")
    (keys / "rsa.pem").write_bytes(subprocess.run(["openssl", "genrsa", "1024"], capture_output=True,
                                                  check=True).stdout)
    with pytest.raises(PackagingError, match=r"signing_key .*rsa.pem is not Ed25519"):
        Packager(settings(keys, model, signing_key=keys / "rsa.pem")).marked("01")
    with pytest.raises(PackagingError, match=r"packaging detector 1.2.0 for 01 failed: "):
        Packager(settings(keys, model)).package("not a pem", "01")
    assert np  # numpy is what the marker works in
