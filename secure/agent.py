"""Device CLI: `appliance-agent store keygen|install|list|check` (dispatched by the runtime's
multi-call `appliance-agent`; `main` accepts argv with or without the leading "store").

Token and store selection, flag > environment > default:
  --pkcs11-module  APPLIANCE_PKCS11_MODULE  board.json secure.pkcs11_module, else SoftHSM2
  --token-label    APPLIANCE_TOKEN_LABEL    "appliance"
  --pin-file       APPLIANCE_PIN_FILE       /data/secure/token.pin
  --store-dir      APPLIANCE_STORE_DIR      /data/secure/store
  --vendor-key     APPLIANCE_VENDOR_KEY     /etc/appliance/vendor-ed25519.pub
  --board          APPLIANCE_BOARD          name from --board-file
  --board-file     APPLIANCE_BOARD_FILE     /etc/appliance/board.json
  --token-config   SOFTHSM2_CONF            /etc/appliance/softhsm2.conf if it exists (SoftHSM2 only)

The defaults are the image's layout: the root is read-only, so the token, the PIN and the
store live on the data partition. On first boot `appliance-store-init.service` runs
`keygen --init-softhsm --create-pin`: a random per-device PIN (0600), the token, the device key.
Run as root, keygen and install then make the SoftHSM token files readable by the token
directory's group (SoftHSM 2.6 creates them 0600 and has no umask setting), so the runtime
can use the token as an unprivileged member of that group (`softhsm`).

Exit status: 0 ok, 2 usage, and per refusal: 3 bad signature, 4 rollback, 5 wrong board,
6 integrity (GCM/sha256), 7 token or module missing, 8 PIN rejected / token locked,
9 package for another device, 10 malformed package, 1 anything else.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from . import errors as E

SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
DEFAULT_TOKEN_CONFIG = "/etc/appliance/softhsm2.conf"
DEFAULTS = {
    "APPLIANCE_PKCS11_MODULE": SOFTHSM_MODULE,
    "APPLIANCE_TOKEN_LABEL": "appliance",
    "APPLIANCE_PIN_FILE": "/data/secure/token.pin",
    "APPLIANCE_STORE_DIR": "/data/secure/store",
    "APPLIANCE_VENDOR_KEY": "/etc/appliance/vendor-ed25519.pub",
    "APPLIANCE_BOARD_FILE": "/etc/appliance/board.json",
}
EXIT_CODES = [(E.SignatureError, 3), (E.RollbackError, 4), (E.BoardMismatchError, 5),
              (E.IntegrityError, 6), (E.TokenMissingError, 7), (E.TokenLockedError, 8),
              (E.WrongDeviceError, 9), (E.FormatError, 10)]
PROG = "appliance-agent store"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like argparse but without the usage dump
        print(f"{PROG}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _module_default(env, board_file):
    if env.get("APPLIANCE_PKCS11_MODULE"):
        return env["APPLIANCE_PKCS11_MODULE"]
    try:
        with open(board_file) as f:
            mod = json.load(f).get("secure", {}).get("pkcs11_module")
        if isinstance(mod, str) and mod:
            return mod
    except (OSError, ValueError, AttributeError):
        pass
    return SOFTHSM_MODULE


COMMON = ("--pkcs11-module", "--token-label", "--pin-file", "--store-dir", "--vendor-key", "--board",
          "--board-file", "--token-config")


def _common(parser, suppress: bool) -> None:
    # Accepted before or after the sub-command (`store --pin-file F list` == `store list --pin-file F`).
    kw = {"default": argparse.SUPPRESS} if suppress else {"default": None}
    for flag in COMMON:
        parser.add_argument(flag, **kw, help="SoftHSM2 config file (sets SOFTHSM2_CONF)"
                            if flag == "--token-config" else None)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Encrypted, signed model store on a PKCS#11 token")
    _common(p, suppress=False)
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    k = sub.add_parser("keygen", help="create the device key pair (idempotent), print its public PEM")
    k.add_argument("--init-softhsm", action="store_true",
                   help="SoftHSM2 only: initialise the token first if no token has this label")
    k.add_argument("--so-pin-file", help="SO PIN for --init-softhsm (default: random, discarded)")
    k.add_argument("--create-pin", action="store_true",
                   help="create a random PIN in the PIN file (mode 0600) if the file does not exist")
    k.add_argument("--quiet", action="store_true", help="do not print the public key")
    i = sub.add_parser("install", help="install an encrypted, signed model package")
    i.add_argument("package")
    ls = sub.add_parser("list", help="list installed models")
    ls.add_argument("--json", action="store_true")
    c = sub.add_parser("check", help="decrypt a model in memory and verify it (nothing written)")
    c.add_argument("name")
    for sp in (k, i, ls, c):
        _common(sp, suppress=True)
    return p


def _settings(args, env):
    board_file = args.board_file or env.get("APPLIANCE_BOARD_FILE") or DEFAULTS["APPLIANCE_BOARD_FILE"]
    pick = lambda flag, var: flag or env.get(var) or DEFAULTS[var]  # noqa: E731
    return dict(module=args.pkcs11_module or _module_default(env, board_file),
                token_label=pick(args.token_label, "APPLIANCE_TOKEN_LABEL"),
                pin_file=pick(args.pin_file, "APPLIANCE_PIN_FILE"),
                store_dir=pick(args.store_dir, "APPLIANCE_STORE_DIR"),
                vendor_key=pick(args.vendor_key, "APPLIANCE_VENDOR_KEY"),
                board=args.board or env.get("APPLIANCE_BOARD"), board_file=board_file)


def _init_softhsm(label: str, pin_file: str, so_pin_file: str | None) -> None:
    shown = subprocess.run(["softhsm2-util", "--show-slots"], capture_output=True, text=True)
    if any(line.split(":", 1)[1].strip() == label for line in shown.stdout.splitlines()
           if line.strip().startswith("Label:")):
        return
    try:
        pin = open(pin_file).read().strip()
        so_pin = open(so_pin_file).read().strip() if so_pin_file else os.urandom(16).hex()
    except OSError as e:
        raise E.TokenLockedError(f"cannot read PIN file: {e}") from None
    r = subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", pin,
                        "--so-pin", so_pin], capture_output=True, text=True)
    if r.returncode != 0:
        raise E.TokenError(f"softhsm2-util --init-token failed: {(r.stderr or r.stdout).strip()}")


def create_pin(pin_file: str) -> bool:
    """A random per-device user PIN, written once (0600, atomic). False if it already exists."""
    import secrets
    from .fsutil import atomic_write

    if os.path.exists(pin_file):
        return False
    try:
        os.makedirs(os.path.dirname(pin_file) or ".", exist_ok=True)
        atomic_write(pin_file, (secrets.token_hex(16) + "\n").encode(), mode=0o600)
    except OSError as e:
        raise E.StoreError(f"cannot create PIN file {pin_file}: {e.strerror}") from None
    return True


def use_default_token_config(env) -> None:
    """SoftHSM2 reads SOFTHSM2_CONF; without it, the image's config (if present) is the one."""
    if not env.get("SOFTHSM2_CONF") and os.path.isfile(DEFAULT_TOKEN_CONFIG):
        os.environ["SOFTHSM2_CONF"] = DEFAULT_TOKEN_CONFIG


