"""FLEET.toml: the one config model of `provision fleet`, validated at the edge.

    [fleet]
    name = "line-1"
    workers = 32                # parallel SSH connections (bounded pool); default:
                                # min(devices, 32), see fleet.DEFAULT_WORKERS
    user = "root"
    identity = "keys/station_ed25519"     # the station's SSH key (relative to this file)
    agent = "appliance-agent"             # device command (multi-call agent)
    image_version = "1.4.0"               # expected image version; omit to only record it
    manifest_path = "/etc/appliance/manifest.json"
    connect_timeout = 5         # TCP connect + SSH handshake, seconds
    command_timeout = 60        # every remote command has this deadline
    ssh_wait = 120              # "wait for SSH": keep retrying this long
    retries = 3                 # per step, on connection loss/timeouts
    backoff = 1.0               # seconds, doubled per retry
    selftest = ["{agent} store check {model_name}"]   # more commands may be added
    init_token = false          # SoftHSM2 boards: let `store keygen` initialise the token
    hostname_file = "/etc/hostname"           # device paths; on a read-only root point
    identity_dir = "/etc/appliance"           # them at the writable mount
    host_key = "/etc/ssh/ssh_host_ed25519_key.pub"
    host_cert_reload = ""       # device command run after a new host certificate is written,
                                # so sshd presents it (the image: "systemctl reload ssh.service")
    client_key = "/etc/appliance/ssh/id_ed25519"
    upload_dir = "/var/tmp"
    runtime_port = 0            # > 0: the self-test also asks the device's runtime on its
                                # 127.0.0.1:PORT (the image: 8500) for a prediction of the
                                # delivered model and checks it against the station's own
    predict_wait = 60           # seconds to wait for the runtime to serve the new version

    [ca]
    key = "ca/factory_ca"       # factory SSH CA private key; never leaves the station
    validity = "+520w"
    host_principals = ["{hostname}", "{address}"]
    user_principals = ["device-{serial}"]

    [model]                     # optional: deliver a model encrypted for each device
    file = "models/detector.tflite"
    name = "detector"
    version = "1.0.0"
    boards = ["qemu-arm64"]
    signing_key = "keys/vendor_ed25519.pem"
    watermark_key = "keys/watermark.key"  # optional: watermark with the device id
    oaep_hash = "SHA-1"

    [[device]]
    serial = "SN0001"
    address = "10.0.0.11"       # or "127.0.0.1" with port = the forwarded SSH port (QEMU)
    port = 22
    hostname = "edge-0001"      # default: edge-<serial>
    device_id = "0x0000000000000001"   # 64-bit; default: derived from the serial
    root = "/"                  # where device files live (tests: a per-device directory)
    runtime_port = 8500         # optional: this device's runtime port (default fleet.runtime_port)
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ProvisionError

_SERIAL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HOST = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FleetSettings(_Strict):
    name: str = "fleet"
    workers: int | None = Field(None, ge=1, le=256)  # None: fleet.default_workers()
    user: str = "root"
    identity: Path
    agent: str = "appliance-agent"
    image_version: str | None = None
    manifest_path: str = "/etc/appliance/manifest.json"
    connect_timeout: float = Field(5.0, gt=0)
    command_timeout: float = Field(60.0, gt=0)
    ssh_wait: float = Field(120.0, ge=0)
    retries: int = Field(3, ge=0, le=20)
    backoff: float = Field(1.0, ge=0)
    selftest: list[str] = Field(default_factory=lambda: ["{agent} store check {model_name}"])
    init_token: bool = False  # SoftHSM2 boards only: `store keygen --init-softhsm`
    # where identity goes on the device (an erofs root needs these on a writable mount)
    hostname_file: str = "/etc/hostname"
    identity_dir: str = "/etc/appliance"  # device-id, serial
    host_key: str = "/etc/ssh/ssh_host_ed25519_key.pub"  # its -cert.pub goes next to it
    host_cert_reload: str = ""  # e.g. "systemctl reload ssh.service": sshd reads certificates at start
    client_key: str = "/etc/appliance/ssh/id_ed25519"  # made on the device; -cert.pub next to it
    upload_dir: str = "/var/tmp"  # scratch space for model packages
    runtime_port: int = Field(0, ge=0, le=65535)  # 0: no prediction self-test
    predict_wait: float = Field(60.0, ge=0)

    @field_validator("hostname_file", "identity_dir", "host_key", "client_key", "upload_dir", "manifest_path")
    @classmethod
    def _abs(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("must be an absolute device path")
        return v

    @field_validator("host_key")
    @classmethod
    def _pub(cls, v: str) -> str:
        if not v.endswith(".pub"):
            raise ValueError("must name the public key (.pub)")
        return v


class CASettings(_Strict):
    key: Path
    validity: str = "+520w"
    host_principals: list[str] = Field(default_factory=lambda: ["{hostname}", "{address}"])
    user_principals: list[str] = Field(default_factory=lambda: ["device-{serial}"])


class ModelSettings(_Strict):
    file: Path
    name: str
    version: str
    boards: list[str]
    signing_key: Path
    watermark_key: Path | None = None
    oaep_hash: str = "SHA-1"


class Device(_Strict):
    serial: str
    address: str
    port: int = Field(22, ge=1, le=65535)
    hostname: str = ""
    device_id: str = ""
    root: str = "/"
    runtime_port: int | None = Field(None, ge=1, le=65535)

    @field_validator("serial")
    @classmethod
    def _serial(cls, v: str) -> str:
        if not _SERIAL.match(v):
            raise ValueError("must be 1-64 of A-Z a-z 0-9 . _ - (no spaces or slashes)")
        return v

    @field_validator("root")
    @classmethod
    def _root(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("must be an absolute path")
        return v

    @model_validator(mode="after")
    def _defaults(self) -> "Device":
        host = self.hostname or f"edge-{self.serial.lower()}"
        host = re.sub(r"[^a-z0-9-]", "-", host.lower()) if not self.hostname else host
        if not _HOST.match(host):
            raise ValueError(f"hostname {host!r} is not a valid host name")
        did = self.device_id or "0x" + hashlib.sha256(self.serial.encode()).hexdigest()[:16]
        try:
            v = int(did, 16) if did.lower().startswith("0x") else int(did, 10)
        except ValueError:
            raise ValueError(f"device_id {did!r} is not 0x-hex or decimal") from None
        if not 0 <= v < 1 << 64:
            raise ValueError(f"device_id {did!r} does not fit in 64 bits")
        object.__setattr__(self, "hostname", host)
        object.__setattr__(self, "device_id", f"{v:016x}")
        return self

    def path(self, p: str) -> str:
        """A device path under this device's root."""
        return self.root.rstrip("/") + "/" + p.lstrip("/") if self.root != "/" else p


