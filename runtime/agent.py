"""`appliance-agent`: the one multi-call device executable (the frozen bundle's entry point).

    appliance-agent runtime ...   -> appliance.runtime.cli:main
    appliance-agent power ...     -> appliance.power.agent:main
    appliance-agent store ...     -> appliance.secure.agent:main
    appliance-agent update ...    -> appliance.secure.update:main (A/B system updates)

Subcommands are imported lazily: `store` never pays for aiohttp, `runtime` never for PKCS#11.
"""
from __future__ import annotations

import importlib
import sys

PROG = "appliance-agent"
COMMANDS = {
    "runtime": ("appliance.runtime.cli", "inference daemon (runtime serve)"),
    "power": ("appliance.power.agent", "DVFS/power manager"),
    "store": ("appliance.secure.agent", "secure model store"),
    "update": ("appliance.secure.update", "signed A/B system updates"),
}
USAGE = (f"usage: {PROG} {{{','.join(COMMANDS)}}} ...\n\n"
         + "\n".join(f"  {k:<8} {v[1]}" for k, v in COMMANDS.items()) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        sys.stdout.write(USAGE) if args else sys.stderr.write(USAGE)
        return 0 if args else 2
    cmd, rest = args[0], args[1:]
    if cmd not in COMMANDS:
        print(f"{PROG}: error: unknown command {cmd!r} (choose from {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    modname = COMMANDS[cmd][0]
    try:
        mod = importlib.import_module(modname)
    except ImportError as e:
        print(f"{PROG}: error: {cmd}: not available in this build ({e})", file=sys.stderr)
        return 1
    rc = mod.main(rest)
    return int(rc or 0)


if __name__ == "__main__":
    raise SystemExit(main())
