"""Tiny .tflite models built without TensorFlow, for tests and examples.

Each model is one FULLY_CONNECTED op, ``y = x @ W.T + b``, written as a TFLite flatbuffer with
the ``flatbuffers`` package and the generated TFLite schema code of the ``tflite`` package.
The input's batch dimension is dynamic (shape signature ``[-1, in]``), so the interpreter
can resize it and the runtime can batch requests.

``reference_output(model_bytes, x)`` parses the same bytes back and computes the result with
numpy, so a test compares the real interpreter against an independent calculation.

Pitfalls measured here (see FACTS.md): ``from tflite import Model`` gives the class, so the
builder functions come from ``importlib.import_module("tflite.Model")``; buffer 0 must be the
empty sentinel buffer; int8 weights stay in [-127, 127] with zero point 0 (symmetric).

The ``tflite`` and ``flatbuffers`` imports happen inside the functions: the device bundle
never calls this module, so it should not have to carry those packages.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

import numpy as np

FULLY_CONNECTED = 9  # tflite.BuiltinOperator.FULLY_CONNECTED
_FC_OPTIONS = 8  # tflite.BuiltinOptions.FullyConnectedOptions
_FLOAT32, _INT32, _INT8 = 0, 2, 9  # tflite.TensorType

# Quantisation of the int8 model: chosen so that typical int8 inputs give outputs that
# use the int8 range without saturating everywhere.
_INT8_IN_SCALE, _INT8_IN_ZP = 0.05, 0
_INT8_W_SCALE = 0.01
_INT8_OUT_SCALE, _INT8_OUT_ZP = 0.1, 3


def _schema(name: str):
    return importlib.import_module(f"tflite.{name}")


@dataclass(frozen=True)
class _Quant:
    scale: float
    zero_point: int


def _weights(in_features: int, out_features: int, seed: int, int8: bool):
    rng = np.random.default_rng(seed)
    if int8:
        w = rng.integers(-127, 128, size=(out_features, in_features), dtype=np.int64).astype(np.int8)
        b = rng.integers(-500, 501, size=(out_features,), dtype=np.int64).astype(np.int32)
    else:
        w = rng.standard_normal((out_features, in_features)).astype(np.float32)
        b = rng.standard_normal((out_features,)).astype(np.float32)
    return w, b


def _check_dims(in_features: int, out_features: int, batch: int) -> None:
    for label, v in (("in_features", in_features), ("out_features", out_features), ("batch", batch)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{label} must be a positive int, got {v!r}")


def _build(in_features: int, out_features: int, batch: int, w: np.ndarray, b: np.ndarray,
           ttype: int, btype: int, quants: tuple[_Quant, _Quant, _Quant, _Quant] | None,
           dynamic_batch: bool = True) -> bytes:
    import flatbuffers

    T, Q, Op, OpC, SG, Buf, M, FCO = (_schema(n) for n in (
        "Tensor", "QuantizationParameters", "Operator", "OperatorCode", "SubGraph", "Buffer",
        "Model", "FullyConnectedOptions"))
    fb = flatbuffers.Builder(1024)

    def ivec(values, dtype=np.int32):
        return fb.CreateNumpyVector(np.asarray(values, dtype=dtype))

    # Buffers: 0 empty sentinel, 1 input (none), 2 weights, 3 bias, 4 output (none).
    def buffer(data: bytes | None):
        vec = fb.CreateNumpyVector(np.frombuffer(data, dtype=np.uint8)) if data else None
        Buf.BufferStart(fb)
        if vec is not None:
            Buf.BufferAddData(fb, vec)
        return Buf.BufferEnd(fb)

    buffers = [buffer(None), buffer(None), buffer(w.tobytes()), buffer(b.tobytes()), buffer(None)]

    def quant(q: _Quant | None):
        if q is None:
            return None
        scale = fb.CreateNumpyVector(np.array([q.scale], dtype=np.float32))
        zp = fb.CreateNumpyVector(np.array([q.zero_point], dtype=np.int64))
        Q.QuantizationParametersStart(fb)
        Q.QuantizationParametersAddScale(fb, scale)
        Q.QuantizationParametersAddZeroPoint(fb, zp)
        return Q.QuantizationParametersEnd(fb)

    lead = -1 if dynamic_batch else batch
    specs = [  # name, shape, signature, type, buffer index
        ("input", [batch, in_features], [lead, in_features], ttype, 1),
        ("weights", [out_features, in_features], None, ttype, 2),
        ("bias", [out_features], None, btype, 3),
        ("output", [batch, out_features], [lead, out_features], ttype, 4),
    ]
    tensors = []
    for i, (name, shape, sig, typ, buf) in enumerate(specs):
        name_off = fb.CreateString(name)
        shape_off = ivec(shape)
        sig_off = ivec(sig) if sig is not None else None
        q_off = quant(quants[i] if quants else None)
        T.TensorStart(fb)
        T.TensorAddShape(fb, shape_off)
        if sig_off is not None:
            T.TensorAddShapeSignature(fb, sig_off)
        T.TensorAddType(fb, typ)
        T.TensorAddBuffer(fb, buf)
        T.TensorAddName(fb, name_off)
        if q_off is not None:
            T.TensorAddQuantization(fb, q_off)
        tensors.append(T.TensorEnd(fb))

    FCO.FullyConnectedOptionsStart(fb)
    FCO.FullyConnectedOptionsAddFusedActivationFunction(fb, 0)  # NONE
    fc_opts = FCO.FullyConnectedOptionsEnd(fb)

    op_inputs, op_outputs = ivec([0, 1, 2]), ivec([3])
    Op.OperatorStart(fb)
    Op.OperatorAddOpcodeIndex(fb, 0)
    Op.OperatorAddInputs(fb, op_inputs)
    Op.OperatorAddOutputs(fb, op_outputs)
    Op.OperatorAddBuiltinOptionsType(fb, _FC_OPTIONS)
    Op.OperatorAddBuiltinOptions(fb, fc_opts)
    op = Op.OperatorEnd(fb)

    def vector(start_fn, items):
        start_fn(fb, len(items))
        for it in reversed(items):
            fb.PrependUOffsetTRelative(it)
        return fb.EndVector()

    tensors_vec = vector(SG.SubGraphStartTensorsVector, tensors)
    ops_vec = vector(SG.SubGraphStartOperatorsVector, [op])
    sg_in, sg_out = ivec([0]), ivec([3])
    sg_name = fb.CreateString("main")
    SG.SubGraphStart(fb)
    SG.SubGraphAddTensors(fb, tensors_vec)
    SG.SubGraphAddInputs(fb, sg_in)
    SG.SubGraphAddOutputs(fb, sg_out)
    SG.SubGraphAddOperators(fb, ops_vec)
    SG.SubGraphAddName(fb, sg_name)
    subgraph = SG.SubGraphEnd(fb)

    OpC.OperatorCodeStart(fb)
    OpC.OperatorCodeAddDeprecatedBuiltinCode(fb, FULLY_CONNECTED)
    OpC.OperatorCodeAddBuiltinCode(fb, FULLY_CONNECTED)
    # int8 FULLY_CONNECTED is op version 4 in TFLite's versioning; float32 is version 1.
    OpC.OperatorCodeAddVersion(fb, 4 if ttype == _INT8 else 1)
    opcode = OpC.OperatorCodeEnd(fb)

    opcodes_vec = vector(M.ModelStartOperatorCodesVector, [opcode])
    subgraphs_vec = vector(M.ModelStartSubgraphsVector, [subgraph])
    buffers_vec = vector(M.ModelStartBuffersVector, buffers)
    desc = fb.CreateString("appliance.runtime.tinymodels")
    M.ModelStart(fb)
    M.ModelAddVersion(fb, 3)
    M.ModelAddOperatorCodes(fb, opcodes_vec)
    M.ModelAddSubgraphs(fb, subgraphs_vec)
    M.ModelAddDescription(fb, desc)
    M.ModelAddBuffers(fb, buffers_vec)
    fb.Finish(M.ModelEnd(fb), file_identifier=b"TFL3")
    return bytes(fb.Output())


def fully_connected_f32(in_features: int, out_features: int, batch: int = 1, seed: int = 0,
                        dynamic_batch: bool = True) -> bytes:
    """float32 FULLY_CONNECTED model: input [batch, in] float32 -> output [batch, out] float32.
    ``dynamic_batch=False`` declares a fixed leading dim (signature [batch, in]), like most
    converted vision models."""
    _check_dims(in_features, out_features, batch)
    w, b = _weights(in_features, out_features, seed, int8=False)
    return _build(in_features, out_features, batch, w, b, _FLOAT32, _FLOAT32, None, dynamic_batch)


def fully_connected_int8(in_features: int, out_features: int, batch: int = 1, seed: int = 0) -> bytes:
    """Fully int8-quantised FULLY_CONNECTED model: int8 input -> int8 output, int32 bias."""
    _check_dims(in_features, out_features, batch)
    w, b = _weights(in_features, out_features, seed, int8=True)
    quants = (
        _Quant(_INT8_IN_SCALE, _INT8_IN_ZP),
        _Quant(_INT8_W_SCALE, 0),
        _Quant(_INT8_IN_SCALE * _INT8_W_SCALE, 0),  # TFLite requires bias scale = in * w
        _Quant(_INT8_OUT_SCALE, _INT8_OUT_ZP),
    )
    return _build(in_features, out_features, batch, w, b, _INT8, _INT32, quants)


def _tensor_array(model, buffers_owner, tensor) -> np.ndarray:
    dtype = {_FLOAT32: np.float32, _INT32: np.int32, _INT8: np.int8}[tensor.Type()]
    buf = buffers_owner.Buffers(tensor.Buffer())
    data = buf.DataAsNumpy()
    return np.frombuffer(data.tobytes(), dtype=dtype).reshape(tensor.ShapeAsNumpy())


def reference_output(model_bytes: bytes, x: np.ndarray) -> np.ndarray:
    """numpy result of a model made by this module (parsed back from the bytes, not cached)."""
    from tflite.Model import Model

    model = Model.GetRootAs(model_bytes, 0)
    sg = model.Subgraphs(0)
    op = sg.Operators(0)
    code = model.OperatorCodes(op.OpcodeIndex())
    if max(code.BuiltinCode(), code.DeprecatedBuiltinCode()) != FULLY_CONNECTED or sg.OperatorsLength() != 1:
        raise ValueError("reference_output only knows the single FULLY_CONNECTED models of tinymodels")
    t_in, t_w, t_b, t_out = (sg.Tensors(i) for i in (*op.InputsAsNumpy(), op.OutputsAsNumpy()[0]))
    w = _tensor_array(model, model, t_w)
    b = _tensor_array(model, model, t_b)
    x = np.asarray(x)
    if t_in.Type() == _FLOAT32:
        return (x.astype(np.float32) @ w.T.astype(np.float32) + b).astype(np.float32)

    def q(t):
        qp = t.Quantization()
        return float(qp.ScaleAsNumpy()[0]), int(qp.ZeroPointAsNumpy()[0])

    s_in, zp_in = q(t_in)
    s_w, _ = q(t_w)
    s_out, zp_out = q(t_out)
    acc = (x.astype(np.int64) - zp_in) @ w.T.astype(np.int64) + b.astype(np.int64)
    y = np.round(acc * (s_in * s_w / s_out)) + zp_out
    return np.clip(y, -128, 127).astype(np.int8)
