"""Runtime configuration: one dataclass, validated at the edge (CLI flags and/or a TOML/JSON
file), passed down. Errors are ConfigError with a one-line message naming the field."""
from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

DEFAULT_BOARD_JSON = "/etc/appliance/board.json"

# The daemon's allocator settings (appliance-runtime.service sets them; the benchmarks run
# under the same). A model load allocates multi-MB buffers (decrypted weights, interpreter
# arenas) and every fresh 4 KiB page is a fault, ~1.5 us each in a VM. hugetlb=1: glibc asks
# for transparent huge pages. mmap_threshold=32 MiB (glibc's maximum): such buffers come from
# the heap, which glibc grows in huge-page-aligned steps, instead of from their own mmap, whose
# address is only 2 MiB-aligned by luck. Measured on a fresh 5.5 MB decrypt: 316-827 faults and
# 2.5-3.0 ms with hugetlb alone, 2-3 faults and 1.1 ms with both. Cost: freed blocks below the
# heap top stay mapped for reuse rather than going back to the kernel at once.
MALLOC_TUNABLES = "glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=33554432"


BATCHING_MODES = ("auto", "on", "off")


class ConfigError(Exception):
    pass


@dataclass(frozen=True)
class ModelSettings:
    max_batch: int = 8           # rows merged into one invoke (models with a dynamic batch dim)
    max_wait_ms: float = 2.0     # how long the first request of a batch waits for company
    queue_size: int = 64         # pending requests before 429
    timeout_s: float = 10.0      # per request, queueing included
    pool_size: int = 1           # interpreters (each runs one batch at a time)
    num_threads: int = 1         # TFLite threads per interpreter
    batching: str = "auto"       # auto: merge requests only if a measured batch is cheaper per row
    inline_when_idle: bool = True  # invoke on the event loop thread when no other request is in

    def validate(self, where: str) -> "ModelSettings":
        checks = [
            ("max_batch", self.max_batch >= 1), ("max_wait_ms", self.max_wait_ms >= 0),
            ("queue_size", self.queue_size >= 1), ("timeout_s", self.timeout_s > 0),
            ("pool_size", 1 <= self.pool_size <= 64), ("num_threads", 1 <= self.num_threads <= 64),
            ("batching", self.batching in BATCHING_MODES),
        ]
        for name, ok in checks:
            if not ok:
                raise ConfigError(f"{where}.{name}: invalid value {getattr(self, name)!r}")
        return self


@dataclass(frozen=True)
class RuntimeConfig:
    model_dir: Path = Path("/data/models")
    store_dir: Path | None = None      # secure store (appliance.secure.source), searched first
    host: str = "127.0.0.1"
    port: int = 8500
    board_json: Path = Path(DEFAULT_BOARD_JSON)
    max_body_bytes: int = 16 * 1024 * 1024
    reload_interval_s: float = 5.0     # 0 = only on SIGHUP
    defaults: ModelSettings = field(default_factory=ModelSettings)
    models: dict[str, ModelSettings] = field(default_factory=dict)   # per-model overrides

    def settings_for(self, name: str) -> ModelSettings:
        return self.models.get(name, self.defaults)

    def validate(self) -> "RuntimeConfig":
        if not (0 <= self.port <= 65535):
            raise ConfigError(f"port: {self.port} is not a TCP port")
        if self.max_body_bytes < 1024:
            raise ConfigError(f"max_body_bytes: {self.max_body_bytes} is below 1024")
        if self.reload_interval_s < 0:
            raise ConfigError(f"reload_interval_s: {self.reload_interval_s} is negative")
        self.defaults.validate("defaults")
        for n, s in self.models.items():
            s.validate(f"models.{n}")
        return self


def _settings(raw: object, where: str, base: ModelSettings) -> ModelSettings:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table, got {type(raw).__name__}")
    known = {f.name: f for f in fields(ModelSettings)}
    kw = {}
    for k, v in raw.items():
        if k not in known:
            raise ConfigError(f"{where}.{k}: unknown setting (known: {', '.join(known)})")
        if known[k].type == "bool":
            if not isinstance(v, bool):
                raise ConfigError(f"{where}.{k}: expected true or false, got {v!r}")
            kw[k] = v
            continue
        if known[k].type == "str":
            if not isinstance(v, str):
                raise ConfigError(f"{where}.{k}: expected a string, got {v!r}")
            kw[k] = v
            continue
        want = int if known[k].type == "int" else float
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (want is int and not isinstance(v, int)):
            raise ConfigError(f"{where}.{k}: expected {want.__name__}, got {v!r}")
        kw[k] = want(v)
    return replace(base, **kw)


def load_file(path: Path) -> dict:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    try:
        return json.loads(text) if str(path).endswith(".json") else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: not valid {'JSON' if str(path).endswith('.json') else 'TOML'}: {e}") from None


def from_mapping(raw: dict, base: RuntimeConfig | None = None, where: str = "config") -> RuntimeConfig:
    cfg = base or RuntimeConfig()
    kw: dict = {}
    simple = {"model_dir": Path, "store_dir": Path, "host": str, "port": int, "board_json": Path,
              "max_body_bytes": int, "reload_interval_s": float}
    for k, v in raw.items():
        if k in simple:
            t = simple[k]
            if t in (Path, str) and not isinstance(v, str):
                raise ConfigError(f"{where}: {k}: expected a string, got {v!r}")
            if t in (int, float) and (isinstance(v, bool) or not isinstance(v, (int, float))
                                      or (t is int and not isinstance(v, int))):
                raise ConfigError(f"{where}: {k}: expected {t.__name__}, got {v!r}")
            kw[k] = t(v)
        elif k == "defaults":
            kw["defaults"] = _settings(v, "defaults", cfg.defaults)
        elif k == "models":
            if not isinstance(v, dict):
                raise ConfigError(f"{where}: models: expected a table of model names")
            d = kw.get("defaults", cfg.defaults)
            kw["models"] = {n: _settings(s, f"models.{n}", d) for n, s in v.items()}
        else:
            raise ConfigError(f"{where}: unknown key {k!r}")
    try:
        return replace(cfg, **kw).validate()
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def big_cores(board_json: Path) -> list[int] | None:
    """The board's big cores from board.json ``cpu.big`` (None if the file or key is absent),
    intersected with the CPUs this process may use."""
    try:
        board = json.loads(Path(board_json).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{board_json}: unreadable board file: {e}") from None
    big = (board.get("cpu") or {}).get("big")
    if big is None:
        return None
    if not isinstance(big, list) or not all(isinstance(c, int) and c >= 0 for c in big):
        raise ConfigError(f"{board_json}: cpu.big must be a list of CPU numbers, got {big!r}")
    allowed = os.sched_getaffinity(0)
    usable = sorted(set(big) & allowed)
    return usable or None
