"""`provision` command: flash images, drive serial consoles, configure fleets over SSH.

Every user-facing failure is a ProvisionError, printed as one line ``provision: error: ...``
with a non-zero exit status; no traceback reaches the user.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import ProvisionError

PROG = "provision"


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def cmd_flash(args: argparse.Namespace) -> int:
    if args.via == "direct":
        if args.to is None:
            raise ProvisionError("flash: --to TARGET is required (a block device or an image file)")
        from .flash import flash
        res = flash(Path(args.image), Path(args.to), bmap_path=args.bmap, yes=args.yes)
        print(f"flashed {args.image} -> {res.target}: {_human(res.written_bytes)} mapped in "
              f"{res.write_seconds:.2f} s; verified {res.verify.ranges} ranges "
              f"({_human(res.verify.bytes)}) read back in {res.verify.seconds:.2f} s")
        return 0
    if args.via == "rockusb":
        from .rockusb import flash_rockusb
        flash_rockusb(Path(args.image), bmap_path=args.bmap, loader=args.loader, yes=args.yes)
        print(f"flashed {args.image} over rockusb; verified")
        return 0
    if args.via == "uboot-ums":
        if not args.console:
            raise ProvisionError("flash --via uboot-ums needs --console URL (the board's serial console)")
        from .ums import flash_ums
        res = flash_ums(Path(args.image), console_url=args.console, device=args.to,
                        bmap_path=args.bmap, yes=args.yes, ums_command=args.ums_command,
                        log_path=args.log, appear_timeout=args.appear_timeout)
        print(f"flashed {args.image} -> {res.target} through U-Boot ums; verified "
              f"{res.verify.ranges} ranges; board reset")
        return 0
    raise ProvisionError(f"flash: unknown --via {args.via!r}")


def cmd_console(args: argparse.Namespace) -> int:
    from .console import run_console_cli
    return run_console_cli(args)


def cmd_fleet_apply(args: argparse.Namespace) -> int:
    from .fleet import apply_cli
    return apply_cli(args)


def cmd_fleet_status(args: argparse.Namespace) -> int:
    from .fleet import status_cli
    return status_cli(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("flash", help="write an image (bmap) to a card/device and verify it")
    f.add_argument("image", help="raw disk image; its block map is IMAGE.bmap unless --bmap")
    f.add_argument("--to", help="target block device or file (for --via uboot-ums: the block "
                               "device the board exposes, e.g. /dev/disk/by-id/usb-...)")
    f.add_argument("--bmap", type=Path, help="block map file (default: IMAGE.bmap)")
    f.add_argument("--yes", action="store_true", help="overwrite a target holding a partition table")
    f.add_argument("--via", choices=["direct", "uboot-ums", "rockusb"], default="direct")
    f.add_argument("--console", help="serial console URL for --via uboot-ums")
    f.add_argument("--ums-command", default="ums 0 mmc 0", help="U-Boot command exporting storage")
    f.add_argument("--appear-timeout", type=float, default=60.0,
                   help="seconds to wait for the ums device to appear")
    f.add_argument("--loader", type=Path, help="rockusb: the SPL loader (rkdeveloptool db)")
    f.add_argument("--log", type=Path, help="console log file for --via uboot-ums")
    f.set_defaults(func=cmd_flash)

    c = sub.add_parser("console", help="open a serial console, log it, run wait/send steps")
    c.add_argument("url", help="serial device (/dev/ttyUSB0), socket://HOST:PORT or rfc2217://HOST:PORT")
    c.add_argument("--baud", type=int, default=115200)
    c.add_argument("--log", type=Path, help="timestamped log file (default: console-<time>.log)")
    c.add_argument("--expect", action="append", default=[], metavar="REGEX",
                   help="step: wait for REGEX (repeatable; steps run in the order given)")
    c.add_argument("--send", action="append", default=[], metavar="TEXT",
                   help="step: send TEXT + newline")
    c.add_argument("--uboot", action="append", default=[], metavar="CMD",
                   help="step: interrupt autoboot if needed, run CMD at the U-Boot prompt and "
                        "print its output and exit status")
    c.add_argument("--until", choices=["uboot", "kernel", "login", "ready"],
                   help="wait until this boot stage is seen, then exit")
    c.add_argument("--timeout", type=float, default=120.0, help="seconds per step")
    c.set_defaults(func=cmd_console, steps_order=[])

    fl = sub.add_parser("fleet", help="configure devices over SSH")
    fsub = fl.add_subparsers(dest="fleet_command", required=True)
    a = fsub.add_parser("apply", help="run the provisioning steps on every device of FLEET.toml")
    a.add_argument("fleet_file", type=Path)
    a.add_argument("--inventory", help="inventory URL: sqlite:///PATH (default: sqlite:///<fleet dir>/"
                                       "inventory.sqlite) or postgresql://user@host/db, shared by stations")
    a.add_argument("--ca-key", type=Path, help="factory SSH CA private key (overrides the fleet file)")
    a.add_argument("--signing-key", type=Path, help="vendor Ed25519 model signing key (overrides)")
    a.add_argument("--watermark-key", type=Path, help="watermark key (overrides)")
    a.add_argument("--workers", type=int, help="parallel connections (overrides the fleet file; default min(devices, 32))")
    a.add_argument("--only", action="append", default=[], help="only this device (repeatable)")
    a.add_argument("--no-progress", action="store_true", help="plain output instead of rich progress")
    a.set_defaults(func=cmd_fleet_apply)
    s = fsub.add_parser("status", help="print the inventory")
    s.add_argument("fleet_file", type=Path, nargs="?")
    s.add_argument("--inventory", help="inventory URL (sqlite:///PATH or postgresql://...)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_fleet_status)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # the console's --expect/--send/--uboot steps run in command-line order
    if args.command == "console":
        args.steps_order = _console_steps(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except ProvisionError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `provision fleet status | head`
        sys.stderr.close()
        return 0


def _console_steps(argv: list[str]) -> list[tuple[str, str]]:
    steps = []
    it = iter(argv)
    for tok in it:
        for kind in ("expect", "send", "uboot"):
            flag = f"--{kind}"
            if tok == flag:
                steps.append((kind, next(it, "")))
            elif tok.startswith(flag + "="):
                steps.append((kind, tok[len(flag) + 1:]))
    return steps


if __name__ == "__main__":
    sys.exit(main())
