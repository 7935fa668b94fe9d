"""Per-device watermark in the weights of a .tflite model (host side only).

Scheme: keyed spread-transform dither modulation (STDM), blind, with a convolutional code.

Payload: 64-bit device id || 32-bit tag, tag = HMAC-SHA256(key, "appliance-wm-tag" || id)[:4].
It is encoded with the rate-1/2, constraint-length-7 convolutional code (generators 171/133
octal, 6 tail bits): 204 code bits, decoded with a soft-decision Viterbi decoder.

Carrier: every eligible weight tensor (constant float32, float16 - also behind DEQUANTIZE -
or int8; not sparse, not sharing its buffer, at least 4096 elements, rank >= 2 and not a
depthwise kernel (1, k, k, C): those few weights cause most of the output change; int32 and
other types are left alone). Each weight is assigned, by a key-derived PRNG seeded with its tensor's identity,
to one code bit and a random sign r. Per tensor, values are normalised by a scale s (root mean
square of the largest 20% magnitudes) and passed through a ramp

    phi(y) = y * clip((|y| - t_lo) / (t_hi - t_lo), 0, 1)

where t_lo and t_hi are the 55% and 75% magnitude quantiles. Code bit i is read as the
projection p_i = sum(r * phi(y)) / N_i over its weights, quantised on one of two interleaved
lattices (step delta, key-derived dither): which lattice p_i is nearest to is the bit.

Why these choices:
* Magnitude pruning up to 55% zeroes only weights whose phi is already 0, and it changes neither
  the quantiles nor s: the projections are untouched, so pruning 30% or 50% costs no bit.
* The ramp makes p a continuous function of the weights: noise moves a weight across the
  threshold smoothly instead of adding or removing a whole term.
* Embedding moves only weights in the flat zone (|y| > t_hi, strictly inside for int8) by the
  amount that puts p_i on the right lattice point - the host signal does not interfere
  (unlike additive spread spectrum, which would need far larger changes at this fidelity).
  float weights move by equal, tiny amounts; int8 weights by exactly 0 or 1 LSB.
* Fidelity weighting (embed only, the detector does not need it): each tensor's output cost per
  unit of move is measured with the interpreter on a few synthetic inputs (`tensor_costs`), and
  float weights of a tensor move in proportion to 1/cost^2 (clipped to [1/4, 4] x the median):
  the same projections, so the same robustness, for less output change. Measured on
  hand_landmark_full at the same strength: landmark rel L2 1.65e-3 -> 1.04e-3, every other head
  lower too; that margin let STRENGTH go from 0.1 to 0.09. Without an interpreter (or for a
  model it cannot run) all tensors weigh the same.
* delta shrinks with the number of weights per code bit (delta = 0.1/sqrt(N_i), clamped to
  [3e-4, 2e-2]): robustness is about the same for every model size, and large models get
  smaller changes. N_i depends only on tensor shapes, so the detector recomputes it.

Detection: blind decoding gives an id whose tag must verify; for an unmarked model or another
key, a random 96-bit word has a valid tag with probability 2^-32 = 2.3e-10 (<= 1e-9). With a
candidate inventory, each candidate's codeword is correlated with the soft bits: z =
sum(soft * c) / sqrt(L/2) is ~N(0, 1) under "not this device" (soft values are cosines of a
uniform phase), normalised by the soft energy, and the threshold sqrt(2 ln(K / 1e-9)) bounds
the family-wise false-positive probability over K candidates by 1e-9 (Hoeffding). Ids pass
through a keyed 64-bit Feistel permutation before encoding, so neighbouring serial numbers get
unrelated codewords.

Known limits (see README): survives int8 re-quantisation, float16 cast, Gaussian noise of a
few percent, magnitude pruning up to ~55% and overwriting with a second mark under another
key; does NOT survive re-training/fine-tuning, tensor re-ordering by a re-conversion (the
tensor identity is its index), weight permutation within layers, or scaling one channel of a
tensor differently from the rest.
"""
from __future__ import annotations

