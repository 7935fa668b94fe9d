"""Profile-dependent lock-down of the customised root (issue 3: access and hardened defaults).

Runs last in `customise`, on the hard-link copy of the cached base: anything it changes it must
replace (unlink, then create), never write into, or the base cache changes too.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

from .config import BuildConfig
from .errors import BuildError

# Production images have no login prompt anywhere.
UNITS_MASKED_PRODUCTION = ("serial-getty@.service", "getty@.service", "console-getty.service")


def _systemctl(root: Path, verb: str, *units: str) -> None:
    r = subprocess.run(["systemctl", f"--root={root}", "--quiet", verb, *units], capture_output=True, text=True)
    if r.returncode != 0:
        raise BuildError(f"systemctl {verb} {' '.join(units)} in the image failed: {r.stderr.strip()[:300]}")


def harden(cfg: BuildConfig, root: Path) -> list[str]:
    """Apply the profile's lock-down to `root`; returns the image paths it added or changed."""
    if cfg.profile == "production":
        _systemctl(root, "mask", *UNITS_MASKED_PRODUCTION)
    return []
