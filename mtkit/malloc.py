"""Keep freed CPU memory in the process instead of handing it back to the OS (glibc only).

glibc's ``malloc`` serves every block above 32 MiB with its own ``mmap`` and unmaps it on
``free``. Training and beam search allocate tensors that large at every step (the logits of a
batch alone are tokens x vocabulary floats), so each step faults in fresh zeroed pages by the
hundred thousand, a sizeable share of a CPU step (docs/benchmarks.md). With
``mmap`` off and trimming off, freed blocks stay in the heap and the next step reuses them.
The cost is that the process keeps its peak memory until it exits, which a training or
translation process does anyway.

Every ``mtkit`` command turns this on (``mtkit.cli.main``); a library user can call
:func:`keep_freed_memory` too. ``MTKIT_KEEP_FREED_MEMORY=0`` leaves glibc's defaults alone.
"""

from __future__ import annotations

import ctypes
import os
import platform

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_DEFAULT_MMAP_MAX = 65536
# glibc's mmap threshold starts at 128 KiB and, each time a larger mmapped block is freed, rises
# to that block's size, up to 32 MiB (trimming at twice the threshold). Any mallopt call stops
# that adjustment, so "back to the defaults" sets the values it settles at in a process that
# frees large tensors, which is what a PyTorch process without this module runs with.
_SETTLED_MMAP_THRESHOLD = 32 << 20
_SETTLED_TRIM_THRESHOLD = 64 << 20


def _mallopt():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None


def keep_freed_memory(enable: bool = True) -> bool:
    """Turn the policy on (or, with ``enable=False``, back to glibc's defaults as they settle:
    blocks over 32 MiB mmapped); returns whether this process's allocator could be told (False
    on non-glibc systems or when disabled)."""
    mallopt = _mallopt()
    if mallopt is None or (enable and os.environ.get("MTKIT_KEEP_FREED_MEMORY", "1") == "0"):
        return False
    if enable:
        ok = mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    else:
        ok = (mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX) and mallopt(_M_MMAP_THRESHOLD, _SETTLED_MMAP_THRESHOLD)
              and mallopt(_M_TRIM_THRESHOLD, _SETTLED_TRIM_THRESHOLD))
    return bool(ok)


def huge_pages_for_large_tensors() -> bool:
    """Ask PyTorch to back its large CPU tensors with transparent huge pages.

    Kept memory still has to be faulted in once, and token-based batches keep growing the heap
    for a while (each new batch shape leaves blocks of new sizes). With 4 KiB pages that costs
    thousands of page faults a training step over the first few hundred steps (a large softmax
    that meets fresh heap is many times slower). PyTorch's ``THP_MEM_ALLOC_ENABLE`` makes it
    ``madvise(MADV_HUGEPAGE)`` every allocation of 2 MiB or more, so the kernel maps 2 MiB at a
    time (where THP is ``always`` or ``madvise``): far fewer faults and a smaller heap
    (docs/benchmarks.md). PyTorch reads the variable once, at its first large
    allocation, so this must run before any: ``mtkit.cli.main`` calls it before importing torch.
    Returns whether it is on (an explicit ``THP_MEM_ALLOC_ENABLE`` is left as the user set it).
    """
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    return os.environ["THP_MEM_ALLOC_ENABLE"] == "1"