import dataclasses
import hashlib
import hmac
import importlib
import math

import numpy as np

from .errors import FormatError, SecureError

PAYLOAD_BITS = 96
TAIL = 6
CODE_BITS = 2 * (PAYLOAD_BITS + TAIL)
MIN_ELEMENTS = 4096
Q_LO, TOP = 0.55, 0.20
FPR_TARGET = 1e-9
# Lattice step = STRENGTH / sqrt(weights per code bit): 2%-sigma weight noise leaves ~1-5% raw
# code-bit errors, which the Viterbi decoder corrects (measured: benchmarks/secure_watermark.py).
# 0.09 with fidelity weighting: landmark rel L2 ~8e-4 on hand_landmark_full; per-tensor int8
# re-quantisation leaves 10-20 of 204 code bits wrong over 6 keys (0.085: one key failed at 54).
STRENGTH = 0.09
# Fidelity weighting: a tensor's moves scale by (median cost / its cost)^2 within these bounds
# (wider bounds measured no better: noisy cost estimates then concentrate the mark).
GAIN_RANGE = 4.0
COST_PROBE = 1e-3     # random +-probe * s moves on flat weights when measuring a tensor's cost
COST_INPUTS = 6
COST_PROBES = 2       # random moves per tensor, squared output changes averaged (one is noisy)
_FLOAT32, _FLOAT16, _INT8 = 0, 1, 9
_KINDS = {_FLOAT32: np.dtype("<f4"), _FLOAT16: np.dtype("<f2"), _INT8: np.dtype("i1")}


class WatermarkError(SecureError):
    pass


# --- model plumbing -----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class WeightTensor:
    tid: int          # subgraph << 20 | tensor index: identity used to seed the key stream
    name: str
    dtype: np.dtype
    offset: int       # byte offset of the data in the model file
    count: int


def weight_tensors(model: bytes) -> list[WeightTensor]:
    """Eligible weight tensors of a .tflite flatbuffer (parsed with the `tflite` package)."""
    try:
        M = importlib.import_module("tflite.Model")
        m = M.Model.GetRootAs(model, 0)
        if not model[4:8] == b"TFL3":
            raise ValueError("no TFL3 identifier")
        users: dict[int, int] = {}
        for sgi in range(m.SubgraphsLength()):
            sg = m.Subgraphs(sgi)
            for ti in range(sg.TensorsLength()):
                b = sg.Tensors(ti).Buffer()
                users[b] = users.get(b, 0) + 1
        out = []
        for sgi in range(m.SubgraphsLength()):
            sg = m.Subgraphs(sgi)
            for ti in range(sg.TensorsLength()):
                t = sg.Tensors(ti)
                dt = _KINDS.get(t.Type())
                bi = t.Buffer()
                if dt is None or bi <= 0 or bi >= m.BuffersLength() or users[bi] != 1:
                    continue  # int32 etc., no buffer, or shared buffer: leave alone
                if t.Sparsity() is not None or t.IsVariable():
                    continue
                buf = m.Buffers(bi)
                n = buf.DataLength()
                if n == 0 or n % dt.itemsize or n // dt.itemsize < MIN_ELEMENTS:
                    continue
                shape = t.ShapeAsNumpy() if t.ShapeLength() else np.array([], np.int32)
                if int(np.prod(shape)) != n // dt.itemsize:
                    continue
                # Measured on hand_landmark_full: biases/vectors, depthwise kernels (1, k, k, C)
                # and small tensors carry most of the output change per unit of mark and little
                # of the robustness; leave them alone.
                if len(shape) < 2 or (len(shape) == 4 and shape[0] == 1):
                    continue
                start = buf._tab.Vector(buf._tab.Offset(4))
                out.append(WeightTensor((sgi << 20) | ti, (t.Name() or b"").decode(errors="replace"), dt,
                                        start, n // dt.itemsize))
        return out
    except WatermarkError:
        raise
    except Exception as e:  # the flatbuffer reader raises anything on garbage input
        raise WatermarkError(f"not a readable .tflite model ({type(e).__name__})") from None


def read_arrays(model: bytes, tensors) -> list[np.ndarray]:
    return [np.frombuffer(model, t.dtype, t.count, t.offset).astype(np.float64) for t in tensors]


def write_arrays(model: bytes, tensors, arrays) -> bytes:
    out = bytearray(model)
    for t, a in zip(tensors, arrays):
        raw = np.asarray(a).astype(t.dtype).tobytes()
        out[t.offset:t.offset + len(raw)] = raw
    return bytes(out)


# --- keyed streams and the code ----------------------------------------------------------------
def _master(key: bytes) -> int:
    return int.from_bytes(hmac.new(key, b"appliance-wm-v1", hashlib.sha256).digest(), "big")


def _stream(master: int, tid: int, n: int):
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(master, spawn_key=(tid,))))
    bits = rng.integers(0, CODE_BITS, n, dtype=np.int32)
    signs = rng.integers(0, 2, n, dtype=np.int8) * 2 - 1
    order = rng.random(n)  # keyed priority for int8 LSB moves
    return bits, signs.astype(np.float64), order


