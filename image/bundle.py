"""Freeze the device executable `appliance-agent` with PyInstaller inside a target-arch chroot.

Two cached stages (appliance.image.cache), each keyed by every input it depends on:

1. ``bundle-chroot``: an mmdebstrap chroot of the target suite/architecture with python3,
   python3-venv, binutils (key: arch, suite, mirror, apt packages); then ``bundle-builder``:
   a copy of it with a venv at /opt/builder-venv holding the pinned device requirements plus
   PyInstaller (key: the chroot key + pip pins). Foreign architectures run under qemu-user
   binfmt (slow: 10-20 min for arm64).
2. ``agent-bundle``: PyInstaller's onedir output for the device packages (runtime, power,
   secure) frozen inside that chroot. Key: the builder key + a digest of the device source
   trees + the PyInstaller options. Editing device code re-runs only this stage (~1-3 min).

onedir, not onefile: onefile unpacks ~100 MB into /tmp at every start, leaves _MEI* dirs
after SIGKILL and breaks on a noexec /tmp -- wrong for a 24/7 service.

The TFLite backend follows the builder's Python: trixie (3.13) can only use ai-edge-litert;
bookworm (3.11) can freeze tflite-runtime (numpy<2), which is ~9x smaller on disk.
"""
from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import cache
from .config import DEFAULT_MIRROR
from .errors import BuildError
from .rootfs import check_foreign_arch, require_tools

REPO = Path(__file__).resolve().parent.parent
# Device packages frozen into the bundle (host code, appliance.image/provision, never is).
DEVICE_PACKAGES = ("runtime", "power", "secure")

# binutils: PyInstaller's --strip and objdump; only wheels are installed, so no compiler.
BUILDER_APT_PACKAGES = ("python3", "python3-venv", "python3-pip", "binutils", "ca-certificates")

PYINSTALLER = "pyinstaller==6.22.3"
# Top-level pins shared by both backends (the versions tested on the host venv).
COMMON_REQUIREMENTS = (
    "aiohttp==3.14.5",
    "prometheus-client==0.26.0",
    "python-pkcs11==0.10.1",
    "cryptography==50.0.2",
)
BACKEND_REQUIREMENTS = {
    "litert": ("ai-edge-litert==2.3.0", "numpy==2.4.6"),
    # tflite-runtime 2.14 imports with numpy 2 but fails at Interpreter(): pin numpy<2.
    "tflite_runtime": ("tflite-runtime==2.14.0", "numpy==1.26.4"),
}
SUITE_PYTHON = {"bookworm": (3, 11), "trixie": (3, 13)}
SUITE_DEFAULT_BACKEND = {"bookworm": "tflite_runtime", "trixie": "litert"}
BACKEND_MAX_PYTHON = {"tflite_runtime": (3, 11), "litert": (3, 13)}

PYINSTALLER_OPTIONS = (
    "--onedir", "--strip", "--noconfirm", "--clean", "--name", "appliance-agent",
    "--exclude-module", "appliance.image", "--exclude-module", "appliance.provision",
    "--exclude-module", "tkinter", "--exclude-module", "tflite",
    "--exclude-module", "flatbuffers", "--exclude-module", "matplotlib",
)
BACKEND_MODULE = {"litert": "ai_edge_litert.interpreter", "tflite_runtime": "tflite_runtime.interpreter"}


def hidden_imports(sources: dict[str, str], backend: str) -> tuple[str, ...]:
    """The agent dispatches with importlib and the interpreter is imported by name, so
    PyInstaller sees none of it: name every device module and the backend explicitly.
    (--collect-submodules does not work here: it imports in a child without --paths.)"""
    mods = [BACKEND_MODULE[backend]]
    for pkg, path in sorted(sources.items()):
        for f in sorted(Path(path).glob("*.py")):
            if f.stem != "__init__":
                mods.append(f"appliance.{pkg}.{f.stem}")
    return tuple(x for m in mods for x in ("--hidden-import", m))

Progress = Callable[[str], None]


