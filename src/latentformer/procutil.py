"""Child processes that must not outlive the process that started them."""

from __future__ import annotations

import os
import signal
import sys


def die_with_parent(parent: int, sig: int = signal.SIGKILL) -> None:
    """Linux: receive `sig` when the parent (pid `parent`) exits, however it exits; exits at once
    when the parent is already gone. Elsewhere a no-op."""
    if not (sys.platform.startswith("linux") and parent):
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig))
    if os.getppid() != parent:  # the parent died before prctl took effect
        sys.exit(1)
