"""mtkit.malloc: freed large blocks stay in the process and are reused without page faults."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

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


def test_mtkit_commands_ask_for_huge_pages_for_large_tensors(tmp_path):
    """Through the real entry point: a large tensor allocated by an mtkit command lies in a
    mapping marked for transparent huge pages (``hg`` in /proc/self/smaps)."""
    if not Path("/proc/self/smaps").exists():
        pytest.skip("needs /proc/self/smaps")
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import sys\n"
        "import mtkit.cli\n"
        "def probe():\n"
        "    import torch\n"
        "    ptr = torch.empty(64 << 20, dtype=torch.uint8).data_ptr()\n"
        "    inside = False\n"
        "    for line in open('/proc/self/smaps'):\n"
        "        head = line.split()[0]\n"
        "        if '-' in head and ':' not in head:\n"
        "            low, high = (int(v, 16) for v in head.split('-'))\n"
        "            inside = low <= ptr < high\n"
        "        elif inside and line.startswith('VmFlags'):\n"
        "            print(' '.join(line.split()[1:]))\n"
        "mtkit.cli.app = lambda **kwargs: probe()\n"
        "mtkit.cli.main([])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    done = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True, env=env, check=True)
    assert "hg" in done.stdout.split(), done.stdout
    env["THP_MEM_ALLOC_ENABLE"] = "0"  # the user's setting wins
    done = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True, env=env, check=True)
    assert "hg" not in done.stdout.split(), done.stdout
