"""glibc malloc tuning (dpdm.utils.allocator): applied on Linux, and freed memory is then kept for reuse."""
import platform
import subprocess
import sys

import pytest

CHILD = r"""
import sys, torch
from dpdm.utils.allocator import retain_freed_memory
if sys.argv[1] == "tuned":
    assert retain_freed_memory()
def rss():
    return int(open("/proc/self/statm").read().split()[1])
x = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, touched
del x
before = rss()
y = torch.ones(16 << 20, dtype=torch.uint8)  # 16 MiB: below the tuned 32 MiB mmap threshold
del y
print(rss() - before)
"""


@pytest.mark.skipif(platform.system() != "Linux", reason="glibc mallopt")
def test_freed_buffers_stay_in_the_process_only_when_tuned():
    grow = {}
    for mode in ("default", "tuned"):
        out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True,
                             check=True).stdout
        grow[mode] = int(out.strip().splitlines()[-1])
    # default: the 16 MiB buffer is an mmap, unmapped on free (RSS back to where it was);
    # tuned: it comes from the heap and stays resident after free.
    page = 4096
    assert abs(grow["default"]) * page < (4 << 20), grow
    assert grow["tuned"] * page > (12 << 20), grow
