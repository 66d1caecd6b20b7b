"""mtkit.malloc: freed large blocks stay in the process and are reused without page faults."""

from __future__ import annotations

import platform
import resource

import pytest

from mtkit.malloc import keep_freed_memory

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")


def _faults_of_allocation(size: int) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buf = bytearray(size)  # malloc + memset: every page is touched
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    del buf
    return faults


@glibc
def test_a_freed_large_block_is_reused_without_faulting():
    size = 64 << 20  # above glibc's largest mmap threshold (32 MiB)
    assert keep_freed_memory()
    try:
        _faults_of_allocation(size)  # grows the heap once
        assert _faults_of_allocation(size) < 200  # 64 MiB of fresh 4 KiB pages would be 16,384
    finally:
        keep_freed_memory(False)


@glibc
def test_the_environment_can_turn_it_off(monkeypatch):
    monkeypatch.setenv("MTKIT_KEEP_FREED_MEMORY", "0")
    assert not keep_freed_memory()
    assert keep_freed_memory(False)  # restoring the defaults is always allowed
