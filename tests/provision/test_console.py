"""Console against the real U-Boot of Debian's u-boot-qemu in qemu-system-aarch64, over
socket:// (QEMU holds the guest until we connect, so nothing is lost)."""

import socket
import threading

import pytest

from appliance.provision.cli import main
from appliance.provision.console import Console, Step, UBootShell, run_steps
from appliance.provision.qemu import QemuBoard


@pytest.fixture
def board():
    b = QemuBoard()
    b.start()
    try:
        yield b
    finally:
        b.stop()


def test_uboot_interrupt_run_and_exit_status(board, tmp_path):
    log = tmp_path / "boot.log"
    con = board.console(log)
    try:
        sh = UBootShell(con)
        sh.interrupt_autoboot(timeout=60)
        ver = sh.run("version")
        assert ver.ok and "U-Boot 2023.01" in ver.output
        env = sh.run("setenv unit_test_var 41; printenv unit_test_var")
        assert env.ok and env.output.strip() == "unit_test_var=41"
        bad = sh.run("test 1 = 2")
        assert bad.status == 1 and bad.output == ""
        missing = sh.run("ls virtio 0")
        assert missing.status != 0 and "virtio 0" in missing.output
        assert sh.run("itest 3 > 2").ok
    finally:
        con.close()
    text = bytes(con.buffer).decode(errors="replace")
    # autoboot was stopped by pattern: the boot command never ran
    assert "no kernel available" not in text and "starting USB" not in text
    # the log has timestamps and the very start of the output (the banner line)
    lines = log.read_text().splitlines()
    assert lines[0].endswith("opened")
    banner = [ln for ln in lines if "U-Boot 2023.01" in ln]
    assert banner and banner[0].split()[0].startswith("20")
    assert "uboot-banner" in con.seen and con.seen["uboot-banner"] <= con.seen["uboot"]


def test_cli_steps_and_uboot_commands(board, tmp_path, capsys):
    url = f"socket://127.0.0.1:{board.port}"
    rc = main(["console", url, "--log", str(tmp_path / "c.log"), "--timeout", "60",
               "--expect", "Hit any key", "--send", "",
               "--expect", "=> ", "--send", "echo step-$((1))",  # hush has no $(( )): literal
               "--expect", "step-",
               "--uboot", "printenv bootdelay",
               "--uboot", "test 1 = 2"])
    out, err = capsys.readouterr()
    assert rc == 1
    assert "bootdelay=" in out and "[exit 0] printenv bootdelay" in out
    assert err.strip() == f"provision: error: {url}: U-Boot command 'test 1 = 2' exited 1"


def test_socket_console_keeps_bytes_sent_on_connect(tmp_path):
    # a server that talks first, the moment the TCP connection is accepted
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]

    def serve():
        c, _ = srv.accept()
        c.sendall(b"first line of the boot\r\nsecond\r\n")
        c.recv(100)
        c.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    con = Console(f"socket://127.0.0.1:{port}", tmp_path / "l.log").open()
    try:
        got = run_steps(con, [Step(expect=r"first line", send="ack", timeout=5),
                              Step(expect=r"second", timeout=5)])
        assert got == [b"first line", b"second"]
    finally:
        con.close()
        srv.close()
    assert "first line of the boot" in (tmp_path / "l.log").read_text()


def test_console_errors_are_one_line(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["console", f"socket://127.0.0.1:{port}", "--until", "uboot"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("provision: error: socket://127.0.0.1:") and "cannot open console" in err
    assert main(["console", str(tmp_path / "ttyNOPE")]) == 1
    assert "serial device not found" in capsys.readouterr().err
