"""The prediction self-test: the device's own runtime answers a prediction, checked on the station.

The request is made ON the device, to its runtime on 127.0.0.1:PORT, by bash's /dev/tcp: the
image has no curl or other HTTP client and its sshd forbids port forwarding (a direct-tcpip
channel from the station is refused), but bash is in every Debian image. The device sends
the raw response back over the SSH channel; the station parses it and compares the output
with what the station's own TFLite interpreter computes from the very model it packaged for
this device (watermarked with the device's id), on the same deterministic input. So a pass
means: the package decrypted on this device, the runtime loaded and serves this version, and
its answer is this device's model's answer.
"""

from __future__ import annotations

import shlex

import numpy as np

from .errors import ProvisionError

# $1 port, $2 request head (with CRLFs), $3 body length (body on stdin), $4 seconds
_SCRIPT = ('exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 97\n'
           'printf "%s" "$2" >&3 || exit 98\n'
           'if [ "$3" -gt 0 ]; then head -c "$3" >&3 || exit 98; fi\n'
           'exec timeout "$4" cat <&3\n')
REFUSED = 97  # exit status of the command when nothing listens on the port


class PredictError(ProvisionError):
    pass


def http_command(port: int, method: str, path: str, body_len: int = 0, headers: dict | None = None,
                 timeout: float = 30) -> str:
    """A device command that sends one HTTP/1.0 request (body read from stdin) and prints
    the raw response; exit status 97 if the port refuses."""
    lines = [f"{method} {path} HTTP/1.0", "Host: 127.0.0.1"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if method != "GET":
        lines.append(f"Content-Length: {body_len}")
    head = "\r\n".join(lines) + "\r\n\r\n"
    return (f"LC_ALL=C bash -c {shlex.quote(_SCRIPT)} http {int(port)} {shlex.quote(head)} "
            f"{int(body_len)} {max(1, int(timeout))}")


def parse_http(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """(status, lower-cased headers, body) of a raw HTTP/1.x response."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if not sep or len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise PredictError(f"not an HTTP response: {raw[:60]!r}")
    headers = {}
    for ln in lines[1:]:
        k, _, v = ln.partition(":")
        headers[k.strip().lower()] = v.strip()
    if "content-length" in headers:
        n = int(headers["content-length"])
        if len(body) < n:
            raise PredictError(f"HTTP response cut short: {len(body)} of {n} body bytes")
        body = body[:n]
    return int(parts[1]), headers, body


def probe_input(detail: dict) -> np.ndarray:
    """The deterministic input of the self-test for an input tensor (shape/dtype from TFLite)."""
    shape = [max(1, int(d)) for d in detail["shape"]]
    dtype = np.dtype(detail["dtype"])
    n = int(np.prod(shape))
    if dtype.kind == "f":
        x = np.linspace(-1.0, 1.0, n)
    else:
        info = np.iinfo(dtype)
        lo, hi = max(info.min, -100), min(info.max, 100)
        x = lo + (np.arange(n) * 37) % (hi - lo + 1)
    return x.astype(dtype).reshape(shape)


def expected_output(model: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(input, output 0) of MODEL on the station's interpreter, for the probe input."""
    from appliance.runtime.interp import load_interpreter_class

    try:
        it = load_interpreter_class()(model_content=model, num_threads=1)
        it.allocate_tensors()
        inp = it.get_input_details()
        if len(inp) != 1:
            raise PredictError(f"the prediction self-test needs a model with one input, this has {len(inp)}")
        x = probe_input(inp[0])
        it.set_tensor(inp[0]["index"], x)
        it.invoke()
        return x, it.get_tensor(it.get_output_details()[0]["index"]).copy()
    except PredictError:
        raise
    except Exception as e:
        raise PredictError(f"the station cannot run the model for the self-test: {' '.join(str(e).split())}") \
            from None


def encode_input(x: np.ndarray) -> bytes:
    """The runtime's raw request body: the tensor's bytes, little-endian."""
    return np.ascontiguousarray(x).astype(x.dtype.newbyteorder("<"), copy=False).tobytes()


def decode_output(headers: dict[str, str], body: bytes) -> np.ndarray:
    try:
        shape = [int(v) for v in headers["x-tensor-shape"].split(",") if v.strip()]
        dtype = np.dtype(headers["x-tensor-dtype"]).newbyteorder("<")
        return np.frombuffer(body, dtype=dtype).reshape(shape)
    except (KeyError, ValueError, TypeError) as e:
        raise PredictError(f"runtime answer without a usable tensor ({type(e).__name__}: {e})") from None


def mismatch(got: np.ndarray, want: np.ndarray) -> float:
    """Largest difference in units of the tolerance (<= 1 passes): 1e-4 of the output's
    range for float outputs (other interpreters/CPUs sum in another order), 1 step for
    integer outputs (requantisation rounding)."""
    if got.shape != want.shape:
        return float("inf")
    d = np.abs(got.astype(np.float64) - want.astype(np.float64))
    if want.dtype.kind == "f":
        tol = 1e-4 * max(float(np.max(np.abs(want))), 1e-6)
    else:
        tol = 1.0
    return float(np.max(d) / tol) if d.size else 0.0
