"""Our ttrpc library against the Go reference implementation (Debian's containerd/ttrpc 1.1).

integration/go/ttrpcpeer is built here with Debian's Go toolchain, offline. Both directions:
Python client -> Go server and Go client -> Python server; unary calls, metadata, status errors
(code and message), and deadlines (timeout_nano) either way.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from google.protobuf import empty_pb2, wrappers_pb2

import ttrpc

pytestmark = [pytest.mark.integration, pytest.mark.go]

ROOT = Path(__file__).resolve().parent.parent
PEER_SRC = ROOT / "integration" / "go" / "ttrpcpeer"
GOPATH = "/usr/share/gocode"  # Debian's golang-*-dev packages install their sources here
SERVICE = "spinbox.test.v1.Peer"

DEADLINE_EXCEEDED, NOT_FOUND, FAILED_PRECONDITION, UNIMPLEMENTED = 4, 5, 9, 12
assert (ttrpc.Code.DEADLINE_EXCEEDED, ttrpc.Code.NOT_FOUND, ttrpc.Code.FAILED_PRECONDITION,
        ttrpc.Code.UNIMPLEMENTED) == (DEADLINE_EXCEEDED, NOT_FOUND, FAILED_PRECONDITION, UNIMPLEMENTED)


def _unavailable(reason: str) -> None:
    if os.environ.get("SPINBOX_REQUIRE_INTEGRATION"):
        pytest.fail(reason + " (SPINBOX_REQUIRE_INTEGRATION is set)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def scratch():
    """A short-pathed temp dir for sockets, removed afterwards (pytest's tmp_path is kept)."""
    with tempfile.TemporaryDirectory(prefix="spinbox-go-") as d:
        yield Path(d)


@pytest.fixture(scope="module")
def ttrpcpeer():
    """Build the Go peer into a temp dir (own GOCACHE there too: nothing left behind)."""
    if shutil.which("go") is None:
        _unavailable("`go` not found (Debian package golang-go)")
    if not Path(GOPATH, "src/github.com/containerd/ttrpc").is_dir():
        _unavailable(f"no Go ttrpc sources under {GOPATH} (golang-github-containerd-ttrpc-dev)")
    with tempfile.TemporaryDirectory(prefix="spinbox-ttrpcpeer-") as d:
        out = Path(d)
        env = dict(os.environ, GO111MODULE="off", GOPATH=GOPATH, GOCACHE=str(out / "gocache"))
        r = subprocess.run(["go", "build", "-o", str(out / "ttrpcpeer"), "./integration/go/ttrpcpeer"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
        shutil.rmtree(out / "gocache", ignore_errors=True)
        if r.returncode != 0:
            _unavailable(f"building the Go ttrpc peer failed:\n{r.stderr}")
        yield out / "ttrpcpeer"


# -- Python client -> Go server --------------------------------------------------------------

class GoServer:
    def __init__(self, proc: asyncio.subprocess.Process, socket: str) -> None:
        self.proc, self.socket = proc, socket

    async def next_event(self, timeout: float = 20) -> dict:
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        assert line, "Go server exited"
        return json.loads(line)


@pytest.fixture
async def go_server(ttrpcpeer, scratch):
    socket = str(scratch / "go.sock")
    proc = await asyncio.create_subprocess_exec(str(ttrpcpeer), "-socket", socket, "server",
                                                stdout=asyncio.subprocess.PIPE)
    try:
        server = GoServer(proc, socket)
        assert await server.next_event() == "READY"
        yield server
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()


@pytest.fixture
async def py_client(go_server):
    client = await ttrpc.Client.connect(go_server.socket)
    try:
        yield client
    finally:
        await client.close()


async def test_py_client_unary_echo(py_client):
    for value in ("hello", "", "ü" * 1000):
        reply = await py_client.call(SERVICE, "Echo", wrappers_pb2.StringValue(value=value),
                                     wrappers_pb2.StringValue)
        assert reply.value == value


async def test_py_client_concurrent_calls_on_one_connection(py_client):
    values = [f"v{i}" for i in range(50)]
    replies = await asyncio.gather(*(
        py_client.call(SERVICE, "Echo", wrappers_pb2.StringValue(value=v), wrappers_pb2.StringValue)
        for v in values))
    assert [r.value for r in replies] == values


async def test_py_client_metadata_and_timeout_reach_go(py_client):
    reply = await py_client.call(SERVICE, "Inspect", empty_pb2.Empty(), wrappers_pb2.StringValue,
                                 metadata=[("containerd-namespace-ttrpc", "spinbox"), ("x-multi", "a"),
                                           ("x-multi", "b")],
                                 timeout=30)
    seen = json.loads(reply.value)
    assert seen["metadata"] == {"containerd-namespace-ttrpc": ["spinbox"], "x-multi": ["a", "b"]}
    assert seen["has_deadline"] is True and 0 < seen["timeout_ms"] <= 30_000
    no_timeout = json.loads((await py_client.call(SERVICE, "Inspect", empty_pb2.Empty(),
                                                  wrappers_pb2.StringValue)).value)
    assert no_timeout["has_deadline"] is False and no_timeout["metadata"] == {}


@pytest.mark.parametrize("code,message", [(NOT_FOUND, "container c1 not found"),
                                          (FAILED_PRECONDITION, "init process is not running"),
                                          (2, "ünïcode: with colon")])
async def test_py_client_gets_go_status_errors(py_client, code, message):
    with pytest.raises(ttrpc.TTRPCError) as err:
        await py_client.call(SERVICE, "Fail", wrappers_pb2.StringValue(value=f"{code}:{message}"),
                             empty_pb2.Empty)
    assert (err.value.code, err.value.message) == (code, message)


async def test_py_client_unknown_method_is_unimplemented(py_client):
    with pytest.raises(ttrpc.TTRPCError) as err:
        await py_client.call(SERVICE, "Nope", empty_pb2.Empty(), empty_pb2.Empty)
    assert err.value.code == UNIMPLEMENTED and "Nope" in err.value.message


async def test_py_client_timeout_against_slow_go_handler(py_client, go_server):
    with pytest.raises(ttrpc.TTRPCError) as err:
        await py_client.call(SERVICE, "Sleep", wrappers_pb2.Int64Value(value=60_000), empty_pb2.Empty,
                             timeout=0.3)
    assert err.value.code == DEADLINE_EXCEEDED
    # The Go handler saw the deadline we sent as timeout_nano and was cancelled by it.
    event = await go_server.next_event()
    assert event == {"event": "sleep_cancelled", "error": "context deadline exceeded", "has_deadline": True}
    # The connection is still good afterwards.
    reply = await py_client.call(SERVICE, "Echo", wrappers_pb2.StringValue(value="still here"),
                                 wrappers_pb2.StringValue)
    assert reply.value == "still here"


# -- Go client -> Python server --------------------------------------------------------------

def _metadata_dict(md) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key, _ in md.items():
        out.setdefault(key, md.get_all(key))
    return out


class PeerService:
    """The Python twin of the Go peer's service; records what the handlers saw."""

    def __init__(self) -> None:
        self.sleeps: list[dict] = []

    async def echo(self, req: wrappers_pb2.StringValue, ctx) -> wrappers_pb2.StringValue:
        return wrappers_pb2.StringValue(value=req.value)

    async def inspect(self, req: empty_pb2.Empty, ctx) -> wrappers_pb2.StringValue:
        remaining = ctx.time_remaining()
        seen = {"metadata": _metadata_dict(ctx.metadata),
                "remaining_s": remaining if ctx.deadline is not None else None}
        return wrappers_pb2.StringValue(value=json.dumps(seen))

    async def fail(self, req: wrappers_pb2.StringValue, ctx) -> empty_pb2.Empty:
        code, message = req.value.split(":", 1)
        raise ttrpc.TTRPCError(ttrpc.Code(int(code)), message)

    async def sleep(self, req: wrappers_pb2.Int64Value, ctx) -> empty_pb2.Empty:
        record = {"remaining_s": ctx.time_remaining() if ctx.deadline is not None else None,
                  "cancelled": False}
        self.sleeps.append(record)
        try:
            await asyncio.sleep(req.value / 1000)
        except asyncio.CancelledError:
            record["cancelled"] = True
            raise
        return empty_pb2.Empty()


@pytest.fixture
async def py_server(scratch):
    svc = PeerService()
    server = ttrpc.Server()
    for method, handler, request_type in (("Echo", svc.echo, wrappers_pb2.StringValue),
                                          ("Inspect", svc.inspect, empty_pb2.Empty),
                                          ("Fail", svc.fail, wrappers_pb2.StringValue),
                                          ("Sleep", svc.sleep, wrappers_pb2.Int64Value)):
        server.register_method(SERVICE, method, handler, request_type)
    socket = str(scratch / "py.sock")
    await server.serve_unix(socket, require_same_user=True)
    try:
        yield socket, svc
    finally:
        await server.close()


async def run_go_client(ttrpcpeer: Path, socket: str, calls: list[dict]) -> list[dict]:
    proc = await asyncio.create_subprocess_exec(
        str(ttrpcpeer), "-socket", socket, "client", stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdin = "".join(json.dumps(c) + "\n" for c in calls).encode()
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, f"Go client failed: {err.decode()}"
    results = [json.loads(l) for l in out.decode().splitlines()]
    assert len(results) == len(calls), (results, err.decode())
    return results


async def test_go_client_against_py_server(ttrpcpeer, py_server):
    socket, svc = py_server
    results = await run_go_client(ttrpcpeer, socket, [
        {"method": "Echo", "kind": "string", "value": "from go"},
        {"method": "Echo", "kind": "string", "value": ""},
        {"method": "Inspect", "kind": "empty", "metadata": {"Containerd-Namespace-TTRPC": ["k8s.io"],
                                                            "x-multi": ["1", "2"]}},
        {"method": "Inspect", "kind": "empty", "timeout_ms": 30_000},
        {"method": "Fail", "kind": "string", "value": f"{NOT_FOUND}:process already finished"},
        {"method": "Fail", "kind": "string", "value": f"{FAILED_PRECONDITION}:ünïcode: text"},
        {"method": "Missing", "kind": "empty"},
        {"service": "no.such.Service", "method": "Echo", "kind": "string", "value": "x"},
    ])
    assert results[0] == {"ok": True, "value": "from go"}
    assert results[1] == {"ok": True, "value": ""}
    md = json.loads(results[2]["value"])
    # Go lower-cases metadata keys; each value is a separate KeyValue on the wire.
    assert md["metadata"] == {"containerd-namespace-ttrpc": ["k8s.io"], "x-multi": ["1", "2"]}
    assert md["remaining_s"] is None  # no timeout_nano sent -> no deadline
    with_deadline = json.loads(results[3]["value"])
    assert 0 < with_deadline["remaining_s"] <= 30
    assert results[4] == {"ok": False, "code": NOT_FOUND, "message": "process already finished",
                          "source": "status"}
    assert results[5] == {"ok": False, "code": FAILED_PRECONDITION, "message": "ünïcode: text",
                          "source": "status"}
    assert results[6]["ok"] is False and results[6]["code"] == UNIMPLEMENTED
    assert results[7]["ok"] is False and results[7]["code"] == UNIMPLEMENTED
    assert "no.such.Service" in results[7]["message"]


async def test_go_client_deadline_against_slow_py_handler(ttrpcpeer, py_server):
    socket, svc = py_server
    results = await run_go_client(ttrpcpeer, socket, [
        {"method": "Sleep", "kind": "int64", "value": 60_000, "timeout_ms": 1000},
        {"method": "Echo", "kind": "string", "value": "after timeout"},
    ])
    assert results[0]["ok"] is False and results[0]["code"] == DEADLINE_EXCEEDED
    assert results[1] == {"ok": True, "value": "after timeout"}
    # The Python handler got the Go client's deadline (timeout_nano) and was cancelled by it.
    assert len(svc.sleeps) == 1
    assert 0 < svc.sleeps[0]["remaining_s"] <= 1.0
    for _ in range(100):
        if svc.sleeps[0]["cancelled"]:
            break
        await asyncio.sleep(0.05)
    assert svc.sleeps[0]["cancelled"] is True
