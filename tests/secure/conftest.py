"""A real SoftHSM2 token store in a temp dir for the whole secure test session.

python-pkcs11 initialises the module once per process and SoftHSM reads SOFTHSM2_CONF and
its token list at C_Initialize, so every token the in-process tests need is created here,
before the first test touches PKCS#11. CLI tests run in subprocesses and may make their own.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
PIN = "1234"
TOKENS = ["dev-a", "dev-b", "dev-c", "dev-d"]


def make_softhsm(root: Path, labels, pin=PIN) -> dict:
    """Create a SoftHSM2 config + token dir under `root` and initialise `labels`."""
    assert shutil.which("softhsm2-util"), "softhsm2-util missing: run scripts/install-system-deps.sh"
    tokdir = root / "tokens"
    tokdir.mkdir(parents=True)
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokdir}\nobjectstore.backend = file\nlog.level = ERROR\n")
    env = dict(os.environ, SOFTHSM2_CONF=str(conf))
    for label in labels:
        subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", pin,
                        "--so-pin", "87654321"], env=env, check=True, capture_output=True)
    pin_file = root / "pin"
    pin_file.write_text(pin + "\n")
    return {"conf": str(conf), "pin_file": str(pin_file), "env": env}


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory):
    info = make_softhsm(tmp_path_factory.mktemp("softhsm"), TOKENS)
    old = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = info["conf"]
    yield info
    if old is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = old


@pytest.fixture
def token_config(softhsm):
    from appliance.secure.backend import TokenConfig
    return lambda label="dev-a", **kw: TokenConfig(module=MODULE, token_label=label, pin=PIN, **kw)


@pytest.fixture(scope="session")
def vendor_key():
    from cryptography.hazmat.primitives.asymmetric import ed25519
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture(scope="session")
def device_a(softhsm):
    from appliance.secure.backend import Pkcs11Backend, TokenConfig
    b = Pkcs11Backend(TokenConfig(module=MODULE, token_label="dev-a", pin=PIN))
    pem = b.ensure_device_key()
    yield b, pem
    b.close()


@pytest.fixture(scope="session")
def device_b(softhsm):
    from appliance.secure.backend import Pkcs11Backend, TokenConfig
    b = Pkcs11Backend(TokenConfig(module=MODULE, token_label="dev-b", pin=PIN))
    pem = b.ensure_device_key()
    yield b, pem
    b.close()


def run_cli(module: str, args, env=None, timeout=60):
    return subprocess.run([sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main(sys.argv[1:]))",
                           *args], env=env, capture_output=True, text=True, timeout=timeout)
