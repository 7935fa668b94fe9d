"""appliance.provision: the factory station (host side; never imported by device code).

    provision flash IMAGE --to TARGET [--yes]          bmaptool copy + read-back verify (flash.py)
    provision flash IMAGE --via uboot-ums --console URL [--to DEV]            (ums.py)
    provision flash IMAGE --via rockusb --loader SPL.bin --yes                (rockusb.py)
    provision console URL [--uboot CMD] [--expect RE --send TXT] [--until uboot|kernel|login|ready]
    provision fleet apply FLEET.toml [--inventory sqlite:///PATH] [--workers N] [--only SERIAL]
    provision fleet status [FLEET.toml | --inventory URL] [--json]

Modules: bmap (read a bmap: ranges + checksums), flash (target checks, write, verify),
console (pyserial Console, UBootShell with exit status, BootStrategy), qemu (QEMU with a
waiting socket console), fleetconfig (FLEET.toml model; see its docstring for every key),
inventory (SQLite WAL), sshca (ssh-keygen -s), fleet (steps, bounded pool, CLI), testlab
(N real sshd "devices" on loopback for tests and benchmarks).
"""