def _dither(master: int) -> np.ndarray:
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(master, spawn_key=(1 << 40,))))
    return rng.random(CODE_BITS)


def tag_for(key: bytes, device_id: int) -> int:
    return int.from_bytes(hmac.new(key, b"appliance-wm-tag\0" + device_id.to_bytes(8, "big"),
                                   hashlib.sha256).digest()[:4], "big")


def _feistel(key: bytes, x: int, inverse: bool = False) -> int:
    """Keyed 64-bit permutation: ids that differ in one bit (sequential serials) get unrelated
    codewords, so a candidate next to the true id does not correlate with the mark."""
    left, right = x >> 32, x & 0xFFFFFFFF
    rounds = range(4)
    f = lambda r, v: int.from_bytes(hmac.new(key, b"appliance-wm-perm" + bytes([r]) + v.to_bytes(4, "big"),  # noqa: E731
                                             hashlib.sha256).digest()[:4], "big")
    if not inverse:
        for r in rounds:
            left, right = right, left ^ f(r, right)
    else:
        for r in reversed(rounds):
            left, right = right ^ f(r, left), left
    return (left << 32) | right


def _payload_bits(key: bytes, device_id: int) -> np.ndarray:
    word = (_feistel(key, device_id) << 32) | tag_for(key, device_id)
    return np.array([(word >> (PAYLOAD_BITS - 1 - i)) & 1 for i in range(PAYLOAD_BITS)], np.int8)


_G = (0o171, 0o133)


def conv_encode(bits: np.ndarray) -> np.ndarray:
    state, out = 0, []
    for b in list(bits) + [0] * TAIL:
        reg = (int(b) << 6) | state
        out += [bin(reg & g).count("1") & 1 for g in _G]
        state = reg >> 1
    return np.array(out, np.int8)


def _trellis():
    nxt = np.zeros((64, 2), np.int64)
    outs = np.zeros((64, 2, 2), np.float64)
    for s in range(64):
        for b in (0, 1):
            reg = (b << 6) | s
            nxt[s, b] = reg >> 1
            outs[s, b] = [1 - 2 * (bin(reg & g).count("1") & 1) for g in _G]  # bit 0 -> +1
    return nxt, outs


_NEXT, _OUTS = _trellis()


