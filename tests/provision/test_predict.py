"""Pieces of the prediction self-test that need no device: the raw HTTP parsing of what the
device relays, the probe input, and the tolerance rule."""

import subprocess

import numpy as np
import pytest

from appliance.provision import predict as P
from appliance.runtime.tinymodels import fully_connected_f32, reference_output


def test_parse_http():
    raw = b"HTTP/1.1 200 OK\r\nContent-Type: x\r\nX-Tensor-Shape: 1,2\r\nContent-Length: 3\r\n\r\nabcEXTRA"
    status, headers, body = P.parse_http(raw)
    assert status == 200 and headers["x-tensor-shape"] == "1,2" and body == b"abc"
    with pytest.raises(P.PredictError, match="cut short: 1 of 3"):
        P.parse_http(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\na")
    with pytest.raises(P.PredictError, match="not an HTTP response"):
        P.parse_http(b"bash: connect: Connection refused")


def test_http_command_talks_http_over_bash_dev_tcp(tmp_path):
    """The device-side command against a real HTTP server (python's http.server) here."""
    import http.server
    import threading

    class H(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Length", str(len(body) + 1))
            self.end_headers()
            self.wfile.write(body[::-1] + b"!")

        def log_message(self, *a):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        body = bytes(range(256)) * 3  # binary, with CR/LF and NUL bytes
        cmd = P.http_command(srv.server_port, "POST", "/x", len(body), {"Content-Type": "a/b"}, timeout=10)
        p = subprocess.run(["sh", "-c", cmd], input=body, capture_output=True, timeout=20)
        assert p.returncode == 0, p.stderr
        status, _, got = P.parse_http(p.stdout)
        assert status == 200 and got == body[::-1] + b"!"
    finally:
        srv.shutdown()
        srv.server_close()
    p = subprocess.run(["sh", "-c", P.http_command(srv.server_port, "GET", "/", timeout=5)], capture_output=True)
    assert p.returncode == P.REFUSED


def test_expected_output_and_tolerance():
    model = fully_connected_f32(16, 4, seed=1)
    x, y = P.expected_output(model)
    assert x.shape == (1, 16) and np.allclose(y, reference_output(model, x), rtol=1e-5, atol=1e-6)
    assert P.mismatch(y, y) == 0
    assert P.mismatch(y + 1e-5 * np.max(np.abs(y)), y) <= 1 < P.mismatch(y + 2e-4 * np.max(np.abs(y)), y)
    assert P.mismatch(y[:, :2], y) == float("inf")
    q = np.array([[3, -7]], np.int8)
    assert P.mismatch(q + 1, q) == 1 and P.mismatch(q + np.int8(2), q) == 2
    assert np.array_equal(np.frombuffer(P.encode_input(x), "<f4").reshape(x.shape), x)
