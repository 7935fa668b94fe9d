"""Watermark on the project's tiny models (real .tflite bytes, real interpreter)."""
import json
import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from appliance.runtime import tinymodels as tm
from appliance.secure import watermark as W

from .conftest import run_cli

KEY = b"watermark-test-key-0123456789"
DEV = 0x0123456789ABCDEF


@pytest.fixture(scope="module")
def f32():
    model = tm.fully_connected_f32(512, 512, seed=3)
    return model, W.embed(model, KEY, DEV).model


@pytest.fixture(scope="module")
def i8():
    model = tm.fully_connected_int8(512, 512, seed=4)
    return model, W.embed(model, KEY, DEV).model


def _outside_weights_identical(a, b):
    regions = [(t.offset, t.offset + t.count * t.dtype.itemsize) for t in W.weight_tensors(a)]
    mask = np.ones(len(a), bool)
    for lo, hi in regions:
        mask[lo:hi] = False
    return len(a) == len(b) and np.array_equal(np.frombuffer(a, np.uint8)[mask], np.frombuffer(b, np.uint8)[mask])


def test_float32_roundtrip_fidelity_and_in_place_patch(f32):
    model, marked = f32
    r = W.verify(marked, KEY)
    assert r.detected and r.device_id == DEV and r.code_bit_errors == 0
    assert _outside_weights_identical(model, marked)  # only weight bytes change, sizes do not
    from ai_edge_litert.interpreter import Interpreter
    x = np.random.default_rng(0).standard_normal((1, 512)).astype(np.float32)
    outs = []
    for m in (model, marked):
        it = Interpreter(model_content=m, num_threads=1)
        it.allocate_tensors()
        it.set_tensor(it.get_input_details()[0]["index"], x)
        it.invoke()
        outs.append(it.get_tensor(it.get_output_details()[0]["index"]).copy())
    rel = np.linalg.norm(outs[1] - outs[0]) / np.linalg.norm(outs[0])
    assert 0 < rel < 5e-3, rel


def test_int8_moves_at_most_one_lsb_and_leaves_int32_alone(i8):
    model, marked = i8
    [t] = W.weight_tensors(model)  # the int32 bias is not a candidate
    assert t.dtype == np.int8
    d = W.read_arrays(marked, [t])[0] - W.read_arrays(model, [t])[0]
    assert np.abs(d).max() == 1 and 0 < np.mean(d != 0) < 0.2
    assert _outside_weights_identical(model, marked)  # bias bytes untouched
    r = W.verify(marked, KEY)
    assert r.detected and r.device_id == DEV


def test_survives_listed_attacks(f32):
    _, marked = f32
    ts = W.weight_tensors(marked)
    tids = [t.tid for t in ts]
    arrs = W.read_arrays(marked, ts)
    rng = np.random.default_rng(7)

    def q8(a):
        s = np.abs(a).max() / 127
        return np.round(a / s) * s

    attacks = {
        "int8 requantisation": [q8(a) for a in arrs],
        "float16 cast": [a.astype(np.float16).astype(np.float64) for a in arrs],
        "noise 2% sigma": [a + rng.normal(0, 0.02 * a.std(), a.shape) for a in arrs],
        "prune 30%": [np.where(np.abs(a) < np.quantile(np.abs(a), 0.3), 0, a) for a in arrs],
        "prune 50%": [np.where(np.abs(a) < np.quantile(np.abs(a), 0.5), 0, a) for a in arrs],
        "second mark": W.embed_arrays(arrs, [t.dtype for t in ts], tids, b"another-key-000000", 42),
    }
    for name, attacked in attacks.items():
        r = W.verify_arrays(attacked, tids, KEY)
        assert r.detected and r.device_id == DEV, name
    # and one it is documented NOT to survive: heavy noise destroys the mark (no false claim)
    heavy = [a + rng.normal(0, 0.3 * a.std(), a.shape) for a in arrs]
    assert not W.verify_arrays(heavy, tids, KEY).detected