def viterbi(soft: np.ndarray) -> np.ndarray:
    """Soft-decision Viterbi; soft[i] > 0 means code bit 0. Returns the payload bits."""
    steps = len(soft) // 2
    metric = np.full(64, -np.inf)
    metric[0] = 0.0
    back = np.zeros((steps, 64, 2), np.int64)  # (previous state, input bit)
    for k in range(steps):
        pair = soft[2 * k:2 * k + 2]
        new = np.full(64, -np.inf)
        nb = np.zeros((64, 2), np.int64)
        for b in (0, 1):
            if k >= steps - TAIL and b == 1:
                continue  # tail bits are zero
            cand = metric + _OUTS[:, b, :] @ pair
            ns = _NEXT[:, b]
            for s in np.argsort(-cand):  # best first; keep the best per next-state
                if cand[s] > new[ns[s]]:
                    new[ns[s]] = cand[s]
                    nb[ns[s]] = (s, b)
        metric, back[k] = new, nb
    s, bits = 0, []
    for k in range(steps - 1, -1, -1):
        ps, b = back[k, s]
        bits.append(b)
        s = ps
    return np.array(bits[::-1][:PAYLOAD_BITS], np.int8)


# --- statistics -------------------------------------------------------------------------------
@dataclasses.dataclass
class _Prep:
    bits: np.ndarray
    signs: np.ndarray
    order: np.ndarray


def _stats(a: np.ndarray):
    """Scale and threshold of one tensor (order statistics: unchanged by pruning below them)."""
    mag = np.abs(a)
    n = len(mag)
    k = max(1, int(round(TOP * n)))
    top = np.partition(mag, n - k)[n - k:]
    s = math.sqrt(float(np.mean(top * top)))
    i_lo = int(Q_LO * (n - 1))
    return s, float(np.partition(mag, i_lo)[i_lo])


def _phi(a, s, lo):
    """Soft threshold: continuous, slope 0 or 1, and exactly 0 for every weight pruning removes."""
    if s <= 0:
        return np.zeros_like(a)
    return np.sign(a) * np.maximum(np.abs(a) - lo, 0.0) / s


def _counts(tensors_n, preps) -> np.ndarray:
    N = np.zeros(CODE_BITS)
    for p in preps:
        N += np.bincount(p.bits, minlength=CODE_BITS)
    return np.maximum(N, 1)


def _delta(N: np.ndarray) -> float:
    return float(np.clip(STRENGTH / math.sqrt(float(np.mean(N))), 3e-4, 2e-2))


def _projections(arrays, preps, N) -> np.ndarray:
    P = np.zeros(CODE_BITS)
    for a, p in zip(arrays, preps):
        s, lo = _stats(a)
        P += np.bincount(p.bits, weights=p.signs * _phi(a, s, lo), minlength=CODE_BITS)
    return P / N


def _soft(P, dither, delta) -> np.ndarray:
    return np.cos(2 * np.pi * (P / delta - dither))


def _prepare(key: bytes, tids, counts):
    master = _master(key)
    preps = [_Prep(*_stream(master, tid, n)) for tid, n in zip(tids, counts)]
    N = _counts(None, preps)
    return master, preps, N


