import json
import os
import subprocess
import sys

import pytest

from kdsearch.infra.allocator import reuse_freed_memory

# Allocates, fills and frees a 64 MiB buffer five times and prints the minor page faults of the last four.
_FAULTS = """
import ctypes, json, resource, sys
from kdsearch.infra.allocator import reuse_freed_memory
applied = reuse_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 64 << 20
def fill_once():
    buffer = libc.malloc(size)
    ctypes.memset(buffer, 1, size)
    libc.free(buffer)
fill_once()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    fill_once()
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _faults(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in ("KDSEARCH_REUSE_MEMORY", "MALLOC_MMAP_THRESHOLD_")}
    output = subprocess.run(
        [sys.executable, "-c", _FAULTS], env=clean | env, capture_output=True, text=True, check=True
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_large_buffers_are_reused_instead_of_faulted_in_again():
    reused, default = _faults(), _faults(KDSEARCH_REUSE_MEMORY="0")
    assert reused["applied"] and not default["applied"]
    pages = 4 * (64 << 20) // 4096
    assert default["faults"] > pages // 2  # each fresh mapping faults its pages in
    assert reused["faults"] < pages // 20


def test_the_users_own_malloc_settings_are_left_alone():
    assert _faults(MALLOC_MMAP_THRESHOLD_="131072")["applied"] is False


def test_opting_out_leaves_the_allocator_alone(monkeypatch):
    monkeypatch.setenv("KDSEARCH_REUSE_MEMORY", "0")
    assert reuse_freed_memory.__wrapped__() is False
