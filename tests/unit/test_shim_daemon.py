"""Daemon pieces in-process: the log target choice, and the exit path releasing the group's
state."""
from __future__ import annotations

import record_kinds  # noqa: F401  (registers the test-only kinds "file", "process")

import os
from pathlib import Path


import ttrpc
from spinbox.shim import config as config_mod
from spinbox.shim import daemon
from spinbox.shim.publisher import Publisher
from spinbox.shim.state import GroupPaths, State


def _ctx(tmp_path: Path) -> daemon.ShimContext:
    paths = GroupPaths(tmp_path / "st", "ns1", "g1")
    return daemon.ShimContext(namespace="ns1", group="g1", config=config_mod.SpinboxConfig(), paths=paths,
                              state=State.open(paths), publisher=Publisher(""))


async def test_finish_runs_cleanups_newest_first_and_removes_state(tmp_path):
    ctx = _ctx(tmp_path)
    order = []
    f = tmp_path / "made"
    f.write_text("x")
    ctx.state.record("file", str(f), path=str(f))

    async def async_cleanup():
        order.append("async")

    ctx.add_cleanup("first", lambda: order.append("sync"))
    ctx.add_cleanup("second", async_cleanup)
    server = ttrpc.Server()
    await daemon._finish(ctx, server)
    assert order == ["async", "sync"]
    assert not f.exists()
    assert not ctx.paths.dir.exists() and not ctx.paths.lock_file.exists()


def test_log_goes_to_the_fifo_only_with_a_reader(tmp_path):
    fifo = tmp_path / "log"
    os.mkfifo(fifo)
    fallback = tmp_path / "st" / "shim.log"
    fd, where = daemon.open_log(tmp_path, fallback)       # nobody reads: fallback file
    os.close(fd)
    assert where == str(fallback) and fallback.exists()
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)   # containerd's end
    try:
        fd, where = daemon.open_log(tmp_path, fallback)
        os.write(fd, b"hello\n")
        os.close(fd)
        assert where == str(fifo) and os.read(reader, 100) == b"hello\n"
    finally:
        os.close(reader)
