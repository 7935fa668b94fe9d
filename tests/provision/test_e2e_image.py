"""End to end with the image area's qemu-arm64 image: `provision flash` writes it (bmap +
read-back verify) to a card file, and `provision console` drives the real U-Boot of that
card in QEMU: interrupt autoboot, run commands with their exit status, continue to boot the
image to its APPLIANCE-READY marker.

The image is the session fixture from tests/conftest.py, built once for all e2e tests."""


import pytest

from appliance.provision.cli import main
from appliance.provision.console import BootStrategy
from appliance.provision.qemu import QemuBoard


@pytest.fixture
def image(qemu_arm64_debug):
    """The session's qemu-arm64 debug image (tests/conftest.py), shared with the image tests."""
    return qemu_arm64_debug[1]


@pytest.mark.e2e
def test_flash_real_image_then_boot_the_card_through_the_console(image, tmp_path, capsys):
    card = tmp_path / "card.img"
    with open(card, "wb") as f:  # a blank card, larger than the image
        f.truncate(image.image.stat().st_size + (256 << 20))
    assert main(["flash", str(image.image), "--to", str(card)]) == 0
    assert "verified" in capsys.readouterr().out

    board = QemuBoard(memory="1024", extra=["-smp", "2", "-drive", f"if=none,file={card},format=raw,id=d0",
                                            "-device", "virtio-blk-pci,drive=d0"])
    board.start()
    try:
        con = board.console(tmp_path / "console.log")
        st = BootStrategy(con)
        st.transition("uboot", 120)
        assert st.uboot.run("virtio scan").ok
        ls = st.uboot.run("ls virtio 0:1 /")
        assert ls.ok and "boot.scr" in ls.output
        assert not st.uboot.run("ls virtio 0:1 /no-such-dir").ok
        st.transition("ready", 600)  # sends `boot`, waits for the image's marker
        assert {"kernel", "ready"} <= set(con.seen) and con.seen["kernel"] < con.seen["ready"]
        con.close()
    finally:
        board.stop()
    log = (tmp_path / "console.log").read_text()
    assert "APPLIANCE-READY board=qemu-arm64" in log and "U-Boot 2023.01" in log
