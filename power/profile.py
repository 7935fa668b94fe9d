"""Board power profile: boards/NAME.power.toml (host) or board.json key "power" (device).

Validated once here into frozen dataclasses; everything downstream takes a `Profile`.
Plain dataclasses (no pydantic) because this runs on the device. Errors are one line naming the
source file and the field.
"""
from __future__ import annotations

import json
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import PowerError

DEFAULT_BOARD_JSON = "/etc/appliance/board.json"
# Source checkout: boards/ sits beside the power/ folder.
REPO_BOARDS = Path(__file__).resolve().parent.parent / "boards"


@dataclass(frozen=True)
class Opp:
    khz: int
    uv: int

    @property
    def hz(self) -> float:
        return self.khz * 1e3

    @property
    def volts(self) -> float:
        return self.uv * 1e-6


@dataclass(frozen=True)
class Policy:
    name: str
    core: str
    cpus: tuple[int, ...]
    dynamic_power_coefficient: float  # uW/MHz/V^2 (mainline DT unit)
    transition_latency_us: float
    leakage_w_per_v: float
    opps: tuple[Opp, ...]  # ascending frequency

    @property
    def fmin(self) -> float:
        return self.opps[0].hz

    @property
    def fmax(self) -> float:
        return self.opps[-1].hz

    def freqs(self) -> list[float]:
        return [o.hz for o in self.opps]


@dataclass(frozen=True)
class IdleState:
    name: str
    entry_latency_us: float
    exit_latency_us: float
    min_residency_us: float
    core_w: float  # < 0: the core's leakage at its current voltage (clock-gated, powered)


@dataclass(frozen=True)
class Service:
    policies: tuple[str, ...]
    threads: int
    cycles: float
    mem_s: float
    slo_s: float


@dataclass(frozen=True)
class Thermal:
    passive_c: float
    critical_c: float
    limit_c: float
    zones: tuple[str, ...]


@dataclass(frozen=True)
class IdlePolicy:
    quiet_period_s: float = 60.0
    park_cpus: tuple[int, ...] = ()
    suspend_allowed: bool = False
    suspend_w: float = 0.0
    resume_latency_s: float = 1.0
    max_sleep_s: float = 600.0
    wake_on_lan: bool = False


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    source: str
    observe_only: bool
    policies: tuple[Policy, ...] = ()
    idle_states: tuple[IdleState, ...] = ()
    service: Service | None = None
    thermal: Thermal | None = None
    idle_policy: IdlePolicy = field(default_factory=IdlePolicy)
    idle_w: float = 0.0
    stress_w: float = 0.0
    k_cal: float = 1.0
    platform_w: float = 0.0

    def policy(self, name: str) -> Policy:
        for p in self.policies:
            if p.name == name:
                return p
        raise KeyError(name)

    def service_policies(self) -> list[Policy]:
        assert self.service is not None
        return [self.policy(n) for n in self.service.policies]


