"""The power daemon against a fake sysfs/procfs tree.

Why a fake tree: this host (and CI) is an x86 VM without a usable cpufreq driver, an RK3588,
thermal zones we could heat, or an RTC we may suspend with. The daemon only does file I/O on
those kernel interfaces, so a temporary directory laid out like /sys and /proc exercises the
real code paths; the runtime metrics come from a real HTTP server on 127.0.0.1.
"""
from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from appliance.power import agent, planner
from appliance.power.profile import load_board_profile
from appliance.power.sysfs import Sysfs

REPO = Path(__file__).resolve().parents[2]


def make_tree(root: Path, prof, governors="performance powersave schedutil userspace", governor="schedutil",
              temps=None, ncpu=8) -> Sysfs:
    sysfs, procfs = root / "sys", root / "proc"
    for p in prof.policies:
        d = sysfs / "devices/system/cpu/cpufreq" / p.name
        d.mkdir(parents=True)
        files = {"scaling_governor": governor, "scaling_available_governors": governors,
                 "scaling_min_freq": p.opps[0].khz, "scaling_max_freq": p.opps[-1].khz,
                 "cpuinfo_min_freq": p.opps[0].khz, "cpuinfo_max_freq": p.opps[-1].khz,
                 "scaling_setspeed": "<unsupported>",
                 "scaling_available_frequencies": " ".join(str(o.khz) for o in p.opps)}
        for k, v in files.items():
            (d / k).write_text(f"{v}\n")
    for c in range(ncpu):
        d = sysfs / f"devices/system/cpu/cpu{c}"
        d.mkdir(parents=True, exist_ok=True)
        if c:
            (d / "online").write_text("1\n")
    for i, (typ, t) in enumerate((temps or {}).items()):
        z = sysfs / f"class/thermal/thermal_zone{i}"
        z.mkdir(parents=True)
        (z / "type").write_text(typ + "\n")
        (z / "temp").write_text(f"{int(t * 1000)}\n")
    (sysfs / "class/rtc/rtc0").mkdir(parents=True)
    (sysfs / "class/rtc/rtc0/wakealarm").write_text("\n")
    (sysfs / "power").mkdir(parents=True)
    (sysfs / "power/state").write_text("freeze mem disk\n")
    procfs.mkdir(parents=True)
    write_stat(procfs, [(0, 0)] * ncpu)
    return Sysfs(sysfs, procfs)


def write_stat(procfs: Path, per_cpu: list[tuple[int, int]]) -> None:
    """per_cpu[i] = (busy, idle) jiffies."""
    lines = ["cpu  0 0 0 0 0 0 0 0 0 0"]
    for i, (busy, idle) in enumerate(per_cpu):
        lines.append(f"cpu{i} {busy} 0 0 {idle} 0 0 0 0 0 0")
    (procfs / "stat").write_text("\n".join(lines) + "\n")


def pol(fs: Sysfs, name: str, attr: str) -> str:
    return fs.policy_get(name, attr)


class Metrics:
    """A real HTTP /metrics endpoint in the runtime's format, values set by the test."""

    def __init__(self):
        self.depth = 0
        self.requests = 0
        outer = self

        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = ("# TYPE appliance_runtime_queue_depth gauge\n"
                        f'appliance_runtime_queue_depth{{model="m"}} {outer.depth}\n'
                        "# TYPE appliance_runtime_requests_total counter\n"
                        f'appliance_runtime_requests_total{{code="200",model="m"}} {outer.requests}\n').encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.srv.server_port}/metrics"
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def close(self):
        self.srv.shutdown()
        self.srv.server_close()


@pytest.fixture
def metrics():
    m = Metrics()
    yield m
    m.close()


class Clock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


def manager(tmp_path, prof, fs, url=None, clock=None, **kw):
    return agent.Manager(prof, fs, url, tmp_path / "state/saved.json", planner.Tunables(), "ewma",
                         clock=clock or Clock(), **kw)


def test_parse_metrics_sums_models():
    text = ('appliance_runtime_queue_depth{model="a"} 2.0\nappliance_runtime_queue_depth{model="b"} 3.0\n'
            'appliance_runtime_requests_total{code="200",model="a"} 10.0\n'
            'appliance_runtime_requests_total{code="429",model="a"} 5.0\n'
            'appliance_runtime_requests_created{code="200",model="a"} 1.7e9\n')
    assert agent.parse_metrics(text) == (5.0, 15.0)


