"""Daemon pieces in-process: the placeholder Task service (no spinbox.shim.task_service),
the log target choice, and the exit path releasing the group's state."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from google.protobuf import empty_pb2

import ttrpc
from spinbox.api._pb.containerd.task.v2 import shim_pb2
from spinbox.shim import config as config_mod
from spinbox.shim import daemon
from spinbox.shim.publisher import Publisher
from spinbox.shim.state import GroupPaths, State


def _ctx(tmp_path: Path) -> daemon.ShimContext:
    paths = GroupPaths(tmp_path / "st", "ns1", "g1")
    return daemon.ShimContext(namespace="ns1", task_id="g1", group="g1", bundle=tmp_path,
                              address="unix://" + str(tmp_path / "s.sock"),
                              config=config_mod.SpinboxConfig(), options=None, paths=paths,
                              state=State.open(paths), publisher=Publisher(""))


async def test_placeholder_task_service(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "spinbox.shim.task_service", None)   # "not installed"
    ctx = _ctx(tmp_path)
    server = ttrpc.Server()
    await daemon.build_services(server, ctx)
    sock = str(tmp_path / "s.sock")
    await server.serve_unix(sock, require_same_user=True)
    client = await ttrpc.connect_unix(sock)
    try:
        for service in ("containerd.task.v2.Task", "containerd.task.v3.Task"):
            with pytest.raises(ttrpc.Unimplemented, match="Task.Create is not available"):
                await client.call(service, "Create", shim_pb2.CreateTaskRequest(id="g1"),
                                  shim_pb2.CreateTaskResponse)
            resp = await client.call(service, "Connect", shim_pb2.ConnectRequest(id="g1"),
                                     shim_pb2.ConnectResponse)
            assert resp.shim_pid == os.getpid()
        assert not ctx.shutting_down
        await client.call("containerd.task.v2.Task", "Shutdown", shim_pb2.ShutdownRequest(id="g1"),
                          empty_pb2.Empty)
        assert ctx.shutting_down
    finally:
        await client.close()
        await server.close()


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
