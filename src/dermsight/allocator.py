"""glibc malloc settings for the torch-using commands.

CPU torch allocates and frees tensors of many megabytes on every step. With glibc's
defaults each of them is a fresh mmap (zeroed pages, page faults) and each free a munmap
or a heap trim; `scripts/env.sh` therefore exports ``MALLOC_MMAP_MAX_=0`` and
``MALLOC_TRIM_THRESHOLD_=100000000000`` (keep freed memory in the heap, never give it
back), which makes CPU training much faster (bench/run.py's ``finetune`` section measures
it: ``allocator_speedup``). The price is a resident size that stays at its peak, which is
why only the torch commands (``dermsight train``) get it, never ``serve`` or ``predict``.

glibc reads those variables once, when the process starts, so setting them from Python
does nothing; :func:`tune_for_torch` makes the same settings with ``mallopt(3)`` instead
(any allocation from then on obeys them) and exports the variables so that processes
started from here (DataLoader workers, subprocesses) start with them. Already-set
variables win; ``DERMSIGHT_NO_ALLOCATOR_TUNING=1`` turns it off.
"""

from __future__ import annotations

import ctypes
import os
import sys

ENVIRONMENT = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "100000000000"}
_M_TRIM_THRESHOLD = -1  # <malloc.h>
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1  # mallopt takes an int: a 2 GiB trim threshold (the env value is "never")


def tune_for_torch() -> str:
    """Apply the torch allocator settings to this process. Returns how: "environment"
    (set before start), "mallopt", "disabled", or "unavailable" (not glibc)."""
    if os.environ.get("DERMSIGHT_NO_ALLOCATOR_TUNING") == "1":
        return "disabled"
    if all(os.environ.get(name) for name in ENVIRONMENT):
        return "environment"
    if not sys.platform.startswith("linux"):
        return "unavailable"
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and friends: no mallopt, nothing to tune
        return "unavailable"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not (mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _INT_MAX) == 1):
        return "unavailable"
    for name, value in ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    return "mallopt"