def test_userspace_ramps_at_once_on_queue_growth_and_restores(tmp_path, metrics):
    prof = load_board_profile("rk3588")
    fs = make_tree(tmp_path, prof)
    m = manager(tmp_path, prof, fs, metrics.url)
    m.take_control()
    assert m.mode == "userspace"
    assert pol(fs, "policy4", "scaling_governor") == "userspace"
    assert json.loads((tmp_path / "state/saved.json").read_text())["policies"]["policy4"]["scaling_governor"] == "schedutil"
    m.step()
    assert pol(fs, "policy4", "scaling_setspeed") == "1200000"   # empty queue: lowest OPP
    metrics.depth = 6                                             # a burst queues up
    m.clock.t += 0.05
    m.step()
    assert pol(fs, "policy4", "scaling_setspeed") == "2400000"   # same sample: straight to the top
    assert pol(fs, "policy6", "scaling_setspeed") == "2400000"   # both A76 clusters in lock-step
    assert pol(fs, "policy0", "scaling_governor") == "schedutil"  # A55 left to the kernel
    metrics.depth = 2
    m.clock.t += 0.05
    m.step()
    assert 1200000 < int(pol(fs, "policy4", "scaling_setspeed")) < 2400000
    m.restore()
    assert pol(fs, "policy4", "scaling_governor") == "schedutil"
    assert pol(fs, "policy4", "scaling_max_freq") == "2400000"
    assert not (tmp_path / "state/saved.json").exists()


def test_clamp_mode_without_userspace_governor(tmp_path, metrics):
    # intel_pstate offers only performance/powersave: clamp scaling_min_freq / scaling_max_freq.
    prof = load_board_profile("x86-mini")
    fs = make_tree(tmp_path, prof, governors="performance powersave", governor="powersave", ncpu=4)
    m = manager(tmp_path, prof, fs, metrics.url)
    m.take_control()
    assert m.mode == "clamp"
    metrics.depth = 5
    m.step()
    assert pol(fs, "policy2", "scaling_min_freq") == "3400000"
    metrics.depth = 0
    m.clock.t += 0.05
    m.step()
    lo = int(pol(fs, "policy2", "scaling_min_freq"))
    assert lo < 3400000 and pol(fs, "policy2", "scaling_max_freq") == "3400000"
    assert pol(fs, "policy2", "scaling_governor") == "powersave"  # governor never switched
    m.restore()
    assert pol(fs, "policy2", "scaling_min_freq") == "700000"


def test_thermal_cap_throttles_before_the_kernel(tmp_path, metrics):
    prof = load_board_profile("rk3588")
    fs = make_tree(tmp_path, prof, temps={"bigcore0-thermal": 82.0, "soc-thermal": 30.0})
    m = manager(tmp_path, prof, fs, metrics.url)
    m.take_control()
    metrics.depth = 10
    seen = []
    for _ in range(3):
        m.step()
        m.clock.t += 0.05
        seen.append(int(pol(fs, "policy4", "scaling_setspeed")))
    # 82 C >= limit 80 C (kernel's passive trip is 85 C): one OPP lower per sample despite the queue.
    assert seen == [2208000, 2016000, 1800000]
    assert int(pol(fs, "policy0", "scaling_max_freq")) <= 1800000  # A55 capped too
    (fs.sysfs_root / "class/thermal/thermal_zone0/temp").write_text("60000\n")
    m.step()
    assert int(pol(fs, "policy4", "scaling_setspeed")) == 2016000  # cooled: back up one step
    m.restore()


def test_park_after_quiet_period_then_suspend_plan(tmp_path, metrics):
    prof = load_board_profile("x86-mini")   # suspend allowed, parks cpu2, cpu3
    fs = make_tree(tmp_path, prof, governors="performance powersave", governor="powersave", ncpu=4)
    clk = Clock()
    nic = fs.sysfs_root / "class/net/enp1s0/device/power"
    nic.mkdir(parents=True)
    (nic / "wakeup").write_text("disabled\n")
    (fs.sysfs_root / "class/net/lo").mkdir()            # virtual: no device/, left alone
    m = manager(tmp_path, prof, fs, metrics.url, clock=clk)
    m.take_control()
    m.step()
    assert fs.read(fs.cpu_online(2)) == "1"
    clk.t += 61.0                        # quiet for longer than quiet_period_s (60 s)
    m.step()
    assert fs.read(fs.cpu_online(2)) == "0" and fs.read(fs.cpu_online(3)) == "0"
    # rtcwake-equivalent writes: alarm = now + max_sleep_s, then "mem" to /sys/power/state.
    assert int(fs.read(fs.wakealarm())) == int(clk.t + prof.idle_policy.max_sleep_s)
    assert fs.read(fs.power_state()) == "mem"
    assert fs.read(nic / "wakeup") == "enabled"          # wake-on-LAN armed before suspending
    metrics.depth, metrics.requests = 3, 3   # demand returns
    clk.t += 1.0
    m.step()
    assert fs.read(fs.cpu_online(2)) == "1"
    m.restore()


