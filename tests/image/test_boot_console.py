"""The QEMU console reader (image/boot.py Machine) keeps the last bytes a guest sends before its
emulator exits. A panic with panic=-1 and -no-reboot ends QEMU milliseconds after the panic text:
pyserial's socket read() used to drop those bytes (it raises at EOF and discards what it had
read in that call), and expect() gave up as soon as the process was gone, so a verity refusal
in CI looked like a silent exit. The console is opened as start() opens it (open_port, which
keeps what arrives during open()). The "emulator" here is a real process on a loopback socket that writes and exits at once."""
import socket
import subprocess
import sys
import textwrap

import pytest
from appliance.provision.console import open_port

from appliance.image.boot import Machine
from appliance.image.errors import BuildError

LAST_WORDS = "Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000007\r\n"


def _guest_that_panics(tmp_path, lines: int):
    """A process that accepts one console connection, writes `lines` lines and the panic line
    in one burst, and exits (closing the socket), as QEMU does on a guest reset."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = textwrap.dedent(f"""
        import socket
        srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", {port})); srv.listen(1); print("listening", flush=True)
        c, _ = srv.accept()
        c.sendall(b"".join(b"[ %d ] boot line\\r\\n" % i for i in range({lines})) + {LAST_WORDS.encode()!r})
        c.close()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "listening"
    return proc, port


@pytest.mark.parametrize("lines", [0, 3, 2000])   # the burst within one 4 KiB read, and across many
def test_last_words_before_exit_reach_expect_and_log(tmp_path, lines):
    proc, port = _guest_that_panics(tmp_path, lines)
    ser = open_port(f"socket://127.0.0.1:{port}", timeout=0.5)
    log = tmp_path / "console.log"
    m = Machine(proc=proc, serial=ser, log_path=log, forwards={})
    m._log = open(log, "w")
    with m:
        proc.wait(timeout=10)       # the emulator is gone before we read a byte
        assert m.expect(r"Kernel panic[^\r\n]*", 10).group(0).startswith("Kernel panic - not syncing")
        with pytest.raises(BuildError, match="QEMU exited"):
            m.expect("never printed", 10)
    text = log.read_bytes().decode()
    assert text.endswith(LAST_WORDS) and text.count("boot line") == lines
