"""Per-device model packages, built in the station's own process.

A fleet run packages the same model for every device; only the device id (watermark) and the
device's public key (encryption) change. So, once per run: read the model, the vendor
signing key and the watermark key, parse the model's weight tensors and measure their output
costs (`watermark.tensor_costs`, a few TFLite interpreter runs: the expensive part of a
watermark). Per device: `watermark.embed_arrays` with those cached costs, the same
verification `watermark.embed` does, then `envelope.build_package`. The result is
byte-for-byte what `watermark.embed` + `appliance-secure package` produce (tested), without
a Python start, numpy/cryptography imports and the cost probes for every device (measured:
~0.3 CPU-s per device as a subprocess).
"""

from __future__ import annotations

import hashlib
import threading

from .errors import ProvisionError


class PackagingError(ProvisionError):
    pass


class Packager:
    """Builds model packages for one fleet run (thread-safe; the model analysis runs once)."""

    def __init__(self, model) -> None:  # model: fleetconfig.ModelSettings
        self.model = model
        self._lock = threading.Lock()
        self._ready = False

    def _read(self, path, what: str) -> bytes:
        try:
            return open(path, "rb").read()
        except OSError as e:
            raise PackagingError(f"cannot read {what} {path}: {e.strerror}") from None

    def _prepare(self) -> None:
        with self._lock:
            if self._ready:
                return
            from cryptography.hazmat.primitives import serialization
            from cryptography.hazmat.primitives.asymmetric import ed25519

            m = self.model
            self.content = self._read(m.file, "model")
            try:
                key = serialization.load_pem_private_key(self._read(m.signing_key, "signing key"), password=None)
            except (ValueError, TypeError):
                raise PackagingError(f"model.signing_key {m.signing_key} is not an unencrypted PEM "
                                     "private key") from None
            if not isinstance(key, ed25519.Ed25519PrivateKey):
                raise PackagingError(f"model.signing_key {m.signing_key} is not Ed25519")
            self.signing_key = key
            self.wm_key = None
            if m.watermark_key:
                self.wm_key = self._read(m.watermark_key, "watermark key")
                if len(self.wm_key) < 16:
                    raise PackagingError(f"model.watermark_key {m.watermark_key} is shorter than 16 bytes")
                from appliance.secure import watermark as W

                try:
                    self.tensors = W.weight_tensors(self.content)
                    self.arrays = W.read_arrays(self.content, self.tensors)
                except Exception as e:
                    raise PackagingError(f"model.file {m.file}: cannot watermark: {_one_line(e)}") from None
                # the same rule as watermark.embed(fidelity=True): cost probes need >1 tensor
                self.costs = (W.tensor_costs(self.content, self.tensors, self.arrays)
                              if len(self.tensors) > 1 else None)
            self._ready = True

    def marked(self, device_id: str) -> bytes:
        """The model as delivered to DEVICE_ID (16 hex digits): watermarked if the fleet has a
        watermark key. Deterministic, so a later run can recompute what a device holds."""
        self._prepare()
        if self.wm_key is None:
            return self.content
        from appliance.secure import watermark as W

        dev = int(device_id, 16)
        try:
            out = W.embed_arrays(self.arrays, [t.dtype for t in self.tensors], [t.tid for t in self.tensors],
                                 self.wm_key, dev, costs=self.costs)
            marked = W.write_arrays(self.content, self.tensors, out)
            res = W.verify(marked, self.wm_key)
        except Exception as e:
            raise PackagingError(f"watermarking {self.model.file} for {device_id} failed: {_one_line(e)}") from None
        if not res.detected or res.device_id != dev:
            raise PackagingError(f"model.file {self.model.file} is too small to carry the watermark reliably")
        return marked

    def package(self, device_pubkey_pem: str, device_id: str) -> tuple[bytes, dict]:
        """(package bytes, {sha256, watermark_id, size}) for one device."""
        from appliance.secure.envelope import Manifest, build_package

        m = self.model
        content = self.marked(device_id)
        wm_id = device_id if self.wm_key is not None else None
        manifest = Manifest(m.name, m.version, hashlib.sha256(content).hexdigest(), len(content),
                            tuple(m.boards), wm_id)
        try:
            pkg = build_package(content, manifest, self.signing_key, device_pubkey_pem.encode(), m.oaep_hash)
        except Exception as e:  # SecureError (bad key, bad field) or cryptography's ValueError
            raise PackagingError(f"packaging {m.name} {m.version} for {device_id} failed: {_one_line(e)}") from None
        return pkg, {"sha256": hashlib.sha256(pkg).hexdigest(), "watermark_id": wm_id, "size": len(pkg)}


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__