@dataclass(frozen=True)
class BundlePlan:
    arch: str
    suite: str
    backend: str
    mirror: str = DEFAULT_MIRROR
    apt_packages: tuple[str, ...] = BUILDER_APT_PACKAGES
    # Installed into the builder copy, not the base chroot: PyInstaller needs the shared
    # libpython, which Debian's (static) python3 does not pull in.
    builder_apt: tuple[str, ...] = ()
    requirements: tuple[str, ...] = ()
    pyinstaller: str = PYINSTALLER
    pyinstaller_options: tuple[str, ...] = PYINSTALLER_OPTIONS
    source_digest: str = ""
    sources: dict = field(default_factory=dict, compare=False, hash=False)

    def chroot_key(self) -> str:
        return cache.inputs_hash({
            "stage": "bundle-chroot", "v": 1, "arch": self.arch, "suite": self.suite,
            "mirror": self.mirror, "apt": self.apt_packages,
        })

    def builder_key(self) -> str:
        return cache.inputs_hash({
            "stage": "bundle-builder", "v": 1, "chroot": self.chroot_key(),
            "apt": self.builder_apt, "req": self.requirements, "pyinstaller": self.pyinstaller,
        })

    def bundle_key(self) -> str:
        return cache.inputs_hash({
            "stage": "agent-bundle", "v": 1, "builder": self.builder_key(),
            "backend": self.backend, "src": self.source_digest,
            "opts": self.pyinstaller_options,
        })

    def mmdebstrap_argv(self, root: Path) -> list[str]:
        return [
            "mmdebstrap", "--mode=root", "--variant=apt", f"--arch={self.arch}",
            f"--include={','.join(self.apt_packages)}", "--aptopt=Acquire::Retries 3",
            "--dpkgopt=path-exclude=/usr/share/man/*", "--dpkgopt=path-exclude=/usr/share/doc/*",
            self.suite, str(root), self.mirror,
        ]


def plan_bundle(arch: str, suite: str, runtime_backend: str | None = None,
                mirror: str = DEFAULT_MIRROR, source_root: Path = REPO) -> BundlePlan:
    """Pure planning: validate the combination and compute every input of both stages."""
    if arch not in ("amd64", "arm64"):
        raise BuildError(f"bundle: unsupported arch {arch!r}; use amd64 or arm64")
    if suite not in SUITE_PYTHON:
        raise BuildError(f"bundle: unsupported suite {suite!r}; use one of {', '.join(SUITE_PYTHON)}")
    backend = runtime_backend or SUITE_DEFAULT_BACKEND[suite]
    if backend not in BACKEND_REQUIREMENTS:
        raise BuildError(f"bundle: unknown runtime backend {backend!r}; use one of "
                         f"{', '.join(BACKEND_REQUIREMENTS)}")
    py = SUITE_PYTHON[suite]
    if py > BACKEND_MAX_PYTHON[backend]:
        raise BuildError(
            f"bundle: {backend} has no wheels for Python {py[0]}.{py[1]} ({suite}); "
            f"use runtime_backend='litert' or suite='bookworm'")
    sources = {}
    for name in DEVICE_PACKAGES:
        d = source_root / name
        if d.is_dir():
            sources[name] = cache.tree_digest(d)
    if "runtime" not in sources:
        raise BuildError(f"bundle: device source {source_root / 'runtime'} is missing")
    source_dirs = {name: str(source_root / name) for name in sources}
    return BundlePlan(
        arch=arch, suite=suite, backend=backend, mirror=mirror,
        pyinstaller_options=PYINSTALLER_OPTIONS + hidden_imports(source_dirs, backend),
        builder_apt=(f"libpython{py[0]}.{py[1]}",),
        requirements=tuple(sorted(COMMON_REQUIREMENTS + BACKEND_REQUIREMENTS[backend])),
        source_digest=cache.inputs_hash(sources),
        sources=source_dirs,
    )


def _chroot_run(root: Path, script: str, log, env: dict[str, str] | None = None) -> int:
    """Run a shell script inside the chroot with /proc, /dev, /sys bound, in a private mount
    namespace so the bind mounts vanish with the process even if we are killed."""
    r = shlex.quote(str(root))
    inner = shlex.join(["chroot", str(root), "/usr/bin/env", "-i", "PATH=/usr/local/bin:/usr/bin:/bin",
                        "HOME=/root", "LANG=C.UTF-8", *[f"{k}={v}" for k, v in (env or {}).items()],
                        "/bin/sh", "-ec", script])
    outer = (f"mount --rbind /proc {r}/proc && mount --rbind /dev {r}/dev && "
             f"mount --rbind /sys {r}/sys && exec {inner}")
    p = subprocess.run(["unshare", "--mount", "--propagation", "private", "/bin/sh", "-ec", outer],
                       stdout=log, stderr=subprocess.STDOUT)
    return p.returncode


def _fail(what: str, log_path: Path) -> BuildError:
    lines = [l.strip() for l in log_path.read_text(errors="replace").splitlines() if l.strip()]
    tail = next((l for l in reversed(lines) if "error" in l.lower() or l.startswith("E:")),
                lines[-1] if lines else "no output")
    return BuildError(f"bundle: {what} failed: {tail[:300]} (log: {log_path})")


def _logs() -> Path:
    d = cache.cache_root() / "logs"
    d.mkdir(parents=True, exist_ok=True)
    return d


