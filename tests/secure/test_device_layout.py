"""The secure store as the image lays it out, on the host: the image's own templates
(softhsm2.conf, tmpfiles.d, the units) rendered, /data relocated into a temp dir, the real
`systemd-tmpfiles`, SoftHSM2 and `appliance-agent store` CLI. First-boot init runs as root
(as appliance-store-init.service does); the runtime side then runs as an unprivileged user
in group softhsm, as the runtime unit's DynamicUser does, with the PIN copied the way
LoadCredential= hands it over. Root is needed to switch users: CI runs as root."""
import grp
import hashlib
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from appliance.secure import agent as secure_agent
from appliance.secure.fsutil import share_with_group

from .conftest import run_cli

REPO = Path(__file__).resolve().parents[2]
BOARD = "qemu-arm64"
AGENT = "appliance.secure.agent"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching to an unprivileged user needs root (CI is root)")


def rendered_rootfs(dest: Path) -> Path:
    from appliance.image.config import make_config
    from appliance.image.customise import template_context
    from appliance.image.templates_render import render_tree

    cfg = make_config(BOARD, profile="debug", boards_dir=REPO / "boards")
    render_tree("rootfs", dest, template_context(cfg, {}, agent=True))
    return dest


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory):
    return rendered_rootfs(tmp_path_factory.mktemp("rootfs"))


def unit(rootfs: Path, name: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in (rootfs / "etc/systemd/system" / name).read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            k, _, v = line.partition("=")
            out.setdefault(k.strip(), []).append(v.strip())
    return out


def test_templates_agree_with_the_agent_defaults(rootfs):
    """One layout: what the templates create and configure is where the agent looks by default."""
    conf = (rootfs / "etc/appliance/softhsm2.conf")
    assert str(conf) .endswith(secure_agent.DEFAULT_TOKEN_CONFIG)
    tokendir = secure_agent.softhsm_tokendir(str(conf))
    assert tokendir == "/data/secure/tokens"
    tmpfiles = (rootfs / "etc/tmpfiles.d/appliance-store.conf").read_text()
    made = {f.split()[1]: f.split()[2:5] for f in tmpfiles.splitlines() if f.startswith("d ")}
    store = secure_agent.DEFAULTS["APPLIANCE_STORE_DIR"]
    assert made[tokendir] == ["2750", "root", "softhsm"]
    assert made[store] == ["2750", "root", "softhsm"] and made[store + "/models"] == ["2750", "root", "softhsm"]
    pin = secure_agent.DEFAULTS["APPLIANCE_PIN_FILE"]
    assert os.path.dirname(pin) in made and pin.startswith("/data/")

    init = unit(rootfs, "appliance-store-init.service")
    assert any("store keygen --init-softhsm --create-pin" in c for c in init["ExecStart"])
    rt = unit(rootfs, "appliance-runtime.service")
    assert "appliance-store-init.service" in rt["Requires"][0] and "appliance-store-init.service" in rt["After"][0]
    assert f"--store-dir {store}" in rt["ExecStart"][0]
    assert rt["DynamicUser"] == ["yes"] and rt["SupplementaryGroups"] == ["softhsm"]
    assert rt["LoadCredential"] == [f"token.pin:{pin}"]
    env = " ".join(rt["Environment"])
    assert f"SOFTHSM2_CONF={secure_agent.DEFAULT_TOKEN_CONFIG}" in env and "APPLIANCE_PIN_FILE=%d/token.pin" in env
    from appliance.runtime.config import MALLOC_TUNABLES
    assert f"GLIBC_TUNABLES={MALLOC_TUNABLES}" in env.split()
    assert "/data/secure" in rt["ReadOnlyPaths"][0].split()
    assert "ReadWritePaths" not in rt and rt["CapabilityBoundingSet"] == [""]
    # No vendor key in the build: nothing rendered (the runtime then disables the store).
    assert not (rootfs / "etc/appliance/vendor-ed25519.pub").exists()


def test_vendor_key_template_renders_the_key_when_given(tmp_path):
    from appliance.image.templates_render import render_tree
    pem = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA" + "A" * 43 + "=\n-----END PUBLIC KEY-----\n"
    from appliance.image.config import make_config
    from appliance.image.customise import template_context
    ctx = template_context(make_config(BOARD, boards_dir=REPO / "boards"), {}, agent=True)
    render_tree("rootfs", tmp_path, {**ctx, "vendor_public_key": pem})
    assert (tmp_path / "etc/appliance/vendor-ed25519.pub").read_text().strip() == pem.strip()


def test_create_pin_is_random_0600_and_written_once(tmp_path):
    p = tmp_path / "sub" / "token.pin"
    assert secure_agent.create_pin(str(p)) is True
    first = p.read_text()
    assert re.fullmatch(r"[0-9a-f]{32}\n", first)
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert secure_agent.create_pin(str(p)) is False and p.read_text() == first
    q = tmp_path / "other.pin"
    secure_agent.create_pin(str(q))
    assert q.read_text() != first


def test_share_with_group_grants_read_only_and_needs_the_opt_in(tmp_path):
    d = tmp_path / "tok"
    (d / "sub").mkdir(parents=True)
    f = d / "sub" / "a.object"
    f.write_bytes(b"x")
    os.chmod(f, 0o600)
    os.chmod(d / "sub", 0o700)
    for mode in (0o700, 0o755, 0o2700):  # not opted in (no setgid, or no group read): nothing changes
        os.chmod(d, mode)
        assert share_with_group(d) == 0 and stat.S_IMODE(f.stat().st_mode) == 0o600
    os.chmod(d, 0o2750)
    assert share_with_group(d) > 0
    assert stat.S_IMODE(f.stat().st_mode) == 0o640
    assert stat.S_IMODE((d / "sub").stat().st_mode) == 0o750
    assert share_with_group(d) == 0  # idempotent


def _as_user(cmd, env, groups: list[int]):
    nobody = pwd.getpwnam("nobody")
    pre = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}",
           "--groups=" + ",".join(map(str, groups)) if groups else "--clear-groups"]
    return subprocess.run(pre + cmd, env=env, capture_output=True, text=True, timeout=120)


