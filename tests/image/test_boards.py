"""Board files: every shipped board validates; bad fields give one line naming file and field."""
import shutil
from pathlib import Path

import pytest

from appliance.image.boards import board_names, load_board, resolve_variant
from appliance.image.cli import main as build_image_main
from appliance.image.config import make_config
from appliance.image.errors import BuildError

REPO = Path(__file__).resolve().parents[2]


def test_shipped_boards_validate():
    names = board_names(REPO / "boards")
    assert {"qemu-arm64", "qemu-amd64", "rk3588", "x86-mini"} <= set(names)
    for n in names:
        b = load_board(n, REPO / "boards")
        assert b.name == n
        assert set(b.cpu.big) <= set(range(b.cpu.cores))


def test_rk3588_variants_and_dtbs():
    b = load_board("rk3588", REPO / "boards")
    assert resolve_variant(b, "rock-5b")[1].dtb == "rockchip/rk3588-rock-5b.dtb"
    assert resolve_variant(b, "orangepi-5")[1].dtb == "rockchip/rk3588s-orangepi-5.dtb"
    assert b.console == "ttyS2,1500000"
    with pytest.raises(BuildError, match="no variant 'rock-3a'"):
        resolve_variant(b, "rock-3a")


@pytest.fixture
def boards(tmp_path):
    d = tmp_path / "boards"
    shutil.copytree(REPO / "boards", d)
    return d


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize("old,new,field", [
    ('arch = "arm64"', 'arch = "riscv64"', "arch"),
    ("cores = 2", "cores = 0", "cpu.cores"),
    ("big = [0, 1]", "big = [0, 7]", "cpu"),
    ('console = "ttyAMA0,115200"', 'console = "serial"', "console"),
    ("root_mib = 1024", 'root_mib = "big"', "disk.root_mib"),
    ("[qemu]", "[qemu]\nturbo = true", "qemu.turbo"),
])
def test_bad_field_is_one_line_naming_file_and_field(boards, old, new, field):
    path = boards / "qemu-arm64.toml"
    _edit(path, old, new)
    with pytest.raises(BuildError) as e:
        load_board("qemu-arm64", boards)
    msg = str(e.value)
    assert "\n" not in msg
    assert str(path) in msg and f"'{field}'" in msg


def test_invalid_toml(boards):
    (boards / "qemu-arm64.toml").write_text("name = \n")
    with pytest.raises(BuildError, match=r"qemu-arm64\.toml: not valid TOML"):
        load_board("qemu-arm64", boards)


def test_blob_overlapping_first_partition_is_refused(boards):
    _edit(boards / "rk3588.toml", "first_partition_mib = 16", "first_partition_mib = 8")
    with pytest.raises(BuildError, match="u-boot.itb may run into the first partition"):
        load_board("rk3588", boards)


def test_bootloader_blob_too_big(tmp_path):
    d = tmp_path / "blobs"
    d.mkdir()
    (d / "idbloader.img").write_bytes(b"\1" * 8355841)
    (d / "u-boot.itb").write_bytes(b"\2" * 1000)
    with pytest.raises(BuildError, match=r"idbloader.img: 8355841 bytes; must be 1..8355840"):
        make_config("rk3588", variant="rock-5b", bootloader_dir=d, boards_dir=REPO / "boards")


def test_bootloader_missing_blob(tmp_path):
    (tmp_path / "u-boot.itb").write_bytes(b"x")
    with pytest.raises(BuildError, match="missing idbloader.img"):
        make_config("rk3588", bootloader_dir=tmp_path, boards_dir=REPO / "boards")


def test_cli_errors_are_one_line(capsys):
    assert build_image_main(["--board", "no-such-board"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown board 'no-such-board'" in err
    assert build_image_main(["--board", "rk3588", "--variant", "nope"]) == 2
    assert "no variant 'nope'" in capsys.readouterr().err


def test_list_boards(capsys):
    assert build_image_main(["--list-boards"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert any(l.startswith("rk3588 --variant rock-5b") for l in out)
    assert any(l.startswith("rk3588 --variant orangepi-5") for l in out)
    assert any(l.startswith("qemu-arm64 ") for l in out)


def test_unreachable_mirror_is_one_line_and_leaves_no_artefact(tmp_path, capsys, monkeypatch):
    # Port 9 on loopback refuses connections: a mirror that is down, without leaving this machine.
    monkeypatch.setenv("APPLIANCE_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "out"
    rc = build_image_main(["--board", "qemu-arm64", "--mirror", "http://127.0.0.1:9/debian",
                           "--out", str(out), "--no-agent"])
    errors = [l for l in capsys.readouterr().err.splitlines() if l.startswith("build-image: error:")]
    assert rc == 2 and len(errors) == 1
    assert "mirror http://127.0.0.1:9/debian unreachable" in errors[0] and "check --mirror" in errors[0]
    assert not list(out.glob("*.img*")) and not list(out.glob("*manifest*"))
    assert not list((tmp_path / "cache" / "rootfs").glob("*/.complete"))
