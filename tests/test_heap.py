"""glibc heap settings: freed memory goes back to the system when asked."""

import os
import platform

import pytest
import torch

from agents.heap import release_freed_memory

PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's heap only")
def test_release_gives_freed_heap_memory_back():
    # 64 KB blocks stay below glibc's mmap threshold, so freeing them leaves the pages inside the heap;
    # the last block, kept, stops glibc from trimming the heap's top by itself.
    blocks = [torch.ones(16 * 1024) for _ in range(1500)]
    keep = torch.ones(16 * 1024)
    del blocks
    before = resident_bytes()
    release_freed_memory()
    assert before - resident_bytes() > 50 * 2**20  # most of the ~94 MB freed
    assert keep.sum().item() == 16 * 1024
