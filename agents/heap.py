"""The process heap under glibc: one malloc arena, and freed memory given back between training phases.

A training run frees and reallocates gigabytes of activations at every update. glibc keeps freed memory
inside its heap for reuse, per arena (one per torch worker thread by default), so the resident memory of a
run grows well past what it holds live (``benchmarks/RESULTS.md``: 3.4 GB resident against 1.8 GB after a
trim in the default ``lm-gym train``). Both functions are no-ops without glibc.
"""

from __future__ import annotations

import ctypes
import functools

M_ARENA_MAX = -8  # glibc's mallopt parameter


@functools.cache
def _glibc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def one_malloc_arena() -> None:
    """Keep glibc's malloc to one arena for this process: with an arena per torch worker thread, more of the
    memory of freed activations stays resident."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_ARENA_MAX, 1)


def release_freed_memory() -> None:
    """Give the heap's free pages back to the system (glibc's ``malloc_trim``): between a rollout and an
    update, so that each phase starts from what is live rather than from the last phase's peak."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