def test_false_positives_on_1000_random_keys():
    """Unmarked model and a model marked under another key: no detection for 1000 keys, and the
    candidate statistic z behaves like N(0,1), so the 1e-9 threshold means what it says."""
    plain = tm.fully_connected_f32(128, 128, seed=5)
    other = W.embed(tm.fully_connected_f32(256, 256, seed=6), b"some-other-key-xx", 99).model
    zs, hits = [], 0
    for i in range(1000):
        key = os.urandom(16)
        r = W.verify(plain if i % 2 else other, key, candidates=[int.from_bytes(os.urandom(8), "big")])
        blind = W.verify_arrays(W.read_arrays(plain if i % 2 else other, W.weight_tensors(plain if i % 2 else other)),
                                [t.tid for t in W.weight_tensors(plain if i % 2 else other)], key) if i < 200 else None
        hits += r.detected + bool(blind and blind.detected)
        zs.append(r.z)
    zs = np.array(zs)
    assert hits == 0
    assert abs(zs.mean()) < 0.15 and 0.85 < zs.std() < 1.15, (zs.mean(), zs.std())
    assert zs.max() < W.candidate_threshold(1)


def test_candidates_identify_the_device(f32):
    _, marked = f32
    fleet = [DEV ^ (1 << i) for i in range(1, 40)] + [DEV]
    r = W.verify(marked, KEY, candidates=fleet)
    assert r.detected and r.device_id == DEV and r.z > r.candidate_threshold
    r = W.verify(marked, KEY, candidates=fleet[:-1])  # true device not in the inventory
    assert not r.detected


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_models_are_clean_errors(raw):
    try:
        W.weight_tensors(b"\x1c\0\0\0TFL3" + raw)
    except W.WatermarkError as e:
        assert "\n" not in str(e)


def test_cli_embed_verify_and_package_with_watermark(tmp_path, f32):
    model, _ = f32
    (tmp_path / "m.tflite").write_bytes(model)
    (tmp_path / "k").write_bytes(KEY)
    r = run_cli("appliance.secure.cli", ["watermark", "embed", str(tmp_path / "m.tflite"), "--key", str(tmp_path / "k"),
                                         "--id", f"{DEV:016x}", "-o", str(tmp_path / "out.tflite")])
    assert r.returncode == 0, r.stderr
    (tmp_path / "inv").write_text(f"# fleet\n{DEV:016x}\n0000000000000001\n")
    r = run_cli("appliance.secure.cli", ["watermark", "verify", str(tmp_path / "out.tflite"), "--key",
                                         str(tmp_path / "k"), "--candidates", str(tmp_path / "inv"), "--json"])
    assert r.returncode == 0 and json.loads(r.stdout)["device_id"] == f"{DEV:016x}"
    r = run_cli("appliance.secure.cli", ["watermark", "verify", str(tmp_path / "m.tflite"), "--key", str(tmp_path / "k")])
    assert r.returncode == 1 and "no watermark" in r.stdout
    (tmp_path / "short").write_bytes(b"x")
    r = run_cli("appliance.secure.cli", ["watermark", "verify", str(tmp_path / "m.tflite"), "--key", str(tmp_path / "short")])
    assert r.returncode == 1 and "shorter than 16 bytes" in r.stderr and r.stderr.count("\n") == 1