class Fleet(_Strict):
    fleet: FleetSettings
    ca: CASettings
    model: ModelSettings | None = None
    device: list[Device] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> "Fleet":
        for attr in ("serial", "hostname", "device_id"):
            seen: dict[str, int] = {}
            for i, d in enumerate(self.device):
                v = getattr(d, attr)
                if v in seen:
                    raise ValueError(f"device[{i}].{attr} {v!r} repeats device[{seen[v]}]")
                seen[v] = i
        addrs = {}
        for i, d in enumerate(self.device):
            if (d.address, d.port) in addrs:
                raise ValueError(f"device[{i}] address {d.address}:{d.port} repeats device[{addrs[(d.address, d.port)]}]")
            addrs[(d.address, d.port)] = i
        return self


def _resolve(base: Path, p: Path | None) -> Path | None:
    if p is None:
        return None
    p = Path(p).expanduser()
    return p if p.is_absolute() else (base / p)


def load_fleet(path: Path, overrides: dict[str, Any] | None = None) -> Fleet:
    """Parse and validate FLEET.toml; relative key/model paths resolve against its directory."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ProvisionError(f"{path}: fleet file not found") from None
    except OSError as e:
        raise ProvisionError(f"{path}: cannot read fleet file: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ProvisionError(f"{path}: not valid TOML: {e}") from None
    for (section, key), value in (overrides or {}).items():
        if value is not None:
            raw.setdefault(section, {})[key] = value
    try:
        fleet = Fleet.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        raise ProvisionError(f"{path}: {loc + ': ' if loc else ''}{msg}") from None
    base = path.parent
    fs = fleet.fleet.model_copy(update={"identity": _resolve(base, fleet.fleet.identity)})
    ca = fleet.ca.model_copy(update={"key": _resolve(base, fleet.ca.key)})
    model = fleet.model
    if model is not None:
        model = model.model_copy(update={"file": _resolve(base, model.file),
                                         "signing_key": _resolve(base, model.signing_key),
                                         "watermark_key": _resolve(base, model.watermark_key)})
    fleet = fleet.model_copy(update={"fleet": fs, "ca": ca, "model": model})
    for what, p in (("fleet.identity", fs.identity), ("ca.key", ca.key),
                    ("model.file", model and model.file), ("model.signing_key", model and model.signing_key),
                    ("model.watermark_key", model and model.watermark_key)):
        if p is not None and not Path(p).is_file():
            raise ProvisionError(f"{path}: {what}: {p} not found")
    return fleet
