"""Board power profiles: the shipped files load, match mainline, calibrate to the wall numbers,
and bad input gives one-line errors naming file and field."""
from __future__ import annotations

import json
import tomllib

import pytest

from appliance.power.errors import PowerError
from appliance.power.model import whole_board_w
from appliance.power.profile import (REPO_BOARDS, load_board_json, load_board_profile, parse_profile)


def test_rk3588_matches_mainline_opp_tables():
    p = load_board_profile("rk3588")
    assert [x.name for x in p.policies] == ["policy0", "policy4", "policy6"]
    a55, b01, b23 = p.policies
    assert a55.cpus == (0, 1, 2, 3) and b01.cpus == (4, 5) and b23.cpus == (6, 7)
    # rk3588-opp.dtsi cluster0: 1008..1800 MHz, 675..950 mV; clusters 1/2: 1200..2400 MHz, 675..1000 mV.
    assert [(o.khz, o.uv) for o in a55.opps][0] == (1008000, 675000)
    assert [(o.khz, o.uv) for o in a55.opps][-1] == (1800000, 950000)
    assert [o.khz for o in b01.opps] == [1200000, 1416000, 1608000, 1800000, 2016000, 2208000, 2400000]
    assert b01.opps == b23.opps
    assert (a55.dynamic_power_coefficient, b01.dynamic_power_coefficient) == (228, 416)
    assert {x.transition_latency_us for x in p.policies} == {40}
    sleep = p.idle_states[-1]
    assert (sleep.name, sleep.exit_latency_us, sleep.min_residency_us) == ("CPU_SLEEP", 120, 1000)


@pytest.mark.parametrize("board", ["rk3588", "x86-mini"])
def test_calibration_reproduces_wall_measurements(board):
    p = load_board_profile(board)
    assert whole_board_w(p) == pytest.approx(p.idle_w, rel=1e-9)
    stress = {pol.name: (len(pol.cpus), len(pol.opps) - 1) for pol in p.policies}
    assert whole_board_w(p, stress) == pytest.approx(p.stress_w, rel=1e-9)
    # One core busy at top speed lands strictly between idle and stress, and costs more at
    # the top OPP than at the bottom one.
    last = p.policies[-1]
    one_top = whole_board_w(p, {last.name: (1, len(last.opps) - 1)})
    assert p.idle_w < whole_board_w(p, {last.name: (1, 0)}) < one_top < p.stress_w


def test_rk3588_k_cal_documented_value():
    # The TOML comment says k_cal ~ 1.57 for the leakage assumptions it documents.
    assert load_board_profile("rk3588").k_cal == pytest.approx(1.57, abs=0.01)


def test_x86_pstate_range_expanded():
    p = load_board_profile("x86-mini")
    f = p.policies[0].freqs()
    assert f[0] == 700e6 and f[-1] == 3400e6 and len(f) == 28
    assert p.policies[0].opps[0].uv == 650000 and p.policies[0].opps[-1].uv == 1150000


@pytest.mark.parametrize("board", ["qemu-arm64", "qemu-amd64"])
def test_qemu_profiles_are_observe_only(board):
    p = load_board_profile(board)
    assert p.observe_only and p.policies == ()


def _rk3588() -> dict:
    return tomllib.loads((REPO_BOARDS / "rk3588.power.toml").read_text())


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d["policies"][1]["opp"].__setitem__(2, [1608000]), "policies[1].opp[2]"),
    (lambda d: d["policies"][1]["opp"].__setitem__(2, [1000000, 700000]), "policies[1].opp[2]"),
    (lambda d: d["policies"][0].pop("dynamic_power_coefficient"), "policies[0].dynamic_power_coefficient"),
    (lambda d: d["policies"][2].__setitem__("cpus", [5, 6]), "policies[2].cpus"),
    (lambda d: d["service"].__setitem__("policies", ["policy9"]), "service.policies"),
    (lambda d: d["service"].__setitem__("policies", ["policy0", "policy4"]), "service.policies"),
    (lambda d: d["thermal"].__setitem__("limit_c", 90.0), "thermal.limit_c"),
    (lambda d: d["calibration"].__setitem__("stress_w", 1.1), "calibration.stress_w"),
    (lambda d: d["calibration"].__setitem__("idle_w", "1 W"), "calibration.idle_w"),
    (lambda d: d.__setitem__("colour", "red"), "colour"),
])
def test_validation_errors_are_one_line_with_field(mutate, field):
    d = _rk3588()
    mutate(d)
    with pytest.raises(PowerError) as e:
        parse_profile(d, "boards/rk3588.power.toml")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("boards/rk3588.power.toml: field ")
    assert f"'{field}'" in msg


def test_bad_toml_and_unknown_board(tmp_path):
    (tmp_path / "b.power.toml").write_text("name = \n")
    with pytest.raises(PowerError, match=r"b\.power\.toml: not valid TOML"):
        load_board_profile("b", tmp_path)
    with pytest.raises(PowerError, match=r"no power profile for board 'nope' \(known: b;"):
        load_board_profile("nope", tmp_path)


def test_board_json_key_power(tmp_path):
    bj = tmp_path / "board.json"
    bj.write_text(json.dumps({"name": "rk3588", "power": _rk3588()}))
    p = load_board_json(bj)
    assert p.name == "rk3588" and len(p.policies) == 3
    bj.write_text(json.dumps({"name": "x"}))
    assert load_board_json(bj) is None
    bj.write_text("{")
    with pytest.raises(PowerError, match="board.json: not valid JSON"):
        load_board_json(bj)
    d = _rk3588()
    d["service"]["threads"] = 9
    bj.write_text(json.dumps({"power": d}))
    with pytest.raises(PowerError, match=r"board.json \(key 'power'\): field 'service.threads'"):
        load_board_json(bj)


def test_boards_dir_env(tmp_path, monkeypatch):
    (tmp_path / "rk3588.power.toml").write_text((REPO_BOARDS / "rk3588.power.toml").read_text())
    monkeypatch.setenv("APPLIANCE_BOARDS_DIR", str(tmp_path))
    assert load_board_profile("rk3588").source == str(tmp_path / "rk3588.power.toml")
