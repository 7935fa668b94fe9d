"""Pure planning of the agent bundle: validation and what each cache key depends on."""
import shutil

import pytest

from appliance.image import bundle
from appliance.image.errors import BuildError


def test_default_backend_follows_suite():
    assert bundle.plan_bundle("arm64", "trixie").backend == "litert"
    assert bundle.plan_bundle("amd64", "bookworm").backend == "tflite_runtime"
    assert bundle.plan_bundle("amd64", "bookworm", "litert").backend == "litert"


@pytest.mark.parametrize("args,needle", [
    (("riscv64", "trixie"), "unsupported arch"),
    (("amd64", "sid"), "unsupported suite"),
    (("amd64", "trixie", "onnx"), "unknown runtime backend"),
    (("arm64", "trixie", "tflite_runtime"), "no wheels for Python 3.13"),
])
def test_bad_combinations_are_one_line_errors(args, needle):
    with pytest.raises(BuildError, match=needle) as e:
        bundle.plan_bundle(*args)
    assert "\n" not in str(e.value)


def test_pins_and_hidden_imports():
    p = bundle.plan_bundle("amd64", "bookworm")
    assert "tflite-runtime==2.14.0" in p.requirements and "numpy==1.26.4" in p.requirements
    assert p.builder_apt == ("libpython3.11",)
    opts = p.pyinstaller_options
    assert "--onedir" in opts and "--strip" in opts and "--onefile" not in opts
    hidden = {opts[i + 1] for i, o in enumerate(opts) if o == "--hidden-import"}
    assert {"tflite_runtime.interpreter", "appliance.runtime.server", "appliance.runtime.cli"} <= hidden
    assert not any(h.startswith(("appliance.image", "appliance.provision")) for h in hidden)


def test_keys_depend_on_the_right_inputs(tmp_path):
    for pkg in ("runtime", "power", "secure"):
        shutil.copytree(bundle.REPO / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    a = bundle.plan_bundle("amd64", "trixie", source_root=tmp_path)
    (tmp_path / "runtime" / "server.py").write_text((tmp_path / "runtime" / "server.py").read_text() + "\n# edit\n")
    b = bundle.plan_bundle("amd64", "trixie", source_root=tmp_path)
    # A device source edit re-runs only PyInstaller, not mmdebstrap or pip.
    assert a.bundle_key() != b.bundle_key()
    assert a.builder_key() == b.builder_key() and a.chroot_key() == b.chroot_key()
    # Another backend: new pip step and bundle, same chroot.
    c = bundle.plan_bundle("amd64", "bookworm", source_root=tmp_path)
    d = bundle.plan_bundle("amd64", "bookworm", "litert", source_root=tmp_path)
    assert c.chroot_key() == d.chroot_key() and c.builder_key() != d.builder_key()
    # Architecture changes everything.
    e = bundle.plan_bundle("arm64", "trixie", source_root=tmp_path)
    assert e.chroot_key() != b.chroot_key()


def test_missing_runtime_source_is_an_error(tmp_path):
    with pytest.raises(BuildError, match="runtime"):
        bundle.plan_bundle("amd64", "trixie", source_root=tmp_path)
