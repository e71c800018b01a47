"""Keep a long-running peer's resident memory flat without making its rounds page-fault.

A round allocates and frees chunk-sized temporaries (0.1-4 MB) from several threads (the
loop's executor, gloo's workers). By default glibc serves blocks above M_MMAP_THRESHOLD
(128 KiB) with mmap, but *raises* that threshold to the size of each such block freed (up
to 32 MiB), and gives each thread its own heap (arena): from then on the temporaries come
from many per-thread heaps, which fragment and are rarely given back, so RSS crept up round
after round (measured: +10% over 4 rounds at 25M parameters).

What was measured (docs/benchmarks.md, "Large models"):
- threshold fixed at 128 KiB: RSS flat, but every chunk-sized temporary is a fresh mmap,
  page-faulted in and unmapped again: an int8 all-reduce at 1 Gbit/s took 2.6x as long;
- glibc's defaults plus malloc_trim after every round: +14% RSS over 10 rounds at 100M;
- threshold fixed at 8 MiB, one arena (this): RSS flat at 25M and 100M, int8 as fast as
  with the defaults. Temporaries below 8 MiB are reused from one heap, round after round;
  whole vectors (a 100M model's are 405 MB) are mmapped and returned when freed.
Setting the threshold explicitly also turns glibc's dynamic adjustment off (mallopt(3)).
SWARMTRAIN_MALLOC=default in the environment leaves glibc's defaults alone (for measurements).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # from <malloc.h>
M_ARENA_MAX = -8
MMAP_THRESHOLD = 8 << 20  # above every chunk-sized temporary (4 MiB at most), below any whole vector
ARENAS = 1
_done = False


def steady_malloc() -> bool:
    """Fix glibc's mmap threshold and arena count (once per process, before the round
    threads start). True if set; False elsewhere (macOS, musl: nothing to do, or nothing
    we can do)."""
    global _done
    if _done or not sys.platform.startswith("linux") or os.environ.get("SWARMTRAIN_MALLOC") == "default":
        return _done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _done = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_ARENA_MAX, ARENAS))
    except (OSError, AttributeError) as e:  # not glibc
        log.debug("mallopt unavailable: %s", e)
    return _done