def test_rk3588_never_suspends(tmp_path, metrics):
    prof = load_board_profile("rk3588")
    fs = make_tree(tmp_path, prof)
    clk = Clock()
    m = manager(tmp_path, prof, fs, metrics.url, clock=clk)
    m.take_control()
    m.step()
    clk.t += 120
    d = m.step()
    assert d.park and d.suspend_until is None
    assert fs.read(fs.power_state()) == "freeze mem disk"
    assert fs.read(fs.cpu_online(6)) == "0"
    m.restore()
    assert fs.read(fs.cpu_online(6)) == "1"      # restore brings parked CPUs back


def test_utilisation_from_proc_stat_without_metrics(tmp_path):
    prof = load_board_profile("rk3588")
    fs = make_tree(tmp_path, prof)
    m = manager(tmp_path, prof, fs, None)
    m.take_control()
    m.step()
    write_stat(fs.procfs_root, [(10, 90)] * 4 + [(95, 5)] * 4)  # A76 95% busy
    m.clock.t += 0.05
    d = m.step()
    assert m.prev_times and d.opp > 0
    assert int(pol(fs, "policy4", "scaling_setspeed")) > 1200000
    m.restore()


def run_agent(tmp_path, *args, board="rk3588", env=None, **kw):
    env = dict(env or os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-c", "import sys; from appliance.power.agent import main; sys.exit(main(sys.argv[1:]))",
           "run", "--board", board, "--sysfs-root", str(tmp_path / "sys"), "--procfs-root", str(tmp_path / "proc"),
           "--state-file", str(tmp_path / "state/saved.json"), "--metrics-url", "", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def wait_for(pred, timeout=20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_sigterm_restores(tmp_path):
    prof = load_board_profile("rk3588")
    fs = make_tree(tmp_path, prof)
    p = run_agent(tmp_path, "--interval", "0.05")
    try:
        assert wait_for(lambda: pol(fs, "policy4", "scaling_governor") == "userspace")
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=20)
    finally:
        p.kill()
    assert p.returncode == 0, err
    assert pol(fs, "policy4", "scaling_governor") == "schedutil"
    assert pol(fs, "policy6", "scaling_governor") == "schedutil"
    assert "restored original" in err and "Traceback" not in err


def test_killed_run_is_restored_by_the_next_start(tmp_path):
    prof = load_board_profile("rk3588")
    fs = make_tree(tmp_path, prof)
    p = run_agent(tmp_path, "--interval", "0.05")
    try:
        assert wait_for(lambda: pol(fs, "policy4", "scaling_governor") == "userspace")
        p.send_signal(signal.SIGKILL)       # no chance to clean up
        p.wait(timeout=10)
    finally:
        p.kill()
    assert pol(fs, "policy4", "scaling_governor") == "userspace"
    assert (tmp_path / "state/saved.json").is_file()
    q = run_agent(tmp_path, "--interval", "0.01", "--iterations", "2")
    _, err = q.communicate(timeout=30)
    assert q.returncode == 0, err
    assert "did not exit cleanly" in err
    assert pol(fs, "policy4", "scaling_governor") == "schedutil"  # the original, not "userspace"
    assert not (tmp_path / "state/saved.json").exists()


def test_observe_only_without_cpufreq(tmp_path, caplog):
    # A tree with /proc/stat but no cpufreq directory, as in QEMU.
    (tmp_path / "sys").mkdir()
    (tmp_path / "proc").mkdir()
    write_stat(tmp_path / "proc", [(1, 1)] * 8)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    p = run_agent(tmp_path, "--interval", "0.01", "--iterations", "2")
    _, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert err.count("no cpufreq under") == 1 and "observe-only" in err
    assert sorted(str(x) for x in tmp_path.rglob("*")) == before   # nothing written


def test_qemu_board_json_observe_only(tmp_path):
    bj = tmp_path / "board.json"
    from appliance.power.profile import read_toml
    bj.write_text(json.dumps({"name": "qemu-arm64", "power": read_toml(REPO / "boards/qemu-arm64.power.toml")}))
    (tmp_path / "proc").mkdir()
    write_stat(tmp_path / "proc", [(1, 1)] * 2)
    rc = agent.main(["run", "--board-json", str(bj), "--sysfs-root", str(tmp_path / "sys"),
                     "--procfs-root", str(tmp_path / "proc"), "--metrics-url", "",
                     "--state-file", str(tmp_path / "s.json"), "--interval", "0.01", "--iterations", "2"])
    assert rc == 0


def test_bad_board_json_one_line_error(tmp_path, capsys):
    bj = tmp_path / "board.json"
    bj.write_text(json.dumps({"power": {"name": "x", "policies": []}}))
    assert agent.main(["run", "--board-json", str(bj), "--iterations", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"appliance-agent power: error: {bj} (key 'power'): field 'policies'")
    assert "\n" not in err
    assert agent.main(["run", "--board-json", str(tmp_path / "missing.json"), "--iterations", "1"]) == 2
    assert "cannot read board file" in capsys.readouterr().err


def test_daemon_imports_stay_light():
    code = ("import sys; import appliance.power.agent; "
            "bad = [m for m in ('matplotlib', 'appliance.image', 'appliance.provision', 'pydantic') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(REPO)),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_snaps_to_the_kernels_available_frequencies(tmp_path, metrics):
    # A board DT that dropped 1.2 GHz from cluster1: the plan (lowest OPP) must become 1.416 GHz.
    prof = load_board_profile("rk3588")
    fs = make_tree(tmp_path, prof)
    for name in ("policy4", "policy6"):
        fs.policy_set(name, "scaling_available_frequencies", "1416000 1608000 1800000 2016000 2208000 2400000")
    m = manager(tmp_path, prof, fs, metrics.url)
    m.take_control()
    m.step()
    assert pol(fs, "policy4", "scaling_setspeed") == "1416000"
    m.restore()


def test_dispatch_through_appliance_agent(tmp_path):
    # The runtime area's multi-call executable hands `power ...` to appliance.power.agent:main.
    (tmp_path / "proc").mkdir()
    write_stat(tmp_path / "proc", [(1, 1)] * 2)
    r = subprocess.run([str(Path(sys.executable).parent / "appliance-agent"), "power", "run", "--board", "qemu-arm64",
                        "--sysfs-root", str(tmp_path / "sys"), "--procfs-root", str(tmp_path / "proc"),
                        "--metrics-url", "", "--state-file", str(tmp_path / "s.json"),
                        "--interval", "0.01", "--iterations", "2"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "observe-only" in r.stderr and "Traceback" not in r.stderr


def test_refused_writes_are_logged_once_and_the_daemon_keeps_going(tmp_path, metrics, caplog):
    prof = load_board_profile("x86-mini")
    fs = make_tree(tmp_path, prof, governors="performance powersave", governor="powersave", ncpu=4)
    clk = Clock()
    m = manager(tmp_path, prof, fs, metrics.url, clock=clk)
    m.take_control()
    # /sys/power/state that cannot be written (a directory in its place): suspend refused.
    (fs.sysfs_root / "power/state").unlink()
    (fs.sysfs_root / "power/state").mkdir()
    m.step()
    clk.t += 61.0
    m.step()
    clk.t += 61.0
    m.step()
    assert m.suspend_failed
    assert sum("suspend failed" in r.message for r in caplog.records) == 1
    metrics.depth = 4
    clk.t += 1.0
    m.step()                                   # still controlling frequencies afterwards
    assert pol(fs, "policy0", "scaling_min_freq") == "3400000"
    m.restore()


def test_run_tells_systemd_ready_and_pets_the_watchdog(tmp_path):
    """The unit is Type=notify with WatchdogSec=: the agent must send READY=1 once in control
    and WATCHDOG=1 from its loop (a real datagram socket stands in for systemd's)."""
    import socket as _socket

    prof = load_board_profile("rk3588")
    make_tree(tmp_path, prof)
    sock_path = tmp_path / "notify.sock"
    srv = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
    srv.bind(str(sock_path))
    srv.settimeout(20)
    try:
        env = dict(os.environ, NOTIFY_SOCKET=str(sock_path), WATCHDOG_USEC="40000")
        p = run_agent(tmp_path, "--interval", "0.01", "--iterations", "20", env=env)
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        msgs = []
        srv.settimeout(0.5)
        while True:
            try:
                msgs.append(srv.recv(4096).decode())
            except (TimeoutError, _socket.timeout):
                break
    finally:
        srv.close()
    assert msgs and msgs[0].startswith("READY=1")
    assert sum(m == "WATCHDOG=1" for m in msgs) >= 2   # 20 turns of 10 ms, a ping every 20 ms
