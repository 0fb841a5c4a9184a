"""cgroup facts for a container: stats from `runc events --stats` JSON, OOM kill counters
from memory.events (v2) or memory.oom_control (v1)."""
from __future__ import annotations

import os
from typing import Any

CGROUP_ROOT = "/sys/fs/cgroup"
_UNLIMITED = (1 << 62)   # runc reports "max" as a huge number; anything above means no limit


def is_v2(root: str = CGROUP_ROOT) -> bool:
    return os.path.exists(os.path.join(root, "cgroup.controllers"))


def oom_kill_count(cgroup: str, root: str = CGROUP_ROOT) -> int:
    """Number of OOM kills in the container's cgroup (0 when unknown)."""
    rel = cgroup.lstrip("/")
    if is_v2(root):
        candidates = [(os.path.join(root, rel, "memory.events"), "oom_kill")]
    else:
        candidates = [(os.path.join(root, "memory", rel, "memory.oom_control"), "oom_kill")]
    for path, key in candidates:
        try:
            with open(path) as f:
                for line in f:
                    k, _, v = line.partition(" ")
                    if k == key:
                        return int(v)
        except (OSError, ValueError):
            pass
    return 0


def _limit(v: Any) -> int:
    try:
        n = int(v or 0)
    except (TypeError, ValueError):
        return 0
    return 0 if n >= _UNLIMITED else n


def summarize_stats(events_json: dict[str, Any]) -> dict[str, int]:
    """Map runc's `events --stats` JSON (types.Stats: both v1 and v2 hosts) to flat numbers."""
    data = events_json.get("data") or {}
    cpu = (data.get("cpu") or {}).get("usage") or {}
    mem = data.get("memory") or {}
    usage = mem.get("usage") or {}
    pids = data.get("pids") or {}
    return {
        "cpu_usage_ns": int(cpu.get("total") or 0),
        "cpu_user_ns": int(cpu.get("user") or 0),
        "cpu_system_ns": int(cpu.get("kernel") or 0),
        "memory_usage_bytes": int(usage.get("usage") or 0),
        "memory_limit_bytes": _limit(usage.get("limit")),
        "pids_current": int(pids.get("current") or 0),
        "pids_limit": _limit(pids.get("limit")),
    }


def remove_parent(cgroup: str, root: str = CGROUP_ROOT) -> None:
    """rmdir the (empty) parent cgroup runc created for our containers, in every hierarchy."""
    rel = cgroup.strip("/")
    if not rel:
        return
    dirs = [os.path.join(root, rel)]
    if not is_v2(root):
        try:
            dirs = [os.path.join(root, h, rel) for h in os.listdir(root)]
        except OSError:
            return
    for d in dirs:
        try:
            os.rmdir(d)
        except OSError:
            pass