def build_chroot(plan: BundlePlan, progress: Progress | None = None) -> tuple[Path, bool]:
    """Stage 1a: the bare mmdebstrap chroot (key: arch, suite, mirror, apt packages), kept
    apart from the pip step so changing a pin does not repeat the slow mmdebstrap."""
    say = progress or (lambda _m: None)
    key = plan.chroot_key()
    hit = cache.lookup("bundle-chroot", key)
    if hit:
        return hit / "root", True
    require_tools("mmdebstrap", "unshare", "chroot")
    check_foreign_arch(plan.arch)

    def produce(d: Path) -> None:
        log_path = _logs() / f"bundle-chroot-{plan.arch}-{plan.suite}-{key}.log"
        say(f"mmdebstrap {plan.suite}/{plan.arch} builder chroot")
        with open(log_path, "w") as log:
            if subprocess.run(plan.mmdebstrap_argv(d / "root"), stdout=log, stderr=subprocess.STDOUT).returncode:
                raise _fail(f"mmdebstrap {plan.suite}/{plan.arch}", log_path)

    entry, _ = cache.cached("bundle-chroot", key, produce)
    return entry / "root", False


def build_builder(plan: BundlePlan, progress: Progress | None = None) -> tuple[Path, bool]:
    """Stage 1b: a copy of the chroot with /opt/builder-venv (pins + PyInstaller).
    Return (chroot root dir, cache hit)."""
    say = progress or (lambda _m: None)
    key = plan.builder_key()
    hit = cache.lookup("bundle-builder", key)
    if hit:
        return hit / "root", True
    base, _ = build_chroot(plan, progress)

    def produce(d: Path) -> None:
        root = d / "root"
        log_path = _logs() / f"bundle-builder-{plan.arch}-{plan.suite}-{key}.log"
        say("copy builder chroot")
        subprocess.run(["cp", "-a", "--reflink=auto", str(base), str(root)], check=True)
        # pip inside the chroot needs name resolution and the host's CA bundle (this network's
        # TLS inspection uses a CA that only the host trusts).
        shutil.copy2("/etc/resolv.conf", root / "etc/resolv.conf")
        shutil.copy2("/etc/ssl/certs/ca-certificates.crt", root / "etc/ssl/host-ca-bundle.crt")
        say(f"pip install {len(plan.requirements)} pinned requirements + {plan.pyinstaller}")
        script = ("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
                  "--no-install-recommends " + shlex.join(plan.builder_apt)
                  + " && apt-get clean && rm -rf /var/lib/apt/lists/* && "
                  "python3 -m venv /opt/builder-venv && "
                  "/opt/builder-venv/bin/pip install --no-cache-dir --only-binary=:all: "
                  + shlex.join([*plan.requirements, plan.pyinstaller])
                  + " && /opt/builder-venv/bin/pip freeze > /opt/builder-venv/freeze.txt")
        with open(log_path, "w") as log:
            if _chroot_run(root, script, log, {"PIP_DISABLE_PIP_VERSION_CHECK": "1",
                                                "PIP_CERT": "/etc/ssl/host-ca-bundle.crt",
                                                "PIP_DEFAULT_TIMEOUT": "120"}):
                raise _fail(f"pip install in the {plan.suite}/{plan.arch} chroot", log_path)
        (d / "plan.json").write_text(json.dumps(
            {k: v for k, v in asdict(plan).items() if k not in ("sources", "source_digest")}, indent=1))

    entry, _ = cache.cached("bundle-builder", key, produce)
    return entry / "root", False