def softhsm_tokendir(conf_path: str | None) -> str | None:
    """`directories.tokendir` from a SoftHSM2 config file, or None."""
    if not conf_path:
        return None
    try:
        with open(conf_path) as f:
            for line in f:
                key, sep, value = line.partition("=")
                if sep and key.strip() == "directories.tokendir":
                    return value.strip() or None
    except OSError:
        return None
    return None


def _share_token(module: str) -> None:
    # Only SoftHSM keeps its token in files we can (and must) share with the runtime's group.
    if os.geteuid() != 0 or os.path.basename(module) != os.path.basename(SOFTHSM_MODULE):
        return
    from .fsutil import share_with_group

    tokendir = softhsm_tokendir(os.environ.get("SOFTHSM2_CONF"))
    if tokendir:
        try:
            share_with_group(tokendir)
        except OSError as e:
            raise E.StoreError(f"cannot share token dir {tokendir} with its group: {e.strerror}") from None


def run(args, env) -> int:
    from .backend import Pkcs11Backend, TokenConfig

    if args.token_config:
        os.environ["SOFTHSM2_CONF"] = args.token_config
    else:
        use_default_token_config(env)
    s = _settings(args, env)
    cfg = TokenConfig(module=s["module"], token_label=s["token_label"], pin_file=s["pin_file"])
    if args.cmd == "keygen":
        if args.create_pin:
            create_pin(cfg.pin_file)
        if args.init_softhsm:
            _init_softhsm(cfg.token_label, cfg.pin_file, args.so_pin_file)
        with Pkcs11Backend(cfg) as b:
            pem = b.ensure_device_key()
        _share_token(cfg.module)
        if not args.quiet:
            sys.stdout.write(pem.decode())
        return 0

    from .store import board_name_from_file

    board = s["board"] or board_name_from_file(s["board_file"])
    try:
        return _store_command(args, cfg, s, board)
    finally:
        if args.cmd == "install":
            # Install may create the MAC secrets on the token (even when it then refuses the
            # package): the runtime must still be able to read every token object.
            _share_token(cfg.module)


def _store_command(args, cfg, s, board) -> int:
    from .backend import Pkcs11Backend
    from .store import DeviceStore, load_vendor_public_key

    with Pkcs11Backend(cfg) as b:
        store = DeviceStore(s["store_dir"], b, load_vendor_public_key(s["vendor_key"]), board)
        if args.cmd == "install":
            m = store.install_file(args.package)
            print(f"installed {m.name} {m.version}")
        elif args.cmd == "check":
            m = store.load(args.name, rehash=True)
            print(f"ok {m.name} {m.version} sha256={m.manifest.sha256}")
        elif args.cmd == "list":
            items = store.list()
            if args.json:
                print(json.dumps([i.as_dict() for i in items], indent=2))
            else:
                for i in items:
                    print(f"{i.name}\t{i.version}\thighest={i.highest_accepted}\tboards={','.join(i.boards)}"
                          f"\twatermark={i.watermark_id or '-'}\t{i.status}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["store"]:
        argv = argv[1:]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        return run(args, os.environ)
    except E.SecureError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return next((code for cls, code in EXIT_CODES if isinstance(e, cls)), 1)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
