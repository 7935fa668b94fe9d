"""Run a benchmark under the allocator settings the runtime unit gives the daemon.

glibc reads GLIBC_TUNABLES at process start only, so the script execs itself again with them;
child processes (daemons, fresh-process loads) inherit them."""
from __future__ import annotations

import os
import sys

from appliance.runtime.config import MALLOC_TUNABLES

CHOICES = ("daemon", "default")


def ensure(mode: str) -> str:
    """mode 'daemon': re-exec under MALLOC_TUNABLES unless already; 'default': glibc's default
    (re-exec without them if they are set). Returns the GLIBC_TUNABLES now in force."""
    have = os.environ.get("GLIBC_TUNABLES", "")
    want = MALLOC_TUNABLES if mode == "daemon" else ""
    if have != want:
        env = dict(os.environ, GLIBC_TUNABLES=want)
        if not want:
            del env["GLIBC_TUNABLES"]
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    return want or "(unset: glibc default)"
