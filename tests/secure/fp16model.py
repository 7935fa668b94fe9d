"""A tiny float16-weights model the way converters emit them: the weights are a FLOAT16
constant behind a DEQUANTIZE op feeding FULLY_CONNECTED. It also carries two FLOAT16 constants
sharing one buffer (unused by the graph), which the watermark must leave alone. Built with
flatbuffers + the `tflite` schema package, like appliance.runtime.tinymodels."""
import importlib

import numpy as np

DEQUANTIZE, FULLY_CONNECTED = 6, 9
F32, F16 = 0, 1


def fc_fp16(in_features=512, out_features=256, seed=0):
    import flatbuffers

    S = lambda n: importlib.import_module(f"tflite.{n}")  # noqa: E731
    T, Op, OpC, SG, Buf, M, FCO = (S(n) for n in ("Tensor", "Operator", "OperatorCode", "SubGraph",
                                                   "Buffer", "Model", "FullyConnectedOptions"))
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((out_features, in_features)) / np.sqrt(in_features)).astype(np.float16)
    b = rng.standard_normal(out_features).astype(np.float32) * 0.1
    shared = rng.standard_normal((64, 64)).astype(np.float16)
    fb = flatbuffers.Builder(1 << 20)
    ivec = lambda v: fb.CreateNumpyVector(np.asarray(v, np.int32))  # noqa: E731

    def buffer(data):
        vec = fb.CreateNumpyVector(np.frombuffer(data, np.uint8)) if data else None
        Buf.BufferStart(fb)
        if vec is not None:
            Buf.BufferAddData(fb, vec)
        return Buf.BufferEnd(fb)

    buffers = [buffer(None), buffer(None), buffer(w.tobytes()), buffer(None), buffer(b.tobytes()),
               buffer(None), buffer(shared.tobytes())]
    specs = [("input", [1, in_features], F32, 1), ("weights_f16", [out_features, in_features], F16, 2),
             ("weights", [out_features, in_features], F32, 3), ("bias", [out_features], F32, 4),
             ("output", [1, out_features], F32, 5), ("shared_a", [64, 64], F16, 6), ("shared_b", [64, 64], F16, 6)]
    tensors = []
    for name, shape, typ, buf in specs:
        n, s = fb.CreateString(name), ivec(shape)
        T.TensorStart(fb)
        T.TensorAddShape(fb, s)
        T.TensorAddType(fb, typ)
        T.TensorAddBuffer(fb, buf)
        T.TensorAddName(fb, n)
        tensors.append(T.TensorEnd(fb))
    FCO.FullyConnectedOptionsStart(fb)
    fco = FCO.FullyConnectedOptionsEnd(fb)
    ops = []
    for code, ins, outs, opts in ((0, [1], [2], None), (1, [0, 2, 3], [4], fco)):
        i, o = ivec(ins), ivec(outs)
        Op.OperatorStart(fb)
        Op.OperatorAddOpcodeIndex(fb, code)
        Op.OperatorAddInputs(fb, i)
        Op.OperatorAddOutputs(fb, o)
        if opts is not None:
            Op.OperatorAddBuiltinOptionsType(fb, 8)
            Op.OperatorAddBuiltinOptions(fb, opts)
        ops.append(Op.OperatorEnd(fb))

    def vector(start, items):
        start(fb, len(items))
        for it in reversed(items):
            fb.PrependUOffsetTRelative(it)
        return fb.EndVector()

    tv, ov = vector(SG.SubGraphStartTensorsVector, tensors), vector(SG.SubGraphStartOperatorsVector, ops)
    si, so = ivec([0]), ivec([4])
    SG.SubGraphStart(fb)
    SG.SubGraphAddTensors(fb, tv)
    SG.SubGraphAddInputs(fb, si)
    SG.SubGraphAddOutputs(fb, so)
    SG.SubGraphAddOperators(fb, ov)
    sg = SG.SubGraphEnd(fb)
    codes = []
    for code, ver in ((DEQUANTIZE, 3), (FULLY_CONNECTED, 1)):
        OpC.OperatorCodeStart(fb)
        OpC.OperatorCodeAddDeprecatedBuiltinCode(fb, code)
        OpC.OperatorCodeAddBuiltinCode(fb, code)
        OpC.OperatorCodeAddVersion(fb, ver)
        codes.append(OpC.OperatorCodeEnd(fb))
    cv, sv, bv = (vector(M.ModelStartOperatorCodesVector, codes), vector(M.ModelStartSubgraphsVector, [sg]),
                  vector(M.ModelStartBuffersVector, buffers))
    M.ModelStart(fb)
    M.ModelAddVersion(fb, 3)
    M.ModelAddOperatorCodes(fb, cv)
    M.ModelAddSubgraphs(fb, sv)
    M.ModelAddBuffers(fb, bv)
    fb.Finish(M.ModelEnd(fb), file_identifier=b"TFL3")
    return bytes(fb.Output()), w, b
