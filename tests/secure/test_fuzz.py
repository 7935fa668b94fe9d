"""Hypothesis fuzzing of the strict parsers: arbitrary input gives a FormatError, never a crash."""
import hashlib
import struct

from hypothesis import given, settings, strategies as st, HealthCheck

from appliance.secure import envelope as env
from appliance.secure.errors import FormatError

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                           max_leaves=10)


def _only_format_errors(fn, raw):
    try:
        fn(raw)
    except FormatError as e:
        assert "\n" not in str(e) and str(e)


@SETTINGS
@given(st.binary(max_size=400))
def test_manifest_header_keyblock_random_bytes(raw):
    for fn in (env.parse_manifest, env.parse_header, env.parse_keyblock, env.parse_package):
        _only_format_errors(fn, raw)


@SETTINGS
@given(st.dictionaries(st.sampled_from(sorted(env.MANIFEST_KEYS | env.HEADER_KEYS | {"zz"})), json_values))
def test_json_objects_with_known_keys(obj):
    raw = env.canonical_json(obj)
    for fn in (env.parse_manifest, env.parse_header, env.parse_keyblock):
        _only_format_errors(fn, raw)


GOOD = env.Manifest("model", "1.2.3", hashlib.sha256(b"x").hexdigest(), 1, ("qemu-arm64",), "00000000000000ff")


def test_unrepresentable_numbers_are_format_errors():
    for raw in (b'{"format":1e400}', b'{"format":' + b"9" * 5000 + b"}", b"[" * 100000):
        _only_format_errors(env.parse_manifest, raw)


@SETTINGS
@given(st.data())
def test_mutated_valid_manifest(data):
    raw = bytearray(GOOD.to_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    try:
        m = env.parse_manifest(bytes(raw))
        # whatever parses must re-serialise to the exact same bytes (canonical form)
        assert m.to_bytes() == bytes(raw)
    except FormatError:
        pass


@SETTINGS
@given(st.binary(max_size=64), st.integers(0, 2**32 - 1), st.integers(0, 2**16 - 1))
def test_package_framing_with_hostile_lengths(body, n1, n2):
    raw = env.MAGIC + struct.pack(">I", n1) + body + struct.pack(">H", n2) + body
    _only_format_errors(env.parse_package, raw)
