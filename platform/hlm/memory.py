"""How much memory this process may still allocate: the tighter of its cgroup's headroom and the node's.

A replica in a Kubernetes pod is killed at its cgroup limit long before the node runs out, so the cgroup counts
first; outside a container only the node's MemAvailable applies.
"""

from __future__ import annotations

from pathlib import Path

_CGROUP_V2 = Path("/sys/fs/cgroup")
_CGROUP_V1 = Path("/sys/fs/cgroup/memory")


def available_memory_bytes() -> int:
    """Bytes this process can allocate before its cgroup limit or the node's free memory runs out."""
    candidates = [_meminfo_available()]
    for limit, usage in ((_CGROUP_V2 / "memory.max", _CGROUP_V2 / "memory.current"),
                         (_CGROUP_V1 / "memory.limit_in_bytes", _CGROUP_V1 / "memory.usage_in_bytes")):
        try:
            cap, used = limit.read_text().strip(), int(usage.read_text().strip())
        except (OSError, ValueError):
            continue
        if cap.isdigit():  # "max" (v2) means no limit
            candidates.append(int(cap) - used)
    return max(0, min(candidates))


def _meminfo_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise OSError("no MemAvailable in /proc/meminfo")
