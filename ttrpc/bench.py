"""Benchmark: `python -m ttrpc.bench [--json FILE] [--calls N] [--megabytes M]`.

The server runs in a child process (its own event loop and CPU) on a unix socket:
  * unary round-trip latency, sequential calls (p50 / p99 / mean);
  * unary throughput with 32 calls in flight;
  * streaming throughput: 64 KiB Data messages over the credit-controlled bidi `Download`
    method (1 MiB window, grants as the client consumes).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from . import Client, ReceiveWindow, Server
from .testing import SERVICE, BenchServicer, Msg


async def _serve(path: str) -> None:
    server = Server()
    server.register(SERVICE, BenchServicer())
    await server.serve_unix(path)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until parent exits
    await server.close()


def _percentile(sorted_values: list[float], p: float) -> float:
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


async def _measure(path: str, calls: int, megabytes: int) -> dict[str, Any]:
    client = await Client.connect(path)
    stub = client.stub(SERVICE)
    try:
        req = Msg(text="ping")
        for _ in range(200):  # warm-up
            await stub.Unary(req)
        lat = []
        for _ in range(calls):
            t0 = time.perf_counter()
            await stub.Unary(req)
            lat.append(time.perf_counter() - t0)
        lat.sort()

        inflight, total_calls = 32, calls * 2
        sem = asyncio.Semaphore(inflight)

        async def one() -> None:
            async with sem:
                await stub.Unary(req)
        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(total_calls)))
        concurrent_s = time.perf_counter() - t0

        chunk, window, total = 64 * 1024, 1 << 20, megabytes * 1_000_000
        t0 = time.perf_counter()
        stream = await stub.Download(Msg(credit=window, size=chunk, total=total))
        rw = ReceiveWindow(window)
        got = messages = 0
        while got < total:
            m = await stream.recv()
            if m is None:
                raise RuntimeError(f"stream ended after {got} of {total} bytes")
            n = len(m.data)
            rw.received(n)
            got += n
            messages += 1
            grant = rw.consumed(n)
            if grant:
                await stream.send(Msg(credit=grant))
        await stream.aclose()
        stream_s = time.perf_counter() - t0
    finally:
        await client.close()
    return {
        "unary_sequential": {
            "calls": calls,
            "p50_us": round(_percentile(lat, 50) * 1e6, 1),
            "p99_us": round(_percentile(lat, 99) * 1e6, 1),
            "mean_us": round(statistics.fmean(lat) * 1e6, 1),
            "calls_per_s": round(calls / sum(lat)),
        },
        "unary_concurrent": {
            "calls": total_calls, "in_flight": inflight,
            "calls_per_s": round(total_calls / concurrent_s),
        },
        "stream_download": {
            "bytes": got, "messages": messages, "message_bytes": chunk, "window_bytes": window,
            "seconds": round(stream_s, 3), "mb_per_s": round(got / stream_s / 1e6, 1),
        },
    }


def run(calls: int, megabytes: int) -> dict[str, Any]:
    tmp = tempfile.mkdtemp(prefix="ttrpc-bench-")
    path = os.path.join(tmp, "bench.sock")
    child = subprocess.Popen([sys.executable, "-m", "ttrpc.bench", "--serve", path],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None   # both asked for as pipes
    try:
        if child.stdout.readline().strip() != "ready":
            raise RuntimeError("benchmark server did not start")
        results = asyncio.run(_measure(path, calls, megabytes))
    finally:
        child.stdin.close()  # the server exits on EOF
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    results["environment"] = {"python": platform.python_version(), "machine": platform.machine(),
                              "cpus": os.cpu_count(), "transport": "unix socket, server in a child process"}
    return results


def table(r: dict[str, Any]) -> str:
    u, c, s = r["unary_sequential"], r["unary_concurrent"], r["stream_download"]
    rows = [
        ("unary round trip p50", f"{u['p50_us']} µs"),
        ("unary round trip p99", f"{u['p99_us']} µs"),
        ("unary sequential", f"{u['calls_per_s']} calls/s ({u['calls']} calls)"),
        (f"unary, {c['in_flight']} in flight", f"{c['calls_per_s']} calls/s ({c['calls']} calls)"),
        ("stream download (credits)", f"{s['mb_per_s']} MB/s ({s['bytes'] / 1e6:.0f} MB in "
                                      f"{s['message_bytes'] // 1024} KiB messages, "
                                      f"{s['window_bytes'] // 1024} KiB window)"),
    ]
    width = max(len(a) for a, _ in rows)
    return "\n".join(f"{a.ljust(width)}  {b}" for a, b in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ttrpc.bench", description=__doc__.splitlines()[0])
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--calls", type=int, default=5000, help="sequential unary calls (default 5000)")
    p.add_argument("--megabytes", type=int, default=200, help="streamed MB (default 200)")
    p.add_argument("--serve", metavar="PATH", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        asyncio.run(_serve(args.serve))
        return 0
    results = run(args.calls, args.megabytes)
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
