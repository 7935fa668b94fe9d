"""build-image: a board name in, a flashable image out."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from .boards import board_names, default_boards_dir, load_board
from .config import DEFAULT_MIRROR, PROFILES, make_config
from .errors import BuildError

PROG = "build-image"


def list_boards(boards_dir: Path) -> list[str]:
    lines = []
    for name in board_names(boards_dir):
        b = load_board(name, boards_dir)
        if b.variants:
            for v, spec in b.variants.items():
                lines.append(f"{name} --variant {v:<12} {b.arch:<6} {spec.description or b.description}")
        else:
            lines.append(f"{name:<28} {b.arch:<6} {b.description}")
    return lines


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Build a bootable, locked-down disk image for a board.")
    p.add_argument("--board", help="board name (see --list-boards)")
    p.add_argument("--variant", help="board variant, e.g. rock-5b")
    p.add_argument("--profile", default="production", choices=PROFILES)
    p.add_argument("--out", type=Path, help="output directory (default: out/IMAGE_NAME)")
    p.add_argument("--bootloader", type=Path, metavar="DIR", help="directory with the board's boot blobs")
    p.add_argument("--mirror", default=DEFAULT_MIRROR, help="Debian mirror URL")
    p.add_argument("--image-version", default="0.1.0", help="version recorded in the image and manifest")
    p.add_argument("--templates-overlay", type=Path, metavar="DIR",
                   help="directory laid out like image/templates/ whose files replace or add to the built-in ones")
    p.add_argument("--data-tree", type=Path, metavar="DIR",
                   help="factory-default content of the data partition, e.g. DIR/models/*.tflite")
    p.add_argument("--signing-key", type=Path, metavar="PEM",
                   help="Ed25519 key that signs the manifest (default: made on first use in ~/.config/appliance)")
    p.add_argument("--ssh-ca", type=Path, metavar="PUB",
                   help="factory SSH user CA public key: sshd accepts certificates it signed (no other login)")
    p.add_argument("--vendor-key", type=Path, metavar="PEM",
                   help="model vendor's Ed25519 public key: the device store installs packages it signed")
    p.add_argument("--no-agent", action="store_true",
                   help="leave out the frozen appliance-agent (runtime, power, store): an OS-only image")
    p.add_argument("--boards-dir", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--list-boards", action="store_true", help="list boards and variants, one per line")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    boards_dir = args.boards_dir or default_boards_dir()
    console = Console(stderr=True)
    try:
        if args.list_boards:
            print("\n".join(list_boards(boards_dir)))
            return 0
        if not args.board:
            raise BuildError("--board is required (see --list-boards)")
        cfg = make_config(args.board, variant=args.variant, profile=args.profile, out_dir=args.out,
                          bootloader_dir=args.bootloader, mirror=args.mirror, boards_dir=boards_dir,
                          image_version=args.image_version, templates_overlay=args.templates_overlay,
                          with_agent=not args.no_agent, data_tree=args.data_tree,
                          signing_key=args.signing_key, ssh_ca=args.ssh_ca,
                          vendor_key=args.vendor_key)
        if cfg.board.bootloader and not cfg.bootloader_dir:
            console.print(f"note: no --bootloader given: this image carries no {cfg.board.name} boot blobs and "
                          "is for boards that boot from U-Boot in SPI flash")
        from .build import build

        res = build(cfg, console)
        m = res.manifest_data["image"]
        print(f"{res.image} ({m['bytes'] / 2**20:.0f} MiB, {m['mapped_bytes'] / 2**20:.0f} MiB mapped)")
        print(f"{res.bmap}\n{res.manifest} (+ .sig)\n{res.sbom}")
        if res.update:
            print(f"{res.update} (update bundle for devices running an older version)")
        return 0
    except BuildError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; no artefact was published", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