def build_agent_bundle(arch: str, suite: str, *, runtime_backend: str | None = None,
                       progress: Progress | None = None, mirror: str = DEFAULT_MIRROR,
                       source_root: Path = REPO) -> Path:
    """Return the onedir bundle directory; ``<dir>/appliance-agent`` is the executable.

    Both stages are cached; a warm call returns in milliseconds. ``<dir>/../manifest.json``
    records backend, pip freeze and size.
    """
    say = progress or (lambda _m: None)
    plan = plan_bundle(arch, suite, runtime_backend, mirror, source_root)
    key = plan.bundle_key()
    hit = cache.lookup("agent-bundle", key)
    if hit:
        return hit / "appliance-agent"
    root, _ = build_builder(plan, progress)
    def produce(d: Path) -> None:
        work_name = f"build-{uuid.uuid4().hex[:12]}"
        work = root / work_name
        log_path = _logs() / f"agent-bundle-{arch}-{suite}-{key}.log"
        try:
            src = work / "src" / "appliance"
            src.mkdir(parents=True)
            # A regular package in the bundle (the host uses a package-dir namespace mapping).
            (src / "__init__.py").write_text('"""appliance device packages (frozen)."""\n')
            for name, path in plan.sources.items():
                shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
            (work / "src" / "appliance_agent_main.py").write_text(
                "import sys\nfrom appliance.runtime.agent import main\nsys.exit(main())\n")
            say(f"pyinstaller appliance-agent ({plan.backend}, {suite}/{arch})")
            w = f"/{work_name}"
            script = ("cd " + w + " && /opt/builder-venv/bin/pyinstaller "
                      + shlex.join([*plan.pyinstaller_options, "--paths", f"{w}/src",
                                    "--distpath", f"{w}/dist", "--workpath", f"{w}/work",
                                    "--specpath", w, f"{w}/src/appliance_agent_main.py"]))
            with open(log_path, "w") as log:
                if _chroot_run(root, script, log):
                    raise _fail(f"pyinstaller in the {suite}/{arch} chroot", log_path)
            out = work / "dist" / "appliance-agent"
            if not (out / "appliance-agent").is_file():
                raise BuildError(f"bundle: pyinstaller produced no {out}/appliance-agent (log: {log_path})")
            shutil.copytree(out, d / "appliance-agent", symlinks=True)
            size = sum(p.stat().st_size for p in (d / "appliance-agent").rglob("*")
                       if p.is_file() and not p.is_symlink())
            freeze = (root / "opt/builder-venv/freeze.txt").read_text().split()
            (d / "manifest.json").write_text(json.dumps({
                "arch": arch, "suite": suite, "backend": plan.backend, "bytes": size,
                "builder_key": plan.builder_key(), "source_digest": plan.source_digest,
                "pip_freeze": freeze}, indent=1))
        finally:
            shutil.rmtree(work, ignore_errors=True)

    entry, _ = cache.cached("agent-bundle", key, produce)
    return entry / "appliance-agent"


def bundle_manifest(bundle_dir: Path) -> dict:
    return json.loads((Path(bundle_dir).parent / "manifest.json").read_text())


def main(argv: list[str] | None = None) -> int:
    """`python -m appliance.image.bundle ARCH SUITE [BACKEND]`: build and print the bundle dir."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="appliance-bundle")
    ap.add_argument("arch", choices=("amd64", "arm64"))
    ap.add_argument("suite", choices=tuple(SUITE_PYTHON))
    ap.add_argument("--backend", choices=tuple(BACKEND_REQUIREMENTS))
    a = ap.parse_args(argv)
    try:
        d = build_agent_bundle(a.arch, a.suite, runtime_backend=a.backend,
                               progress=lambda m: print(f"bundle: {m}", file=sys.stderr, flush=True))
    except BuildError as e:
        print(f"appliance-bundle: error: {e}", file=sys.stderr)
        return 1
    print(d)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def chroot_command(root: Path, argv: list[str], binds: dict[str, Path]) -> list[str]:
    """argv that runs `argv` inside the chroot `root` with host dirs bound at the given
    chroot paths (private mount namespace: nothing stays mounted). Shares the host network,
    so a daemon inside listens on the host's 127.0.0.1. Used to run a trixie bundle on a
    bookworm host (the bundle needs the target's glibc) in tests and benchmarks."""
    r = Path(root)
    steps = [f"mount --rbind /proc {shlex.quote(str(r / 'proc'))}",
             f"mount --rbind /dev {shlex.quote(str(r / 'dev'))}"]
    for inside, host in binds.items():
        target = r / inside.lstrip("/")
        steps.append(f"mkdir -p {shlex.quote(str(target))}")
        steps.append(f"mount --bind {shlex.quote(str(host))} {shlex.quote(str(target))}")
    steps.append("exec " + shlex.join(["chroot", str(r), *argv]))
    return ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-ec", " && ".join(steps)]


def bundle_modules(bundle_dir: Path, arch: str, suite: str, *, runtime_backend: str | None = None) -> list[str]:
    """Python modules frozen into the bundle's PYZ (PyInstaller's archive viewer, run in the
    cached builder chroot): what the bundle can import, e.g. to prove it has no host code."""
    plan = plan_bundle(arch, suite, runtime_backend)
    root, _ = build_builder(plan)
    argv = chroot_command(root, ["/opt/builder-venv/bin/pyi-archive_viewer", "--list", "--recursive", "--brief",
                                 "/opt/appliance/appliance-agent"], {"/opt/appliance": Path(bundle_dir)})
    r = subprocess.run(argv, capture_output=True, text=True,
                       env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    if r.returncode:
        raise BuildError(f"bundle: cannot list {bundle_dir}: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    return r.stdout.split()
