"""shim/timeline.py: one log line per container, in the order of a `ctr run`."""
from __future__ import annotations

import logging
import time

from spinbox.shim.timeline import Timelines


def test_line_orders_marks_and_keeps_the_first(caplog):
    t = Timelines()
    t.mark("c1", "created", at=t.t0 + 2.0)
    t.mark("c1", "sandbox", "cold", at=t.t0 + 1.5)
    t.mark("c1", "rootfs", at=t.t0 + 0.25)
    time.sleep(0.01)
    t.mark("c1", "created")                       # a second mark of the same step is ignored
    t.mark("c1", "started", at=t.t0 + 3.0)
    line = t.line("c1")
    assert line.startswith("timeline c1: rootfs=+0.25 sandbox=cold:+1.50 created=+2.00 started=+3.00 ")
    t.mark("c2", "deleted")
    t.mark_all("vm_stopped")
    with caplog.at_level(logging.INFO, logger="spinbox.shim.timeline"):
        t.flush()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and all("vm_stopped=+" in ln for ln in lines)
    assert t.line("c1") == "timeline c1:  (s since the daemon started serving)"   # flushed


def test_a_failed_create_leaves_no_line(caplog):
    t = Timelines()
    t.mark("bad", "rootfs")
    t.forget("bad")
    with caplog.at_level(logging.INFO, logger="spinbox.shim.timeline"):
        t.flush()
    assert caplog.records == []