# --- embed / verify on arrays (used directly by attack benchmarks) ------------------------------
def embed_arrays(arrays, kinds, tids, key: bytes, device_id: int, iterations: int = 4, costs=None):
    """Return marked copies of `arrays` (float64 values of tensors of dtype `kinds`).

    `costs`: optional output cost per unit of move of each tensor (see `tensor_costs`). The
    projections the mark sets are the same either way (so is its robustness); float weights of
    a tensor then move in proportion to 1/cost^2, which minimises the summed squared output
    change for the same projections (Lagrange: d/dm_t sum(c_t^2 n_t m_t^2) = lambda n_t)."""
    if not arrays:
        raise WatermarkError("model has no eligible weight tensors (float32/float16/int8, >= 256 elements)")
    master, preps, N = _prepare(key, tids, [len(a) for a in arrays])
    delta = _delta(N)
    dither = _dither(master)
    code = conv_encode(_payload_bits(key, device_id))
    out = [a.copy() for a in arrays]
    moved = [np.zeros(len(a), bool) for a in arrays]
    gain = [1.0] * len(arrays)
    if costs is not None:
        c = np.maximum(np.asarray(costs, np.float64), 1e-30)
        gain = list(np.clip((np.median(c) / c) ** 2, 1 / GAIN_RANGE, GAIN_RANGE))
    for _ in range(iterations):
        P = _projections(out, preps, N)
        # target: nearest point of the lattice for this code bit
        u = P / delta - dither - code * 0.5
        d = (np.round(u) - u) * delta  # needed change of P_i
        if np.max(np.abs(d)) < delta * 1e-3:
            break
        need = d * N  # needed change of sum(r * y) over the flat zone
        cap_f = np.zeros(CODE_BITS)
        flats = []
        for a, p, kind, g in zip(out, preps, kinds, gain):
            s, lo = _stats(a)
            if kind == np.dtype("i1"):
                # strictly inside after a 1-LSB move, so the order statistic lo cannot change
                flat = (np.abs(a) >= lo + 2) & (np.abs(a) <= 126)
            else:
                flat = np.abs(a) > lo * 1.02 + 1e-12
            flats.append((flat, s))
            if kind != np.dtype("i1"):
                cap_f += np.bincount(p.bits[flat], minlength=CODE_BITS) * g
        # floats: the same move (in units of s, times the tensor's gain) on every flat weight of the bit
        step = np.divide(need, cap_f, out=np.zeros(CODE_BITS), where=cap_f > 0)
        remaining = np.where(cap_f > 0, 0.0, need)
        for a, p, kind, (flat, s), g in zip(out, preps, kinds, flats, gain):
            if kind != np.dtype("i1"):
                a[flat] += (p.signs[flat] * step[p.bits[flat]]) * s * g
        # int8: flip single LSBs in keyed order until each bit's remaining need is met
        for a, p, kind, mv, (flat, s) in zip(out, preps, kinds, moved, flats):
            if kind != np.dtype("i1") or s <= 0:
                continue
            idx = np.nonzero(flat & ~mv)[0]
            idx = idx[np.argsort(p.order[idx])]
            unit = 1.0 / s
            bits = p.bits[idx]
            want = np.round(remaining[bits] / unit)  # signed LSB count wanted per bit
            # rank of each weight within its bit, in keyed order
            rank = np.zeros(len(idx), np.int64)
            if len(idx):
                srt = np.argsort(bits, kind="stable")
                b_sorted = bits[srt]
                starts = np.searchsorted(b_sorted, b_sorted, side="left")
                rank[srt] = np.arange(len(idx)) - starts
            take = rank < np.abs(want)
            sel = idx[take]
            a[sel] += p.signs[sel] * np.sign(want[take])
            mv[sel] = True
            done = np.bincount(bits[take], minlength=CODE_BITS) * unit * np.sign(remaining)
            remaining = remaining - done
        for i, kind in enumerate(kinds):  # storage precision, so the next pass sees real values
            out[i] = out[i].astype(kind).astype(np.float64)
    return out


@dataclasses.dataclass
class VerifyResult:
    detected: bool
    device_id: int | None       # decoded id whose tag verified (blind), or best candidate
    tag_ok: bool
    z: float                    # correlation statistic of the reported id's codeword
    false_positive_probability: float
    code_bit_errors: int        # raw code bits disagreeing with the reported id's codeword
    candidate_threshold: float | None = None

    def as_dict(self):
        d = dataclasses.asdict(self)
        d["device_id"] = None if self.device_id is None else f"{self.device_id:016x}"
        return d

    def summary(self) -> str:
        if not self.detected:
            return (f"no watermark for this key (z={self.z:.1f}, tag {'ok' if self.tag_ok else 'invalid'})")
        return (f"watermark found: device {self.device_id:016x} (z={self.z:.1f}, code-bit errors "
                f"{self.code_bit_errors}/{CODE_BITS}, false-positive probability <= "
                f"{self.false_positive_probability:.1e})")


def soft_bits(arrays, tids, key: bytes) -> np.ndarray:
    master, preps, N = _prepare(key, tids, [len(a) for a in arrays])
    return _soft(_projections(arrays, preps, N), _dither(master), _delta(N))


