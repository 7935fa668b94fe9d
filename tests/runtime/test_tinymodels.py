"""The tiny flatbuffer models run in the real TFLite interpreter and match numpy."""
import numpy as np
import pytest

from appliance.runtime import tinymodels
from appliance.runtime.interp import load_interpreter_class

Interpreter = load_interpreter_class()


def _run(model: bytes, x: np.ndarray) -> np.ndarray:
    it = Interpreter(model_content=model, num_threads=1)
    d = it.get_input_details()[0]
    if tuple(d["shape"]) != x.shape:
        it.resize_tensor_input(d["index"], list(x.shape))
    it.allocate_tensors()
    it.set_tensor(d["index"], x)
    it.invoke()
    return it.get_tensor(it.get_output_details()[0]["index"])


@pytest.mark.parametrize("batch,run_batch", [(1, 1), (1, 7), (4, 4)])
def test_f32_matches_numpy(batch, run_batch):
    m = tinymodels.fully_connected_f32(16, 5, batch=batch, seed=3)
    x = np.random.default_rng(0).standard_normal((run_batch, 16)).astype(np.float32)
    y = _run(m, x)
    assert y.shape == (run_batch, 5) and y.dtype == np.float32
    np.testing.assert_allclose(y, tinymodels.reference_output(m, x), rtol=1e-5, atol=1e-5)


def test_int8_matches_numpy_within_one_lsb():
    m = tinymodels.fully_connected_int8(32, 6, seed=5)
    x = np.random.default_rng(1).integers(-128, 128, (9, 32)).astype(np.int8)
    y = _run(m, x)
    ref = tinymodels.reference_output(m, x)
    assert y.dtype == np.int8 and y.shape == (9, 6)
    # TFLite requantises with a fixed-point multiplier; numpy rounds in float: 1 LSB apart at most.
    assert np.abs(y.astype(int) - ref.astype(int)).max() <= 1
    # The quantisation is chosen so that outputs are not all saturated (a meaningful check).
    assert len(np.unique(y)) > 10


def test_int8_model_declares_quantisation():
    m = tinymodels.fully_connected_int8(4, 2)
    it = Interpreter(model_content=m, num_threads=1)
    d = it.get_input_details()[0]
    assert d["dtype"] == np.int8 and d["quantization"][0] == pytest.approx(0.05)
    assert list(d["shape_signature"]) == [-1, 4]


def test_seed_changes_weights_and_is_deterministic():
    a = tinymodels.fully_connected_f32(8, 3, seed=0)
    assert a == tinymodels.fully_connected_f32(8, 3, seed=0)
    b = tinymodels.fully_connected_f32(8, 3, seed=1)
    x = np.ones((1, 8), np.float32)
    assert not np.allclose(_run(a, x), _run(b, x))


@pytest.mark.parametrize("args", [(0, 3), (3, -1), (2, 2, 0)])
def test_bad_dimensions_rejected(args):
    with pytest.raises(ValueError, match="must be a positive int"):
        tinymodels.fully_connected_f32(*args)


def test_reference_rejects_foreign_model():
    with pytest.raises(Exception):
        tinymodels.reference_output(b"not a model at all, just bytes...", np.zeros((1, 2)))
