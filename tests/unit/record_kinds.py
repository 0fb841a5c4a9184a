"""Record kinds that only tests use, registered the way an owning module registers its own
(shim.releasers): the state store is generic, production registers only what it records."""
from __future__ import annotations

import asyncio
import os
from typing import Any

from spinbox.shim import releasers
from spinbox.shim.vm import procinfo


@releasers.releaser("file")
async def release_file_record(r: dict[str, Any]) -> str:
    try:
        os.unlink(r["path"])
        return f"removed {r['path']}"
    except FileNotFoundError:
        return f"{r['path']} already gone"


@releasers.releaser("process")
async def release_process_record(r: dict[str, Any]) -> str:
    """SIGKILL, only if the pid still has the recorded start time and argv tag."""
    pid, start = r.get("pid"), r.get("start_time")
    if not isinstance(pid, int) or not isinstance(start, int):
        return f"process {r['key']}: never started"
    killed = await asyncio.to_thread(procinfo.kill_verified, pid, start, r.get("tag"),
                                     timeout=float(r.get("kill_timeout", 2.0)))
    if killed:
        return f"killed {r['key']} pid {pid}"
    return f"process {r['key']} pid {pid} already gone"
