"""Device CLI (`appliance-agent store`) and host CLI (`appliance-secure package`) end to end, as
provisioning uses them: separate processes, a SoftHSM2 token initialised by keygen."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from .conftest import make_softhsm, run_cli

AGENT, HOST = "appliance.secure.agent", "appliance.secure.cli"


@pytest.fixture
def device(tmp_path):
    hsm = make_softhsm(tmp_path / "hsm", [])
    env = dict(hsm["env"], APPLIANCE_PKCS11_MODULE="/usr/lib/softhsm/libsofthsm2.so",
               APPLIANCE_TOKEN_LABEL="appliance", APPLIANCE_PIN_FILE=hsm["pin_file"],
               APPLIANCE_STORE_DIR=str(tmp_path / "store"), APPLIANCE_VENDOR_KEY=str(tmp_path / "vendor.pem.pub"),
               APPLIANCE_BOARD_FILE=str(tmp_path / "board.json"))
    (tmp_path / "board.json").write_text(json.dumps({"name": "qemu-arm64", "secure": {}}))
    r = run_cli(HOST, ["vendor-key", str(tmp_path / "vendor.pem")])
    assert r.returncode == 0, r.stderr
    r = run_cli(AGENT, ["store", "keygen", "--init-softhsm"], env=env)
    assert r.returncode == 0, r.stderr
    (tmp_path / "dev.pub").write_text(r.stdout)
    return tmp_path, env, r.stdout


def package(tmp, data, version, out, board="qemu-arm64", extra=()):
    model = tmp / f"model-{version}.bin"
    model.write_bytes(data)
    r = run_cli(HOST, ["package", str(model), "--name", "det", "--version", version, "--board", board,
                       "--device-pubkey", str(tmp / "dev.pub"), "--signing-key", str(tmp / "vendor.pem"),
                       "-o", str(out), *extra])
    assert r.returncode == 0, r.stderr
    return out


def test_keygen_install_list_check_and_exit_codes(device):
    tmp, env, pem = device
    assert pem.startswith("-----BEGIN PUBLIC KEY-----")
    again = run_cli(AGENT, ["store", "keygen", "--init-softhsm"], env=env)
    assert again.returncode == 0 and again.stdout == pem  # idempotent: same key
    data = os.urandom(50000)
    p2 = package(tmp, data, "2.0.0", tmp / "v2.pkg")
    r = run_cli(AGENT, ["store", "install", str(p2)], env=env)
    assert (r.returncode, r.stdout.strip()) == (0, "installed det 2.0.0"), r.stderr
    r = run_cli(AGENT, ["store", "list", "--json"], env=env)
    [item] = json.loads(r.stdout)
    assert item["name"] == "det" and item["version"] == "2.0.0" and item["status"] == "ok"
    r = run_cli(AGENT, ["check", "det"], env=env)  # also works without the "store" word
    assert r.returncode == 0 and hashlib.sha256(data).hexdigest() in r.stdout
    refusals = [
        (package(tmp, data, "1.0.0", tmp / "v1.pkg"), 4, "older than version 2.0.0"),
        (package(tmp, data, "3.0.0", tmp / "rk.pkg", board="rk3588"), 5, "this device is qemu-arm64"),
    ]
    garbage = tmp / "garbage.pkg"
    garbage.write_bytes(b"nonsense")
    refusals.append((garbage, 10, "bad magic"))
    for path, code, text in refusals:
        r = run_cli(AGENT, ["store", "install", str(path)], env=env)
        assert r.returncode == code and text in r.stderr, r.stderr
        assert r.stderr.startswith("appliance-agent store: error: ") and r.stderr.count("\n") == 1
    bad_pin = tmp / "badpin"
    bad_pin.write_text("0000\n")
    r = run_cli(AGENT, ["store", "--pin-file", str(bad_pin), "list"], env=env)
    assert r.returncode == 8 and "rejected the PIN" in r.stderr
    r = run_cli(AGENT, ["store", "list", "--pin-file", str(bad_pin)], env=env)  # flag after the command
    assert r.returncode == 8 and "rejected the PIN" in r.stderr
    r = run_cli(AGENT, ["store", "--token-label", "nope", "list"], env=env)
    assert r.returncode == 7 and "no PKCS#11 token labelled 'nope'" in r.stderr


def test_host_cli_errors_are_one_line(tmp_path):
    r = run_cli(HOST, ["package", str(tmp_path / "missing.tflite"), "--name", "x", "--version", "1",
                       "--board", "b", "--device-pubkey", "p", "--signing-key", "k", "-o", str(tmp_path / "o")])
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "cannot read model" in r.stderr
    assert not (tmp_path / "o").exists()


def test_power_cut_mid_install_keeps_previous_version(device):
    """SIGKILL the installing process while it writes the new package: the old one must load."""
    tmp, env, _ = device
    old = os.urandom(4096)
    r = run_cli(AGENT, ["store", "install", str(package(tmp, old, "1.0.0", tmp / "v1.pkg"))], env=env)
    assert r.returncode == 0, r.stderr
    big = package(tmp, os.urandom(96 << 20), "1.1.0", tmp / "v2.pkg")
    models = tmp / "store" / "models"
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from appliance.secure.agent import main; "
                             "sys.exit(main(sys.argv[1:]))", "store", "install", str(big)], env=env)
    deadline = time.monotonic() + 60
    caught = None
    while time.monotonic() < deadline and proc.poll() is None:
        tmps = [p for p in models.iterdir() if p.name.endswith(".tmp")]
        if tmps:
            proc.send_signal(signal.SIGKILL)
            caught = tmps[0]
            break
        time.sleep(0.0005)
    proc.wait()
    assert caught is not None, "writer finished before it could be killed mid-write"
    assert caught.exists() and caught.stat().st_size < big.stat().st_size  # really cut mid-write
    r = run_cli(AGENT, ["store", "check", "det"], env=env)
    assert r.returncode == 0 and "ok det 1.0.0" in r.stdout and hashlib.sha256(old).hexdigest() in r.stdout
    # the next install cleans the stale temp file and succeeds
    r = run_cli(AGENT, ["store", "install", str(big)], env=env)
    assert r.returncode == 0 and not caught.exists()


def test_device_path_stays_light():
    """The device modules must not pull host code (appliance.image/provision), the tflite parser
    (the watermark is host side), matplotlib or pydantic into the device bundle."""
    code = ("import sys, appliance.secure.agent, appliance.secure.source, appliance.secure.store; "
            "sys.exit(appliance.secure.agent.main(['list', '--help']) and 0 or "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tflite', 'matplotlib', 'pydantic') "
            "or m.startswith(('appliance.image', 'appliance.provision', 'appliance.secure.watermark')))))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"
