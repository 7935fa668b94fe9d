"""The stage cache: atomic publish, no entry after a failed stage, LRU pruning."""
import os
import time

import pytest

from appliance.image import cache


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("APPLIANCE_CACHE_DIR", str(tmp_path / "cache"))


def test_miss_then_hit():
    calls = []

    def produce(d):
        calls.append(d)
        (d / "out").write_text("x")

    e1, hit1 = cache.cached("s", "k", produce)
    e2, hit2 = cache.cached("s", "k", produce)
    assert (hit1, hit2) == (False, True) and e1 == e2 and len(calls) == 1
    assert (e1 / "out").read_text() == "x"


def test_failed_stage_leaves_nothing(tmp_path):
    def produce(d):
        (d / "half").write_text("written")
        raise RuntimeError("mmdebstrap died")

    with pytest.raises(RuntimeError):
        cache.cached("s", "k", produce)
    assert cache.lookup("s", "k") is None
    assert list((tmp_path / "cache" / "s").iterdir()) == []


def test_prune_keeps_most_recently_used():
    for i in range(4):
        cache.cached("p", f"k{i}", lambda d: None)
        past = time.time() - 100 + i
        os.utime(cache.cache_root() / "p" / f"k{i}" / ".complete", (past, past))
    cache.lookup("p", "k0")            # used just now
    removed = cache.prune("p", keep=2)
    assert sorted(removed) == ["k1", "k2"]
    assert cache.lookup("p", "k0") and cache.lookup("p", "k3")


def test_inputs_hash_is_order_independent():
    assert cache.inputs_hash({"a": 1, "b": [1, 2]}) == cache.inputs_hash({"b": [1, 2], "a": 1})
    assert cache.inputs_hash({"a": 1}) != cache.inputs_hash({"a": 2})


def test_concurrent_publisher_wins_and_is_not_replaced():
    def produce_racing(d):
        # another build publishes the same key while this one is still producing
        cache.cached("r", "k", lambda d2: (d2 / "who").write_text("first"))
        (d / "who").write_text("second")

    entry, hit = cache.cached("r", "k", produce_racing)
    assert (entry / "who").read_text() == "first"
    assert [p.name for p in (cache.cache_root() / "r").iterdir()] == ["k"]