def test_package_with_watermark_carries_the_device_id(tmp_path, f32):
    """`appliance-secure package --watermark-key --device-id`: the manifest names the id and the
    encrypted model, decrypted with the device's private key, verifies to that id."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    from appliance.secure import envelope as env

    model, _ = f32
    dev_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)  # stands in for the token
    (tmp_path / "dev.pem").write_bytes(dev_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    (tmp_path / "m.tflite").write_bytes(model)
    (tmp_path / "k").write_bytes(KEY)
    assert run_cli("appliance.secure.cli", ["vendor-key", str(tmp_path / "v.pem")]).returncode == 0
    r = run_cli("appliance.secure.cli", ["package", str(tmp_path / "m.tflite"), "--name", "fc", "--version", "2.1",
                                         "--board", "qemu-arm64", "--device-pubkey", str(tmp_path / "dev.pem"),
                                         "--signing-key", str(tmp_path / "v.pem"), "--watermark-key", str(tmp_path / "k"),
                                         "--device-id", f"0x{DEV:016x}", "-o", str(tmp_path / "fc.pkg")])
    assert r.returncode == 0, r.stderr
    pkg = env.parse_package((tmp_path / "fc.pkg").read_bytes())
    assert pkg.manifest.watermark_id == f"{DEV:016x}"
    h = hashes.SHA1()
    data_key = dev_key.decrypt(pkg.keyblock.data_key, padding.OAEP(mgf=padding.MGF1(h), algorithm=h, label=None))
    plain = env.decrypt(pkg.header_raw, pkg.header, pkg.ciphertext, data_key)
    assert plain != model and W.verify(plain, KEY).device_id == DEV


def test_float16_weights_behind_dequantize():
    """Converters keep float16 weights behind DEQUANTIZE: those are marked (in float16, in
    place), the shared float16 buffer is left alone, and the real interpreter still agrees
    with the original closely."""
    from ai_edge_litert.interpreter import Interpreter

    from .fp16model import fc_fp16

    model, _, _ = fc_fp16(512, 256, seed=9)
    [t] = W.weight_tensors(model)  # the two tensors sharing a buffer are not candidates
    assert t.name == "weights_f16" and t.dtype == np.float16
    marked = W.embed(model, KEY, DEV).model
    assert _outside_weights_identical(model, marked)  # shared buffer and everything else untouched
    assert W.verify(marked, KEY).device_id == DEV
    x = np.random.default_rng(1).standard_normal((1, 512)).astype(np.float32)
    outs = []
    for m in (model, marked):
        it = Interpreter(model_content=m, num_threads=1)
        it.allocate_tensors()
        it.set_tensor(it.get_input_details()[0]["index"], x)
        it.invoke()
        outs.append(it.get_tensor(it.get_output_details()[0]["index"]).copy())
    rel = np.linalg.norm(outs[1] - outs[0]) / np.linalg.norm(outs[0])
    assert 0 < rel < 1e-2, rel


def test_cost_weighting_moves_cheap_tensors_more_and_keeps_the_mark():
    """Fidelity weighting only redistributes the moves: the same id decodes, the tensor with the
    higher output cost moves less, by the clipped (median cost / cost)^2 ratio."""
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal(60000) * sc for sc in (0.05, 0.5, 0.2)]
    kinds, tids = [np.dtype("<f4")] * 3, [1, 2, 3]
    equal = W.embed_arrays(arrays, kinds, tids, KEY, DEV)
    weighted = W.embed_arrays(arrays, kinds, tids, KEY, DEV, costs=[1.0, 2.0, 0.5])
    for out in (equal, weighted):
        r = W.verify_arrays(out, tids, KEY)
        assert r.detected and r.device_id == DEV and r.code_bit_errors == 0

    def rel_move(out, i):
        s, _ = W._stats(arrays[i])
        return np.abs(out[i] - arrays[i]).mean() / s

    # equal weighting: the same move per weight in units of each tensor's scale
    assert rel_move(equal, 0) == pytest.approx(rel_move(equal, 1), rel=0.15)
    # costs 1 (median), 2, 0.5 -> gains 1, 1/4, 4
    assert rel_move(weighted, 1) / rel_move(weighted, 0) == pytest.approx(0.25, rel=0.15)
    assert rel_move(weighted, 2) / rel_move(weighted, 0) == pytest.approx(4.0, rel=0.15)
    # clipping: a near-zero cost does not take the whole mark
    clipped = W.embed_arrays(arrays, kinds, tids, KEY, DEV, costs=[1.0, 1.0, 1e-9])
    assert rel_move(clipped, 2) / rel_move(clipped, 0) == pytest.approx(W.GAIN_RANGE, rel=0.15)


def test_tensor_costs_measure_with_the_interpreter_and_embed_reports_it():
    model = tm.fully_connected_f32(256, 256, seed=9)
    costs = W.tensor_costs(model)
    assert costs is not None and len(costs) == 1 and costs[0] > 0
    # one tensor: nothing to redistribute, so embed does not measure
    assert W.embed(model, KEY, DEV).fidelity_weighted is False
    # a model the interpreter cannot build: no measurement (embed then weighs tensors equally)
    assert W.tensor_costs(b"\0\0\0\0TFL3 not a model") is None
