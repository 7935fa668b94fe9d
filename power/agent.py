"""`appliance-agent power run`: the on-device power manager.

Every `--interval` it samples per-policy utilisation (/proc/stat), the inference runtime's queue
depth and request rate (its Prometheus /metrics), and temperatures (/sys/class/thermal); feeds
a demand predictor; and sets the service policies' frequency with power/planner.py:
- `userspace` governor available: write scaling_setspeed;
- otherwise (intel_pstate, or no userspace governor built in): clamp scaling_min_freq to the
  planned floor over the running governor (schedutil) and scaling_max_freq to the thermal cap.
Queue growth is acted on in the same sample (no smoothing on the way up). After a quiet period
with no predicted demand it parks `idle_policy.park_cpus` (hotplug) and, if the profile allows,
suspends with an RTC alarm before the next predicted demand. Original settings (governor,
min/max/setspeed, online CPUs) are saved to a state file first and restored on exit, SIGTERM,
or an exception; a later start restores them too if a previous run was killed outright.
Without cpufreq (QEMU) it says so once and keeps observing.

Imports stay light (stdlib + numpy-free planning): this runs on the device.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from . import planner, predictor
from .errors import PowerError
from .model import domain_model
from .profile import DEFAULT_BOARD_JSON, Profile, load_board_json, load_board_profile
from .sysfs import Sysfs, atomic_write
from appliance.runtime.sdnotify import notify as sd_notify, watchdog_interval

PROG = "appliance-agent power"
log = logging.getLogger("appliance.power")

_QUEUE_RE = re.compile(r"^appliance_runtime_queue_depth(?:\{[^}]*\})?\s+([0-9.eE+-]+)", re.M)
_REQ_RE = re.compile(r"^appliance_runtime_requests_total(?:\{[^}]*\})?\s+([0-9.eE+-]+)", re.M)


def parse_metrics(text: str) -> tuple[float, float]:
    """(queue depth summed over models, requests counter summed over models and codes)."""
    q = sum(float(x) for x in _QUEUE_RE.findall(text))
    n = sum(float(x) for x in _REQ_RE.findall(text))
    return q, n


def fetch_metrics(url: str, timeout: float = 0.5) -> tuple[float, float] | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return parse_metrics(r.read().decode("utf-8", "replace"))
    except (OSError, ValueError):
        return None


@dataclass
class Sample:
    t: float
    util: dict[str, float]
    depth: float | None
    requests: float | None
    temps: dict[str, float]


@dataclass
class Decision:
    opp: int
    freq_khz: int
    cap_opp: int
    park: bool
    suspend_until: float | None


class Manager:
    """State + decisions; effects go through `Sysfs`. `step()` is one sampling interval."""

    def __init__(self, prof: Profile, fs: Sysfs, metrics_url: str | None, state_file: Path,
                 tun: planner.Tunables, predictor_name: str = "ewma", bin_s: float = 10.0,
                 dry_run: bool = False, clock=time.time):
        self.prof = prof
        self.fs = fs
        self.url = metrics_url or None
        self.state_file = state_file
        self.tun = tun
        self.dry_run = dry_run
        self.clock = clock
        self.bin_s = bin_s
        self.observe_only = prof.observe_only or not prof.policies
        self.mode = "observe"
        self.saved: dict | None = None
        self.prev_times: dict[int, tuple[int, int]] = {}
        self.prev_requests: float | None = None
        self.bin_start = clock()
        self.bin_count = 0.0
        self.pred = predictor.make(predictor_name, bin_s, 86400.0)
        self.last_activity = clock()
        self.parked = False
        self.cap_opp = 0
        self.metrics_warned = False
        self._avail: dict[str, list[int]] = {}
        self._written: dict[tuple[str, str], object] = {}
        self._failed: set[str] = set()
        self.suspend_failed = False
        if not self.observe_only:
            self.dm = domain_model(prof)
            self.cap_opp = len(self.dm.freqs) - 1
            missing = [p.name for p in prof.policies if not fs.has_cpufreq(p.name)]
            if len(missing) == len(prof.policies):
                log.warning("no cpufreq under %s (policies %s missing): observe-only mode",
                            fs.policy_dir("x").parent, ", ".join(missing))
                self.observe_only = True
            elif missing:
                raise PowerError(f"{fs.policy_dir(missing[0])}: cpufreq policy of the board profile is missing "
                                 f"(profile {prof.source} lists {', '.join(p.name for p in prof.policies)})")
        elif prof.observe_only:
            log.info("board profile %s is observe-only: not changing frequencies", prof.source)

    # ---------------------------------------------------------------- save / restore
    def _snapshot(self) -> dict:
        pols = {}
        for p in self.prof.policies:
            attrs = {}
            for a in ("scaling_governor", "scaling_min_freq", "scaling_max_freq", "scaling_setspeed"):
                path = self.fs.policy_dir(p.name) / a
                if path.is_file():
                    v = self.fs.read(path)
                    if a != "scaling_setspeed" or v.isdigit():
                        attrs[a] = v
            pols[p.name] = attrs
        online = {str(c): self.fs.is_online(c) for c in self.prof.idle_policy.park_cpus}
        return {"policies": pols, "online": online}

    def take_control(self) -> None:
        """Save originals (or adopt those a killed predecessor left in the state file), then
        switch governors."""
        if self.observe_only or self.dry_run:
            return
        if self.state_file.is_file():
            try:
                self.saved = json.loads(self.state_file.read_text())
                log.warning("found %s from a previous run that did not exit cleanly: restoring it first",
                            self.state_file)
                self.restore()
            except (OSError, json.JSONDecodeError):
                log.warning("ignoring unreadable state file %s", self.state_file)
        self.saved = self._snapshot()
        atomic_write(self.state_file, json.dumps(self.saved, indent=1))
        for name in self.prof.service.policies:
            if "userspace" in self.fs.governors(name):
                self.fs.policy_set(name, "scaling_governor", "userspace")
                self.mode = "userspace"
            else:
                self.mode = "clamp"
        log.info("controlling %s via %s", ", ".join(self.prof.service.policies),
                 "scaling_setspeed (userspace governor)" if self.mode == "userspace"
                 else "scaling_min_freq/scaling_max_freq clamps over the running governor")

    def restore(self) -> None:
        if not self.saved:
            return
        for name, attrs in self.saved.get("policies", {}).items():
            if not self.fs.policy_dir(name).is_dir():
                continue
            # Governor first (leaving userspace), then widen before narrowing so min <= max holds.
            order = ["scaling_governor", "scaling_max_freq", "scaling_min_freq", "scaling_setspeed"]
            for a in order:
                if a in attrs and (a != "scaling_setspeed" or attrs.get("scaling_governor") == "userspace"):
                    try:
                        self.fs.policy_set(name, a, attrs[a])
                    except PowerError as e:
                        log.error("restore: %s", e)
        for cpu, on in self.saved.get("online", {}).items():
            try:
                if on and not self.fs.is_online(int(cpu)):
                    self.fs.set_online(int(cpu), True)
            except PowerError as e:
                log.error("restore: %s", e)
        try:
            self.state_file.unlink()
        except FileNotFoundError:
            pass
        self.saved = None
        log.info("restored original cpufreq/hotplug settings")

    # ---------------------------------------------------------------- sampling
    def sample(self) -> Sample:
        now = self.clock()
        times = self.fs.cpu_times()
        util = {}
        for p in self.prof.policies:
            busy = tot = 0
            for c in p.cpus:
                if c in times and c in self.prev_times:
                    busy += times[c][0] - self.prev_times[c][0]
                    tot += times[c][1] - self.prev_times[c][1]
            util[p.name] = busy / tot if tot > 0 else 0.0
        self.prev_times = times
        depth = requests = None
        if self.url:
            m = fetch_metrics(self.url)
            if m is None:
                if not self.metrics_warned:
                    # Not an error in observe-only mode (nothing is planned from it).
                    log.log(logging.INFO if self.observe_only else logging.WARNING,
                            "runtime metrics at %s unreachable: planning from utilisation only", self.url)
                    self.metrics_warned = True
            else:
                depth, requests = m
        zones = self.prof.thermal.zones if self.prof.thermal else ()
        return Sample(now, util, depth, requests, self.fs.temperatures(zones))

    # ---------------------------------------------------------------- decisions (pure given state)
    def decide(self, s: Sample) -> Decision | None:
        new_req = 0.0
        if s.requests is not None:
            if self.prev_requests is not None and s.requests >= self.prev_requests:
                new_req = s.requests - self.prev_requests
            self.prev_requests = s.requests
        self.bin_count += new_req
        while s.t - self.bin_start >= self.bin_s:
            self.pred.observe(self.bin_count / self.bin_s)
            self.bin_count = 0.0
            self.bin_start += self.bin_s
        if self.observe_only:
            return None
        svc = self.prof.service
        depth = int(round(s.depth)) if s.depth is not None else 0
        rate = self.pred.predict()
        if s.requests is None:
            # No runtime metrics: infer a rate from the service cores' utilisation.
            u = max((s.util.get(n, 0.0) for n in svc.policies), default=0.0)
            f = self.dm.freqs[self.cap_opp]
            rate = max(rate, u / (svc.cycles / f + svc.mem_s))
        if depth > 0 or new_req > 0 or max(s.util.values(), default=0.0) > 0.5:
            self.last_activity = s.t
        temp = max(s.temps.values()) if s.temps else None
        self.cap_opp = planner.thermal_cap(temp, self.prof.thermal.limit_c, self.cap_opp, len(self.dm.freqs))
        opp = planner.choose_opp(self.dm, depth, rate, svc.cycles, svc.mem_s, svc.slo_s, self.tun, self.cap_opp)
        ip = self.prof.idle_policy
        sp = planner.plan_sleep(s.t - self.last_activity, rate, None, ip.quiet_period_s, ip.suspend_allowed,
                                ip.max_sleep_s, self.tun.quiet_rate, ip.resume_latency_s)
        return Decision(opp=opp, freq_khz=int(round(self.dm.freqs[opp] / 1e3)), cap_opp=self.cap_opp,
                        park=sp.park, suspend_until=(s.t + sp.wake_after_s) if sp.suspend else None)

    # ---------------------------------------------------------------- effects
    def _snap(self, policy: str, khz: int) -> int:
        """The kernel's table can differ from the profile (a board DT may drop OPPs): use the
        lowest available frequency at or above the plan, else the highest available."""
        path = self.fs.policy_dir(policy) / "scaling_available_frequencies"
        if policy not in self._avail:
            try:
                self._avail[policy] = sorted(int(x) for x in self.fs.read(path).split())
            except (OSError, ValueError):
                self._avail[policy] = []
        avail = self._avail[policy]
        if not avail or khz in avail:
            return khz
        return next((f for f in avail if f >= khz), avail[-1])

    def _set(self, policy: str, attr: str, value) -> None:
        """Write only on change (each write is a driver call), and keep running if the kernel
        refuses one: log each distinct failure once."""
        key = (policy, attr)
        if self._written.get(key) == value:
            return
        try:
            self.fs.policy_set(policy, attr, value)
            self._written[key] = value
        except PowerError as e:
            if str(e) not in self._failed:
                self._failed.add(str(e))
                log.error("%s", e)

    def apply(self, d: Decision) -> None:
        if self.dry_run or d is None:
            return
        cap_khz = int(round(self.dm.freqs[d.cap_opp] / 1e3))
        for name in self.prof.service.policies:
            if self.mode == "userspace":
                self._set(name, "scaling_setspeed", self._snap(name, d.freq_khz))
            else:
                # Raise max before min so the kernel never sees min > max.
                self._set(name, "scaling_max_freq", cap_khz)
                self._set(name, "scaling_min_freq", min(cap_khz, self._snap(name, d.freq_khz)))
        # Thermal cap on the other policies too: they share the package.
        for p in self.prof.policies:
            if p.name not in self.prof.service.policies:
                top = p.opps[-1].khz if d.cap_opp == len(self.dm.freqs) - 1 else \
                    max(o.khz for o in p.opps if o.khz <= max(p.opps[0].khz, cap_khz))
                self._set(p.name, "scaling_max_freq", top)
        park = [c for c in self.prof.idle_policy.park_cpus if c != 0]
        if d.park != self.parked and park:
            try:
                for c in park:
                    self.fs.set_online(c, not d.park)
                log.info("%s CPUs %s", "parked" if d.park else "unparked", park)
            except PowerError as e:
                log.error("hotplug: %s", e)
            self.parked = d.park
        if d.suspend_until is not None and not self.suspend_failed:
            log.info("suspending until %s (RTC alarm)", time.strftime("%H:%M:%S", time.localtime(d.suspend_until)))
            try:
                if self.prof.idle_policy.wake_on_lan:
                    armed = self.fs.arm_wake_on_lan()
                    if not armed:
                        log.warning("wake_on_lan: no network device with a power/wakeup control; "
                                    "only the RTC alarm will wake the box")
                self.fs.suspend_with_alarm(int(d.suspend_until))
            except PowerError as e:
                # The profile allowed it but this kernel/firmware refuses: stop trying.
                log.error("suspend failed, not trying again: %s", e)
                self.suspend_failed = True
            self.last_activity = self.clock()  # after resume, a fresh quiet period

    def step(self) -> Decision | None:
        d = self.decide(self.sample())
        self.apply(d)
        return d


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description="On-device power manager (DVFS, sleep, thermal).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the manager (until SIGTERM)")
    r.add_argument("--board-json", default=os.environ.get("APPLIANCE_BOARD_JSON", DEFAULT_BOARD_JSON),
                   help="merged board file with key 'power' (default %(default)s)")
    r.add_argument("--board", default=None, help="host testing: read boards/NAME.power.toml instead")
    r.add_argument("--boards-dir", type=Path, default=None)
    r.add_argument("--sysfs-root", type=Path, default=Path(os.environ.get("APPLIANCE_SYSFS_ROOT", "/sys")))
    r.add_argument("--procfs-root", type=Path, default=Path(os.environ.get("APPLIANCE_PROCFS_ROOT", "/proc")))
    r.add_argument("--metrics-url", default="http://127.0.0.1:8500/metrics", help="runtime /metrics ('' = none)")
    r.add_argument("--state-file", type=Path, default=Path("/run/appliance-power/saved.json"))
    r.add_argument("--interval", type=float, default=0.02,
                   help="seconds between samples (simulated: 10-50 ms change SLO misses by <0.2%%)")
    r.add_argument("--iterations", type=int, default=0, help="stop after N samples (0 = run until SIGTERM)")
    r.add_argument("--headroom", type=float, default=planner.Tunables.headroom)
    r.add_argument("--target-util", type=float, default=planner.Tunables.target_util)
    r.add_argument("--predictor", default="ewma", choices=["ewma", "seasonal", "max"],
                   help="demand predictor (default: ewma, the best measured by benchmarks/power_savings.py)")
    r.add_argument("--dry-run", action="store_true", help="decide and log, change nothing")
    r.add_argument("-v", "--verbose", action="store_true")
    return ap


class _Terminated(Exception):
    pass


def _terminate(signum, frame):
    raise _Terminated()


def run(a) -> int:
    if a.board:
        prof = load_board_profile(a.board, a.boards_dir)
    else:
        prof = load_board_json(a.board_json)
        if prof is None:
            raise PowerError(f"{a.board_json}: no 'power' key: this board has no power profile "
                             f"(add boards/NAME.power.toml, or pass --board)")
    if a.interval <= 0:
        raise PowerError(f"--interval must be > 0, got {a.interval}")
    tun = planner.Tunables(headroom=a.headroom, target_util=a.target_util, interval_s=a.interval)
    fs = Sysfs(a.sysfs_root, a.procfs_root)
    mgr = Manager(prof, fs, a.metrics_url, a.state_file, tun, a.predictor, dry_run=a.dry_run)
    old = signal.signal(signal.SIGTERM, _terminate)
    try:
        mgr.take_control()
        interval = a.interval
        if mgr.observe_only:
            interval = max(interval, 1.0)  # nothing to control: sample slowly, cost ~nothing
        log.info("running: board %s, %s, interval %.3f s", prof.name,
                 "observe-only" if mgr.observe_only else f"mode {mgr.mode}", interval)
        # Under systemd (Type=notify, WatchdogSec=): ready once in control, then a ping per loop
        # turn at most every half watchdog period; a wedged loop stops pinging and is restarted.
        sd_notify("READY=1", f"STATUS={'observe-only' if mgr.observe_only else mgr.mode}")
        pet_every, last_pet = watchdog_interval(), 0.0
        i = 0
        while a.iterations == 0 or i < a.iterations:
            if pet_every is not None and time.monotonic() - last_pet >= pet_every:
                sd_notify("WATCHDOG=1")
                last_pet = time.monotonic()
            d = mgr.step()
            if d is not None:
                log.debug("opp %d (%d kHz) cap %d park %s", d.opp, d.freq_khz, d.cap_opp, d.park)
            i += 1
            if a.iterations == 0 or i < a.iterations:
                time.sleep(interval)
    except _Terminated:
        log.info("SIGTERM: stopping")
    finally:
        mgr.restore()
        signal.signal(signal.SIGTERM, old)
    return 0


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(a)
    except PowerError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