class _Reader:
    """Walks a decoded TOML/JSON dict and raises one-line errors naming source and field."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, path: str, msg: str) -> PowerError:
        return PowerError(f"{self.source}: field '{path}': {msg}")

    def get(self, d: dict, key: str, path: str, kind, default=..., minimum=None):
        full = f"{path}.{key}" if path else key
        if key not in d:
            if default is ...:
                raise self.fail(full, "is missing")
            return default
        v = d[key]
        if kind is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if kind is int and isinstance(v, bool) or not isinstance(v, kind):
            raise self.fail(full, f"expected {getattr(kind, '__name__', kind)}, got {type(v).__name__} {v!r}")
        if kind is float and not math.isfinite(v):
            raise self.fail(full, "must be a finite number")
        if minimum is not None and v < minimum:
            raise self.fail(full, f"must be >= {minimum}, got {v}")
        return v

    def int_list(self, d: dict, key: str, path: str, default=...) -> tuple[int, ...]:
        v = self.get(d, key, path, list, default=default)
        full = f"{path}.{key}" if path else key
        for i, x in enumerate(v):
            if not isinstance(x, int) or isinstance(x, bool) or x < 0:
                raise self.fail(f"{full}[{i}]", f"expected a CPU number >= 0, got {x!r}")
        return tuple(v)


_TOP_KEYS = {"name", "description", "observe_only", "calibration", "policies", "idle_states",
             "service", "thermal", "idle_policy"}


def _opps(r: _Reader, d: dict, path: str) -> tuple[Opp, ...]:
    if "opp" in d and "opp_range" in d:
        raise r.fail(path, "give either 'opp' or 'opp_range', not both")
    if "opp_range" in d:
        rng = r.get(d, "opp_range", path, dict)
        p = f"{path}.opp_range"
        lo = r.get(rng, "min_khz", p, int, minimum=1)
        hi = r.get(rng, "max_khz", p, int, minimum=lo)
        step = r.get(rng, "step_khz", p, int, minimum=1)
        vlo = r.get(rng, "min_uv", p, int, minimum=1)
        vhi = r.get(rng, "max_uv", p, int, minimum=vlo)
        out = []
        k = lo
        while k <= hi:
            # Linear V(f) between the two ends (see the profile's comment on where it comes from).
            frac = (k - lo) / (hi - lo) if hi > lo else 1.0
            out.append(Opp(k, int(round(vlo + frac * (vhi - vlo)))))
            k += step
        return tuple(out)
    table = r.get(d, "opp", path, list)
    if not table:
        raise r.fail(f"{path}.opp", "is empty; list [kHz, uV] pairs")
    out = []
    for i, row in enumerate(table):
        if (not isinstance(row, list) or len(row) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in row)):
            raise r.fail(f"{path}.opp[{i}]", f"expected [kHz, uV] as two positive integers, got {row!r}")
        out.append(Opp(row[0], row[1]))
    for i in range(1, len(out)):
        if out[i].khz <= out[i - 1].khz:
            raise r.fail(f"{path}.opp[{i}]", "frequencies must be strictly ascending")
        if out[i].uv < out[i - 1].uv:
            raise r.fail(f"{path}.opp[{i}]", "voltage must not fall as frequency rises")
    return tuple(out)


def parse_profile(data: dict, source: str) -> Profile:
    """Validate a decoded profile dict. `source` names the file for error messages."""
    r = _Reader(source)
    if not isinstance(data, dict):
        raise PowerError(f"{source}: expected a table of power settings, got {type(data).__name__}")
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise r.fail(unknown[0], f"unknown key (known: {', '.join(sorted(_TOP_KEYS))})")
    name = r.get(data, "name", "", str)
    description = r.get(data, "description", "", str, default="")
    observe_only = r.get(data, "observe_only", "", bool, default=False)

    ip = r.get(data, "idle_policy", "", dict, default={})
    idle_policy = IdlePolicy(
        quiet_period_s=r.get(ip, "quiet_period_s", "idle_policy", float, default=60.0, minimum=0.0),
        park_cpus=r.int_list(ip, "park_cpus", "idle_policy", default=[]),
        suspend_allowed=r.get(ip, "suspend_allowed", "idle_policy", bool, default=False),
        suspend_w=r.get(ip, "suspend_w", "idle_policy", float, default=0.0, minimum=0.0),
        resume_latency_s=r.get(ip, "resume_latency_s", "idle_policy", float, default=1.0, minimum=0.0),
        max_sleep_s=r.get(ip, "max_sleep_s", "idle_policy", float, default=600.0, minimum=1.0),
        wake_on_lan=r.get(ip, "wake_on_lan", "idle_policy", bool, default=False),
    )
    if observe_only:
        return Profile(name=name, description=description, source=source, observe_only=True,
                       idle_policy=idle_policy)

    policies = []
    seen_cpus: dict[int, str] = {}
    plist = r.get(data, "policies", "", list)
    if not plist:
        raise r.fail("policies", "is empty; a profile needs at least one cpufreq policy (or observe_only = true)")
    for i, pd in enumerate(plist):
        path = f"policies[{i}]"
        if not isinstance(pd, dict):
            raise r.fail(path, "expected a table")
        pol = Policy(
            name=r.get(pd, "name", path, str),
            core=r.get(pd, "core", path, str, default=""),
            cpus=r.int_list(pd, "cpus", path),
            dynamic_power_coefficient=r.get(pd, "dynamic_power_coefficient", path, float, minimum=0.0),
            transition_latency_us=r.get(pd, "transition_latency_us", path, float, minimum=0.0),
            leakage_w_per_v=r.get(pd, "leakage_w_per_v", path, float, default=0.0, minimum=0.0),
            opps=_opps(r, pd, path),
        )
        if not pol.cpus:
            raise r.fail(f"{path}.cpus", "is empty")
        for c in pol.cpus:
            if c in seen_cpus:
                raise r.fail(f"{path}.cpus", f"cpu{c} is already in {seen_cpus[c]}")
            seen_cpus[c] = pol.name
        if any(p.name == pol.name for p in policies):
            raise r.fail(f"{path}.name", f"duplicate policy name {pol.name!r}")
        policies.append(pol)

    states = []
    for i, sd in enumerate(r.get(data, "idle_states", "", list, default=[])):
        path = f"idle_states[{i}]"
        if not isinstance(sd, dict):
            raise r.fail(path, "expected a table")
        states.append(IdleState(
            name=r.get(sd, "name", path, str),
            entry_latency_us=r.get(sd, "entry_latency_us", path, float, minimum=0.0),
            exit_latency_us=r.get(sd, "exit_latency_us", path, float, minimum=0.0),
            min_residency_us=r.get(sd, "min_residency_us", path, float, minimum=0.0),
            core_w=r.get(sd, "core_w", path, float),
        ))
    states.sort(key=lambda s: s.min_residency_us)

    sd = r.get(data, "service", "", dict)
    service = Service(
        policies=tuple(r.get(sd, "policies", "service", list)),
        threads=r.get(sd, "threads", "service", int, minimum=1),
        cycles=r.get(sd, "cycles", "service", float, minimum=1.0),
        mem_s=r.get(sd, "mem_s", "service", float, minimum=0.0),
        slo_s=r.get(sd, "slo_s", "service", float, minimum=1e-4),
    )
    names = {p.name for p in policies}
    for n in service.policies:
        if n not in names:
            raise r.fail("service.policies", f"{n!r} is not one of the policies ({', '.join(sorted(names))})")
    if not service.policies:
        raise r.fail("service.policies", "is empty")
    ncpu = sum(len(p.cpus) for p in policies if p.name in service.policies)
    if service.threads > ncpu:
        raise r.fail("service.threads", f"{service.threads} threads but the service policies have {ncpu} CPUs")
    sfreqs = {p.freqs().__repr__() for p in policies if p.name in service.policies}
    if len(sfreqs) != 1:
        raise r.fail("service.policies", "all service policies must share one OPP table (they run in lock-step)")

    td = r.get(data, "thermal", "", dict)
    thermal = Thermal(
        passive_c=r.get(td, "passive_c", "thermal", float),
        critical_c=r.get(td, "critical_c", "thermal", float),
        limit_c=r.get(td, "limit_c", "thermal", float),
        zones=tuple(r.get(td, "zones", "thermal", list, default=[])),
    )
    if not thermal.limit_c <= thermal.passive_c <= thermal.critical_c:
        raise r.fail("thermal.limit_c", "need limit_c <= passive_c <= critical_c (throttle before the kernel does)")

    cal = r.get(data, "calibration", "", dict)
    idle_w = r.get(cal, "idle_w", "calibration", float, minimum=0.0)
    stress_w = r.get(cal, "stress_w", "calibration", float, minimum=0.0)
    prof = Profile(name=name, description=description, source=source, observe_only=False,
                   policies=tuple(policies), idle_states=tuple(states), service=service,
                   thermal=thermal, idle_policy=idle_policy, idle_w=idle_w, stress_w=stress_w)
    k_cal, platform_w = calibrate(prof)
    if k_cal <= 0:
        raise r.fail("calibration.stress_w", f"{stress_w} W leaves no room for dynamic power above idle and leakage")
    if platform_w < 0:
        raise r.fail("calibration.idle_w", f"{idle_w} W is below the sleeping cores' own power")
    return Profile(**{**prof.__dict__, "k_cal": k_cal, "platform_w": platform_w})


def deepest_sleep_w(prof: Profile, pol: Policy, volts: float) -> float:
    """Power of one idle core in the deepest idle state (what `idle` means in calibration)."""
    if not prof.idle_states:
        return pol.leakage_w_per_v * volts
    s = prof.idle_states[-1]
    return pol.leakage_w_per_v * volts if s.core_w < 0 else s.core_w


def calibrate(prof: Profile) -> tuple[float, float]:
    """Solve (k_cal, platform_w) so the model reproduces the profile's two wall measurements.

    idle:   platform + sum over cores of deepest-idle power (at the lowest OPP voltage)
    stress: platform + sum over cores of leakage(Vmax) + k_cal * C * Vmax^2 * fmax
    """
    idle_cores = sum(deepest_sleep_w(prof, p, p.opps[0].volts) * len(p.cpus) for p in prof.policies)
    platform = prof.idle_w - idle_cores
    leak = sum(p.leakage_w_per_v * p.opps[-1].volts * len(p.cpus) for p in prof.policies)
    dyn = sum(p.dynamic_power_coefficient * 1e-6 * p.opps[-1].volts ** 2 * (p.opps[-1].khz / 1e3) * len(p.cpus)
              for p in prof.policies)
    k_cal = (prof.stress_w - platform - leak) / dyn
    return k_cal, platform


def read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise PowerError(f"{path}: not valid TOML: {e}") from None
    except OSError as e:
        raise PowerError(f"{path}: cannot read: {e.strerror}") from None


def default_boards_dir() -> Path:
    env = os.environ.get("APPLIANCE_BOARDS_DIR")
    if env:
        return Path(env)
    return REPO_BOARDS


def load_board_profile(board: str, boards_dir: Path | None = None) -> Profile:
    d = Path(boards_dir) if boards_dir else default_boards_dir()
    path = d / f"{board}.power.toml"
    if not path.is_file():
        known = sorted(p.name.removesuffix(".power.toml") for p in d.glob("*.power.toml"))
        raise PowerError(f"{path}: no power profile for board {board!r} (known: {', '.join(known) or 'none'}; "
                         f"set --boards-dir or APPLIANCE_BOARDS_DIR)")
    return parse_profile(read_toml(path), str(path))


def load_board_json(path: str | Path = DEFAULT_BOARD_JSON) -> Profile | None:
    """Device side: the merged board JSON written by the image builder. None if it has no "power"."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except OSError as e:
        raise PowerError(f"{p}: cannot read board file: {e.strerror} (use --board-json)") from None
    except json.JSONDecodeError as e:
        raise PowerError(f"{p}: not valid JSON: line {e.lineno}: {e.msg}") from None
    if not isinstance(data, dict):
        raise PowerError(f"{p}: expected a JSON object")
    power = data.get("power")
    if power is None:
        return None
    return parse_profile(power, f"{p} (key 'power')")
