"""Benchmark: cost of loading a model from the encrypted store vs. loading the plain file.

    .venv/bin/python benchmarks/secure_unlock.py [--runs 15] [--model PATH] [--malloc daemon|default]

Allocator: by default the script re-runs itself with the GLIBC_TUNABLES that
appliance-runtime.service sets for the daemon (appliance.runtime.config.MALLOC_TUNABLES; plain
and secure rows alike): glibc then serves multi-MB buffers from a heap in transparent huge
pages, and the page faults on the fresh buffers an unlock needs (measured: ~1.5 us each, 1400
per 5.5 MB, in this VM) drop to a handful. `--malloc default` measures glibc's default.

Same model, same run, alternating order. Plain: `Interpreter(model_path=...)` +
`allocate_tensors()`. Secure: install seal + vendor signature + anti-rollback counter (two HMACs
on the token), RSA-OAEP unwrap of the data key on SoftHSM2, AES-256-GCM decrypt in memory,
then the interpreter: either from bytes (`DeviceStore.load` + `Interpreter(model_content=)`)
or from a sealed memfd (`DeviceStore.load_memfd` + `Interpreter(model_path=/proc/self/fd/N)`,
which TFLite mmaps like a file). Each with a fresh token session + login (cold start) and with
the session a running daemon keeps open.
Target: secure / plain <= 1.2 (medians). Also AES-GCM decrypt throughput of the envelope
(1 MiB chunks) against one-shot AESGCM on the same bytes.
Default model: hand_landmark_full.tflite from the mediapipe 0.10.14 wheel (see secure_models.py).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import daemon_malloc  # noqa: E402


def median_ms(xs):
    return statistics.median(xs) * 1e3


def child(mode: str, tmp: Path, vendor_pub_pem: bytes) -> None:
    """One load of the big model in a fresh process, as in a running daemon that loads a new
    model or version: before the clock, both children (plain and secure alike) open the token
    session and load a tiny model both ways, so imports and first-use code paths are warm, but
    nothing of the big model is in this process's heap. Prints wall and CPU seconds."""
    from ai_edge_litert.interpreter import Interpreter
    from cryptography.hazmat.primitives import serialization

    from appliance.secure.backend import Pkcs11Backend, TokenConfig
    from appliance.secure.store import DeviceStore

    backend = Pkcs11Backend(TokenConfig(module="/usr/lib/softhsm/libsofthsm2.so", token_label="bench", pin="1234"))
    store = DeviceStore(tmp / "store", backend, serialization.load_pem_public_key(vendor_pub_pem), "bench")
    for content in ((tmp / "warm.tflite").read_bytes(), store.load("warm").content):
        w = Interpreter(model_content=content, num_threads=1)
        w.allocate_tensors()
        w.invoke()
    del w, content
    t, c = time.perf_counter(), time.process_time()
    if mode == "plain":
        it = Interpreter(model_path=str(tmp / "plain.tflite"), num_threads=1)
    else:
        it = Interpreter(model_content=store.load("bench").content, num_threads=1)
    it.allocate_tensors()
    t1, c1 = time.perf_counter(), time.process_time()
    d = it.get_input_details()[0]
    it.set_tensor(d["index"], np.zeros(d["shape"], d["dtype"]))
    it.invoke()
    print(t1 - t, c1 - c, time.perf_counter() - t, time.process_time() - c)