@needs_root
def test_first_boot_init_then_unprivileged_runtime_reads_the_store(rootfs):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from appliance.runtime.tinymodels import fully_connected_f32
    from appliance.secure import envelope

    assert shutil.which("systemd-tmpfiles") and shutil.which("setpriv"), "systemd / util-linux missing"
    softhsm_gid = grp.getgrnam("softhsm").gr_gid  # made by Debian's softhsm2-common, as in the image
    # Under /tmp, not pytest's 0700 tmp dir: the unprivileged user must be able to reach it.
    base = Path(tempfile.mkdtemp(prefix="appliance-layout-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        data = base / "data"
        data.mkdir()
        reloc = lambda text: text.replace("/data/", f"{data}/")  # noqa: E731
        conf = base / "softhsm2.conf"
        conf.write_text(reloc((rootfs / "etc/appliance/softhsm2.conf").read_text()))
        tmpfiles = base / "appliance-store.conf"
        tmpfiles.write_text(reloc((rootfs / "etc/tmpfiles.d/appliance-store.conf").read_text()))
        subprocess.run(["systemd-tmpfiles", "--create", str(tmpfiles)], check=True, capture_output=True)
        tokendir = data / "secure/tokens"
        assert tokendir.stat().st_gid == softhsm_gid and stat.S_IMODE(tokendir.stat().st_mode) == 0o2750

        vendor = ed25519.Ed25519PrivateKey.generate()
        vkey = base / "vendor.pub"
        vkey.write_bytes(vendor.public_key().public_bytes(serialization.Encoding.PEM,
                                                         serialization.PublicFormat.SubjectPublicKeyInfo))
        pin_file = data / "secure/token.pin"
        env = dict(os.environ, SOFTHSM2_CONF=str(conf), APPLIANCE_PIN_FILE=str(pin_file),
                   APPLIANCE_STORE_DIR=str(data / "secure/store"), APPLIANCE_BOARD=BOARD,
                   APPLIANCE_VENDOR_KEY=str(vkey), APPLIANCE_TOKEN_LABEL="appliance")
        init = ["keygen", "--init-softhsm", "--create-pin", "--quiet"]  # the init unit's command
        r = run_cli(AGENT, init, env=env)
        assert r.returncode == 0 and r.stdout == "", r.stderr
        pin = pin_file.read_text()
        assert stat.S_IMODE(pin_file.stat().st_mode) == 0o600 and pin_file.stat().st_uid == 0
        r = run_cli(AGENT, init, env=env)  # every boot: nothing changes
        assert r.returncode == 0, r.stderr
        assert pin_file.read_text() == pin
        shown = subprocess.run(["softhsm2-util", "--show-slots"], env=env, capture_output=True, text=True).stdout
        assert len(re.findall(r"Label:\s+appliance\s*$", shown, re.M)) == 1
        r = run_cli(AGENT, ["keygen"], env=env)
        assert r.returncode == 0 and r.stdout.startswith("-----BEGIN PUBLIC KEY-----"), r.stderr
        pem = r.stdout.encode()

        model = fully_connected_f32(16, 4, seed=3)
        m = envelope.Manifest("tiny", "1.0.0", hashlib.sha256(model).hexdigest(), len(model), (BOARD,), None)
        pkg = base / "tiny.pkg"
        pkg.write_bytes(envelope.build_package(model, m, vendor, pem))
        r = run_cli(AGENT, ["install", str(pkg)], env=env)  # root, over SSH or the console
        assert r.returncode == 0 and r.stdout.strip() == "installed tiny 1.0.0", r.stderr

        # What the runtime may touch: group softhsm reads everything, nobody writes, others see nothing.
        for p in [tokendir, *tokendir.rglob("*"), *(data / "secure/store").rglob("*")]:
            st = p.stat()
            assert st.st_gid == softhsm_gid, p
            assert st.st_mode & 0o040 and not st.st_mode & 0o027, (p, oct(st.st_mode))

        # The runtime's view: its own copy of the PIN (LoadCredential), group softhsm, no root.
        cred = base / "cred"
        cred.mkdir()
        (cred / "token.pin").write_text(pin)
        os.chown(cred / "token.pin", pwd.getpwnam("nobody").pw_uid, -1)
        os.chmod(cred / "token.pin", 0o400)
        probe = ("import hashlib, sys; from appliance.secure.source import SecureModelSource as S; "
                 "s = S.from_env(); m = s.load('tiny'); "
                 "print(m.version, s.version('tiny'), hashlib.sha256(m.content).hexdigest())")
        renv = dict(env, APPLIANCE_PIN_FILE=str(cred / "token.pin"), HOME="/nonexistent")
        r = _as_user([sys.executable, "-c", probe], renv, [softhsm_gid])
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == ["1.0.0", "1.0.0", hashlib.sha256(model).hexdigest()]
        # Without group softhsm the same user gets nothing: the group grant is what opens it.
        r = _as_user([sys.executable, "-c", probe], renv, [])
        assert r.returncode != 0 and ("token" in r.stderr or "Permission denied" in r.stderr), r.stderr
        # ...and it cannot read root's PIN file either (the credential copy is its only way in).
        r = _as_user([sys.executable, "-c", probe], dict(renv, APPLIANCE_PIN_FILE=str(pin_file)), [softhsm_gid])
        assert r.returncode != 0 and "PIN" in r.stderr, r.stderr
    finally:
        shutil.rmtree(base, ignore_errors=True)
