"""boot-image: try an image in QEMU before flashing it (console on this terminal)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .boot import READY_MARKER, board_for_image, plan_boot, start
from .errors import BuildError

PROG = "boot-image"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Boot a built image in QEMU with its console on this terminal.")
    p.add_argument("image", type=Path)
    p.add_argument("--board", help="board of the image (default: from its manifest)")
    p.add_argument("--until-ready", action="store_true",
                   help=f"exit 0 once the device prints {READY_MARKER}, non-zero on timeout or crash")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait with --until-ready (default 600)")
    p.add_argument("--forward", action="append", default=[], metavar="HOST:GUEST",
                   help="forward 127.0.0.1:HOST to the guest's TCP port GUEST (repeatable)")
    p.add_argument("--persist", action="store_true",
                   help="write guest changes into the image file (default: the image stays untouched)")
    p.add_argument("--log", type=Path, help="also write the console to this file")
    return p


def _forwards(specs: list[str]) -> list[tuple[int, int]]:
    out = []
    for s in specs:
        h, _, g = s.partition(":")
        if not (h.isdigit() and g.isdigit()):
            raise BuildError(f"--forward {s!r}: expected HOST_PORT:GUEST_PORT, e.g. 2222:22")
        out.append((int(h), int(g)))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        board = board_for_image(args.image, args.board)
        fwd = _forwards(args.forward)
        if not args.until_ready:
            if not args.image.is_file():
                raise BuildError(f"{args.image}: no such image")
            plan = plan_boot(board, args.image, console="stdio", forwards=fwd, snapshot=not args.persist)
            print(f"{PROG}: starting {board.name}; quit with Ctrl-A X", file=sys.stderr)
            os.execvp(plan.argv[0], list(plan.argv))
        m = start(args.image, board=board, forwards=fwd, snapshot=not args.persist, log_path=args.log,
                  tee=sys.stdout)
        with m:
            try:
                m.expect(READY_MARKER + r"[^\n]*\n", args.timeout)
            except TimeoutError as e:
                raise BuildError(str(e)) from None
        print(f"\n{PROG}: {board.name} is ready", file=sys.stderr)
        return 0
    except BuildError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