def fresh_process_table(tmp: Path, vendor_pub_pem: bytes, runs: int) -> None:
    res = {"plain": [], "secure": []}
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent))
    for i in range(runs):
        for mode in (("plain", "secure") if i % 2 == 0 else ("secure", "plain")):
            out = subprocess.run([sys.executable, __file__, "--child", mode, str(tmp), vendor_pub_pem.hex()],
                                 capture_output=True, text=True, check=True, env=env).stdout.split()
            res[mode].append([float(x) for x in out[-4:]])
    print(f"\nfresh process per load (warm code paths, cold heap: see child()), runs={runs}, medians")
    print(f"{'measurement':58s} {'wall ms':>8s} {'/plain':>7s} {'cpu ms':>8s} {'/plain':>7s}")
    for col, label in ((0, "Interpreter + allocate"), (2, "Interpreter + allocate + first invoke")):
        base_w = statistics.median(r[col] for r in res["plain"])
        base_c = statistics.median(r[col + 1] for r in res["plain"])
        for mode in ("plain", "secure"):
            w = statistics.median(r[col] for r in res[mode])
            c = statistics.median(r[col + 1] for r in res[mode])
            name = f"{mode} ({'store.load + ' if mode == 'secure' else ''}{label})"
            print(f"{name:58s} {w * 1e3:8.2f} {w / base_w:7.2f} {c * 1e3:8.2f} {c / base_c:7.2f}")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        os.environ["SOFTHSM2_CONF"] = str(Path(sys.argv[3]) / "softhsm2.conf")
        child(sys.argv[2], Path(sys.argv[3]), bytes.fromhex(sys.argv[4]))
        return 0
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=41)
    ap.add_argument("--model")
    ap.add_argument("--mib", type=int, default=64, help="size of the AES-GCM throughput sample")
    ap.add_argument("--malloc", choices=daemon_malloc.CHOICES, default="daemon",
                    help="daemon: the runtime unit's GLIBC_TUNABLES (default); default: glibc's defaults")
    ap.add_argument("--fresh-runs", type=int, default=21, help="loads in a fresh process each (0: skip)")
    args = ap.parse_args()
    daemon_malloc.ensure(args.malloc)
    import secure_models
    model_path = Path(args.model) if args.model else secure_models.mediapipe_model()
    model = model_path.read_bytes()

    tmp = Path(tempfile.mkdtemp(prefix="secure-bench-"))
    (tmp / "tokens").mkdir()
    conf = tmp / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tmp / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "bench", "--pin", "1234",
                    "--so-pin", "12345678"], check=True, capture_output=True)

    from ai_edge_litert.interpreter import Interpreter
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from appliance.secure import envelope
    from appliance.secure.backend import Pkcs11Backend, TokenConfig
    from appliance.secure.store import DeviceStore

    cfg = TokenConfig(module="/usr/lib/softhsm/libsofthsm2.so", token_label="bench", pin="1234")
    vendor = ed25519.Ed25519PrivateKey.generate()
    with Pkcs11Backend(cfg) as b:
        pem = b.ensure_device_key()
        manifest = envelope.Manifest("bench", "1.0.0", hashlib.sha256(model).hexdigest(), len(model), ("bench",))
        pkg = envelope.build_package(model, manifest, vendor, pem)
        DeviceStore(tmp / "store", b, vendor.public_key(), "bench").install(pkg)
        from appliance.runtime.tinymodels import fully_connected_f32
        tiny = fully_connected_f32(8, 4)
        (tmp / "warm.tflite").write_bytes(tiny)
        mt = envelope.Manifest("warm", "1.0.0", hashlib.sha256(tiny).hexdigest(), len(tiny), ("bench",))
        DeviceStore(tmp / "store", b, vendor.public_key(), "bench").install(
            envelope.build_package(tiny, mt, vendor, pem))
    plain_file = tmp / "plain.tflite"
    plain_file.write_bytes(model)

    def plain():
        it = Interpreter(model_path=str(plain_file), num_threads=1)
        it.allocate_tensors()
        return it

    def invoke(it):
        # The first inference touches every weight page; plain loading is a lazy mmap, so this
        # is where a plain model pays for reading its weights.
        d = it.get_input_details()[0]
        it.set_tensor(d["index"], np.zeros(d["shape"], d["dtype"]))
        it.invoke()

    warm = Pkcs11Backend(cfg)  # a running daemon keeps its logged-in session

    # The open session keeps one DeviceStore, as the runtime's SecureModelSource does (its counter
    # remembers what the token already authenticated); a fresh session gets a new one.
    warm_store = DeviceStore(tmp / "store", warm, vendor.public_key(), "bench")

    def store_for(backend):
        return warm_store if backend is warm else DeviceStore(tmp / "store", backend, vendor.public_key(), "bench")

    def unlock_bytes(backend):
        return store_for(backend).load("bench").content

    def secure_bytes(backend=None):
        if backend is None:
            with Pkcs11Backend(cfg) as b:  # fresh session + login, as a starting runtime does
                content = unlock_bytes(b)
        else:
            content = unlock_bytes(backend)
        it = Interpreter(model_content=content, num_threads=1)
        it.allocate_tensors()
        return it

    def secure_memfd(backend=None):
        def go(b):
            fd, _ = store_for(b).load_memfd("bench")
            try:
                it = Interpreter(model_path=f"/proc/self/fd/{fd}", num_threads=1)
                it.allocate_tensors()
            finally:
                os.close(fd)  # the interpreter keeps its own mapping
            return it
        if backend is None:
            with Pkcs11Backend(cfg) as b:
                return go(b)
        return go(backend)

    def unlock_only_memfd(backend):
        fd, _ = store_for(backend).load_memfd("bench")
        os.close(fd)

    cases = {
        "plain: Interpreter(model_path) + allocate": plain,
        "secure bytes, cold login: load + Interpreter(content)": secure_bytes,
        "secure memfd, cold login: load_memfd + Interpreter(fd)": secure_memfd,
        "secure bytes, open session": lambda: secure_bytes(warm),
        "secure memfd, open session": lambda: secure_memfd(warm),
        "  unlock only (memfd, open session)": lambda: unlock_only_memfd(warm),
        "  unlock only (bytes, open session)": lambda: unlock_bytes(warm),
        "plain + first invoke": lambda: invoke(plain()),
        "secure bytes, open session + first invoke": lambda: invoke(secure_bytes(warm)),
        "secure memfd, open session + first invoke": lambda: invoke(secure_memfd(warm)),
    }
    for fn in cases.values():
        fn()  # warm: page cache, library loading
    times = {k: [] for k in cases}
    cpu = {k: [] for k in cases}
    names = list(cases)
    for i in range(args.runs):
        for k in (names if i % 2 == 0 else names[::-1]):  # alternate order against drift
            t, c = time.perf_counter(), time.process_time()
            cases[k]()
            times[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    tu = []
    p = envelope.parse_package(pkg)
    for _ in range(args.runs):
        t = time.perf_counter()
        with Pkcs11Backend(cfg) as backend:
            envelope.unwrap_data_key(p.keyblock, backend)
        tu.append(time.perf_counter() - t)
    warm.close()

    # AES-GCM throughput
    data = os.urandom(args.mib << 20)
    key = os.urandom(32)
    hraw, ct = envelope.encrypt(data, key, chunk_size=1 << 20)
    h = envelope.parse_header(hraw)
    aes, nonce = AESGCM(key), os.urandom(12)
    one = aes.encrypt(nonce, data, b"aad")
    te, tr = [], []
    for _ in range(5):
        t = time.perf_counter(); envelope.decrypt(hraw, h, ct, key); te.append(time.perf_counter() - t)
        t = time.perf_counter(); aes.decrypt(nonce, one, b"aad"); tr.append(time.perf_counter() - t)
    mib = len(data) / (1 << 20)

    base = statistics.median(times[names[0]])
    cbase = statistics.median(cpu[names[0]])
    print(f"model: {model_path.name} ({len(model) / 1e6:.2f} MB), runs={args.runs}, medians, num_threads=1")
    print(f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (CPU time is the steadier figure on a busy box)")
    print(f"allocator: GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset: glibc default)')}")
    print(f"{'measurement':58s} {'wall ms':>8s} {'/plain':>7s} {'cpu ms':>8s} {'/plain':>7s}")
    for k in names:
        if k == "plain + first invoke":
            base, cbase = statistics.median(times[k]), statistics.median(cpu[k])
        m, c = statistics.median(times[k]), statistics.median(cpu[k])
        print(f"{k:58s} {m * 1e3:8.2f} {m / base:7.2f} {c * 1e3:8.2f} {c / cbase:7.2f}")
    print(f"{'  token login + RSA-OAEP unwrap (fresh session)':58s} {median_ms(tu):8.2f}")
    print("target: secure / plain <= 1.2. Ratios of the first-invoke rows compare against 'plain + first invoke'"
          " (load until the first inference is done: plain Interpreter(model_path) maps the file lazily and"
          " reads its weights only at the first invoke, when XNNPACK packs them, so the constructor alone"
          " leaves part of a plain load's cost for later). The rows above it compare the constructor alone.")
    print(f"{'AES-256-GCM decrypt':44s} {'MiB/s':>9s}")
    print(f"{'  envelope.decrypt, 1 MiB chunks (in place)':44s} {mib / statistics.median(te):9.0f}")
    print(f"{'  one-shot AESGCM.decrypt (baseline)':44s} {mib / statistics.median(tr):9.0f}")
    if args.fresh_runs:
        from cryptography.hazmat.primitives import serialization
        fresh_process_table(tmp, vendor.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo), args.fresh_runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
