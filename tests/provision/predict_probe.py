"""Device-side self-test run over SSH by the fleet tests: load the delivered model through
the secure store (decrypting with the device's token) and have the TFLite interpreter answer
a prediction, compared with the numpy reference of the same (watermarked) weights."""

import sys

import numpy as np

from appliance.runtime.interp import load_interpreter_class
from appliance.runtime.tinymodels import reference_output
from appliance.secure.source import SecureModelSource

m = SecureModelSource.from_env().load(sys.argv[1])
it = load_interpreter_class()(model_content=m.content, num_threads=1)
it.allocate_tensors()
inp, out = it.get_input_details()[0], it.get_output_details()[0]
x = np.linspace(-1, 1, int(np.prod(inp["shape"])), dtype=np.float32).reshape(inp["shape"])
it.set_tensor(inp["index"], x)
it.invoke()
y = it.get_tensor(out["index"])
err = float(np.max(np.abs(y - reference_output(m.content, x))))
if err > 1e-4:
    sys.exit(f"prediction differs from the reference by {err}")
print(f"prediction ok {m.name} {m.version} shape={list(y.shape)} maxerr={err:.2e}")
