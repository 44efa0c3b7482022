"""Give the C heap's freed memory back to the operating system once it holds too much of it.

A simulated node's message allocates a few hundred MiB of tensors and frees them again. glibc's malloc
keeps what was freed in its heap for reuse (freed blocks below a live one are never returned by
themselves), so a long-lived node process (a Ray worker) holds its in-use memory plus a free part whose
size drifts with fragmentation: measured over 25 node messages of ~130 ML-100K devices, in use 134 ->
137 MiB (the node's ledger mirrors), free 127 to 228 MiB, resident 543 to 647 MiB. `malloc_trim(0)` after
every message held it at 418 to 424 MiB but cost ~10% more CPU per device (the next message faults the
returned pages in again), so the heap is trimmed only when its free part passes `FREE_HEAP_LIMIT_MIB`:
the drift is bounded, and a typical message pays nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable
from typing import TypeVar

FREE_HEAP_LIMIT_MIB = 256
T = TypeVar("T")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


_libc: list = []


def _glibc():
    """(malloc_trim, mallinfo2), or None where the C library lacks them (not glibc >= 2.33)."""
    if not _libc:
        name = ctypes.util.find_library("c")
        libc = ctypes.CDLL(name) if name else None
        trim, info = getattr(libc, "malloc_trim", None), getattr(libc, "mallinfo2", None)
        if trim is not None and info is not None:
            info.restype = _MallInfo2
            _libc.append((trim, info))
        else:
            _libc.append(None)
    return _libc[0]


def free_heap_mib() -> float:
    """MiB the C heap holds free (its arenas' free blocks), or 0 where that cannot be read."""
    glibc = _glibc()
    return 0.0 if glibc is None else glibc[1]().fordblks / 2**20


def return_freed_memory(limit_mib: float = FREE_HEAP_LIMIT_MIB) -> bool:
    """`malloc_trim(0)` if the heap holds more than `limit_mib` free; True if it trimmed."""
    glibc = _glibc()
    if glibc is None or free_heap_mib() <= limit_mib:
        return False
    glibc[0](0)
    return True


def trims_memory_after(function: Callable[..., T]) -> Callable[..., T]:
    """`function`, then `return_freed_memory` once its frame (and every tensor only it held) is gone."""
    @functools.wraps(function)
    def wrapped(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        finally:
            return_freed_memory()
    return wrapped