def _z(soft, code) -> float:
    """Correlation of the soft bits with a codeword, normalised by the soft energy: for a
    codeword unrelated to the mark (random signs), z is ~N(0, 1) and, by Hoeffding,
    P(z >= t) <= exp(-t^2/2) whatever the soft values are."""
    energy = float(np.sum(soft * soft))
    if energy <= 0:
        return 0.0
    return float(np.sum(soft * (1 - 2 * code.astype(np.float64))) / math.sqrt(energy))


def _norm_isf(p: float) -> float:
    """Inverse survival function of N(0,1) by bisection (no scipy on purpose)."""
    lo, hi = 0.0, 40.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if 0.5 * math.erfc(mid / math.sqrt(2)) > p:
            lo = mid
        else:
            hi = mid
    return hi


def candidate_threshold(n_candidates: int) -> float:
    """z threshold with family-wise false-positive probability <= FPR_TARGET (Hoeffding bound)."""
    return math.sqrt(2 * math.log(max(1, n_candidates) / FPR_TARGET))


def verify_arrays(arrays, tids, key: bytes, candidates=None) -> VerifyResult:
    soft = soft_bits(arrays, tids, key)
    payload = viterbi(soft)
    word = int("".join(map(str, payload)), 2)
    dev, tag = _feistel(key, word >> 32, inverse=True), word & 0xFFFFFFFF
    tag_ok = tag == tag_for(key, dev)
    code = conv_encode(_payload_bits(key, dev))
    hard = (soft < 0).astype(np.int8)
    if candidates:
        thr = candidate_threshold(len(candidates))
        scores = [(_z(soft, conv_encode(_payload_bits(key, c))), c) for c in candidates]
        z, best = max(scores)
        bc = conv_encode(_payload_bits(key, best))
        return VerifyResult(z >= thr, best, tag_ok and best == dev, z, FPR_TARGET,
                            int(np.sum(hard != bc)), thr)
    return VerifyResult(tag_ok, dev if tag_ok else None, tag_ok, _z(soft, code), 2.0 ** -32,
                        int(np.sum(hard != code)))


# --- model-level API ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class EmbedResult:
    model: bytes
    n_tensors: int
    n_weights: int
    fidelity_weighted: bool = False   # moves weighted by measured output cost (tensor_costs)


def _smooth_images(rng, shape) -> np.ndarray:
    """Low-resolution noise upsampled (bilinear), in [0, 1]: closer to natural images than white noise."""
    n, h, w, c = shape
    low = rng.random((n, 8, 8, c))
    ys, xs = np.linspace(0, 7, h), np.linspace(0, 7, w)
    y0, x0 = np.floor(ys).astype(int).clip(0, 6), np.floor(xs).astype(int).clip(0, 6)
    fy, fx = (ys - y0)[None, :, None, None], (xs - x0)[None, None, :, None]
    return (low[:, y0][:, :, x0] * (1 - fy) * (1 - fx) + low[:, y0 + 1][:, :, x0] * fy * (1 - fx)
            + low[:, y0][:, :, x0 + 1] * (1 - fy) * fx + low[:, y0 + 1][:, :, x0 + 1] * fy * fx)


def _synthetic_input(rng, detail) -> np.ndarray:
    shape, dtype = [max(1, int(d)) for d in detail["shape"]], np.dtype(detail["dtype"])
    if dtype.kind == "f":
        if len(shape) == 4 and shape[3] in (1, 3, 4) and shape[1] >= 8 and shape[2] >= 8:
            return _smooth_images(rng, shape).astype(dtype)
        return rng.random(shape).astype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(max(info.min, -128), min(info.max, 127) + 1, shape).astype(dtype)
    return np.zeros(shape, dtype)


