"""The runtime daemon (in-process, real ai-edge-litert) serving from the encrypted store on a
real SoftHSM2 token: predictions match numpy, hot reload picks up a new installed version
without decrypting again when nothing changed, and an image without a vendor key serves the
plain directory only."""
from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from dataclasses import replace
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from appliance.runtime import tinymodels
from appliance.runtime.config import ModelSettings, RuntimeConfig
from appliance.runtime.loader import DirectorySource, MultiSource
from appliance.runtime.server import Server, make_source
from appliance.secure import envelope
from appliance.secure.backend import Pkcs11Backend
from appliance.secure.source import SecureModelSource
from appliance.secure.store import DeviceStore

BOARD = "qemu-arm64"
V1 = tinymodels.fully_connected_f32(16, 4, seed=11)
V2 = tinymodels.fully_connected_f32(16, 4, seed=12)
PLAIN = tinymodels.fully_connected_f32(16, 4, seed=13)


def package(pem, vendor, data, version):
    m = envelope.Manifest("enc", version, hashlib.sha256(data).hexdigest(), len(data), (BOARD,), None)
    return envelope.build_package(data, m, vendor, pem)


class CountingSource(SecureModelSource):
    """The real secure source; counts full loads (token unwrap + decrypt)."""

    loads = 0

    def load(self, name):
        type(self).loads += 1
        return super().load(name)


def config(model_dir: Path, store_dir: Path | None = None) -> RuntimeConfig:
    return RuntimeConfig(model_dir=model_dir, store_dir=store_dir, host="127.0.0.1", port=0,
                         board_json=Path("/nonexistent"), reload_interval_s=0,
                         defaults=replace(ModelSettings(), num_threads=1)).validate()


@pytest.fixture
def store(tmp_path, token_config, device_a, vendor_key):
    backend = Pkcs11Backend(token_config("dev-a", mac_label=f"mac-{uuid.uuid4().hex}"))
    yield DeviceStore(tmp_path / "store", backend, vendor_key.public_key(), BOARD)
    backend.close()


def test_runtime_serves_encrypted_model_and_reloads_only_on_change(tmp_path, store, device_a, vendor_key):
    _, pem = device_a
    plain_dir = tmp_path / "models"
    plain_dir.mkdir()
    (plain_dir / "plain.tflite").write_bytes(PLAIN)
    store.install(package(pem, vendor_key, V1, "1.0.0"))
    src = CountingSource(store)
    CountingSource.loads = 0
    x = np.linspace(-1, 1, 16, dtype=np.float32).reshape(1, -1)

    async def t():
        server = Server(config(plain_dir), source=MultiSource([src, DirectorySource(plain_dir)]))
        await server.start()
        try:
            async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{server.port}") as s:
                async def predict(name):
                    r = await s.post(f"/v1/models/{name}:predict", json={"inputs": x.tolist()})
                    assert r.status == 200, await r.text()
                    body = await r.json()
                    return body["version"], np.array(body["outputs"][0], np.float32)

                v, y = await predict("enc")
                assert v == "1.0.0"  # the store's version, not a file hash: served from the store
                np.testing.assert_allclose(y, tinymodels.reference_output(V1, x), rtol=1e-5, atol=1e-5)
                _, y = await predict("plain")
                np.testing.assert_allclose(y, tinymodels.reference_output(PLAIN, x), rtol=1e-5, atol=1e-5)
                assert CountingSource.loads == 1

                for _ in range(3):  # nothing changed: no unwrap, no decrypt
                    await server.registry.reload()
                assert CountingSource.loads == 1

                store.install(package(pem, vendor_key, V2, "2.0.0"))
                await server.registry.reload()
                assert CountingSource.loads == 2
                v, y = await predict("enc")
                assert v == "2.0.0"
                np.testing.assert_allclose(y, tinymodels.reference_output(V2, x), rtol=1e-5, atol=1e-5)
                r = await s.get("/readyz")
                assert r.status == 200
        finally:
            await server.stop()

    asyncio.run(t())


def test_swapped_file_with_same_version_keeps_serving_the_verified_one(tmp_path, store, device_a, vendor_key):
    """The cheap version check is only a hint: a file replaced on disk is loaded (and refused)
    only if its claimed version differs; either way the verified model keeps being served."""
    _, pem = device_a
    store.install(package(pem, vendor_key, V1, "1.0.0"))
    src = CountingSource(store)
    CountingSource.loads = 0
    path = store.models / "enc.pkg"

    async def t():
        server = Server(config(tmp_path / "none"), source=src)
        await server.start()
        try:
            good = server.registry.runners["enc"]
            # A package hand-made for this device's key, claiming version 3.0.0, with a fake seal.
            forged = package(pem, vendor_key, V2, "3.0.0") + b"\0" * 32 + b"APLSEAL1"
            path.write_bytes(forged)
            await server.registry.reload()
            assert CountingSource.loads == 2
            assert server.registry.runners["enc"] is good
            assert "install seal does not verify" in server.registry.failures["enc"]
        finally:
            await server.stop()

    asyncio.run(t())


def test_store_without_vendor_key_serves_plain_dir_only(tmp_path, monkeypatch, caplog):
    plain_dir = tmp_path / "models"
    plain_dir.mkdir()
    monkeypatch.setenv("APPLIANCE_VENDOR_KEY", str(tmp_path / "no-such-key.pub"))
    with caplog.at_level(logging.WARNING, logger="appliance.runtime"):
        source = make_source(config(plain_dir, store_dir=tmp_path / "store"))
    assert isinstance(source, DirectorySource)
    assert "secure store" in caplog.text and "no vendor public key" in caplog.text