def tensor_costs(model: bytes, tensors=None, arrays=None, n_inputs: int = COST_INPUTS, seed: int = 0,
                 probes: int = COST_PROBES):
    """Output cost per unit of move for each weight tensor, measured with the TFLite
    interpreter (host only) on `n_inputs` seeded synthetic inputs: a random +-COST_PROBE * s
    move on the tensor's flat weights, the relative L2 change of every output, per sqrt(moved
    weights); outputs are weighed by their error under equal moves, so no head dominates
    because its values are small. Returns None if no interpreter can run the model."""
    try:
        from appliance.runtime.interp import load_interpreter_class
        Interpreter = load_interpreter_class()
    except Exception:
        return None
    tensors = tensors if tensors is not None else weight_tensors(model)
    arrays = arrays if arrays is not None else read_arrays(model, tensors)
    rng = np.random.default_rng(seed)

    def outputs(m):
        it = Interpreter(model_content=m, num_threads=1)
        it.allocate_tensors()
        res = []
        for x in feeds:
            for d, v in zip(it.get_input_details(), x):
                it.set_tensor(d["index"], v)
            it.invoke()
            res.append([it.get_tensor(o["index"]).astype(np.float64).ravel() for o in it.get_output_details()])
        return [np.concatenate([r[k] for r in res]) for k in range(len(res[0]))]

    try:
        probe = Interpreter(model_content=model, num_threads=1)
        probe.allocate_tensors()
        feeds = [[_synthetic_input(rng, d) for d in probe.get_input_details()] for _ in range(n_inputs)]
        base = outputs(model)
        S, nflat = [], []
        for t, a in zip(tensors, arrays):
            s, lo = _stats(a)
            flat = np.abs(a) > lo * 1.02 + 1e-12
            sq = np.zeros(len(base))
            for _ in range(probes):
                b = a.copy()
                b[flat] += rng.choice([-1.0, 1.0], int(flat.sum())) * COST_PROBE * s
                moved = outputs(write_arrays(model, [t], [b]))
                sq += [(np.linalg.norm(m - o) / max(np.linalg.norm(o), 1e-30)) ** 2 for m, o in zip(moved, base)]
            S.append(np.sqrt(sq / probes))
            nflat.append(max(int(flat.sum()), 1))
    except Exception:  # custom ops, odd inputs: no measurement, equal weighting
        return None
    S = np.asarray(S) / np.sqrt(np.asarray(nflat, np.float64))[:, None]
    equal = (S ** 2 * np.asarray(nflat)[:, None]).sum(axis=0)   # each output's error, equal moves
    if not np.all(np.isfinite(S)) or not np.any(equal > 0):
        return None
    # Each output relative to its own error under equal moves, weighed by its number of values
    # (a one-value score head is judged by its decision, not its L2, and is noisy to estimate).
    size = np.asarray([len(o) for o in base], np.float64)
    w = size / size.sum() / np.maximum(equal, 1e-300)
    return list(np.sqrt((S ** 2 * w[None, :]).sum(axis=1)))


def embed(model: bytes, key: bytes, device_id: int, fidelity: bool = True) -> EmbedResult:
    """Mark `model` for `device_id`. `fidelity`: weight the moves by measured output cost
    (needs the TFLite interpreter; falls back to equal weighting)."""
    if not 0 <= device_id < 1 << 64:
        raise FormatError("device id must fit in 64 bits")
    tensors = weight_tensors(model)
    arrays = read_arrays(model, tensors)
    costs = tensor_costs(model, tensors, arrays) if fidelity and len(tensors) > 1 else None
    marked = embed_arrays(arrays, [t.dtype for t in tensors], [t.tid for t in tensors], key, device_id,
                          costs=costs)
    out = write_arrays(model, tensors, marked)
    res = verify(out, key)
    if not res.detected or res.device_id != device_id:
        raise WatermarkError("model too small to carry the watermark reliably "
                             f"({sum(t.count for t in tensors)} eligible weights)")
    return EmbedResult(out, len(tensors), sum(t.count for t in tensors), costs is not None)


def verify(model: bytes, key: bytes, candidates=None) -> VerifyResult:
    tensors = weight_tensors(model)
    if not tensors:
        raise WatermarkError("model has no eligible weight tensors")
    return verify_arrays(read_arrays(model, tensors), [t.tid for t in tensors], key, candidates)
