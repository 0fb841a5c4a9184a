"""CNI client logic: config parsing/validation, plugin stdin/env, result conversion, errors,
the result cache, the host lock, and the chain semantics (prevResult threading, DEL order and
cached prevResult, ADD rollback) with small scripted plugins in a tmp dir (no root needed; the
real plugins are exercised in integration/test_network.py)."""
from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
import textwrap

import pytest

from spinbox.shim.network import cni
from spinbox.shim.network.host import DNSConfig

BRIDGE = {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local", "subnet": "10.1.0.0/24"}}


def conflist(**over):
    d = {"cniVersion": "1.0.0", "name": "net1", "plugins": [BRIDGE, {"type": "portmap", "capabilities": {"portMappings": True}}]}
    d.update(over)
    return d


# ---------------------------------------------------------------------------------------------
# parsing and validation

def test_parse_conflist_valid():
    net = cni.parse_conflist(json.dumps(conflist()))
    assert net.name == "net1" and net.cni_version == "1.0.0"
    assert [p["type"] for p in net.plugins] == ["bridge", "portmap"]
    assert net.disable_check is False


def test_single_plugin_conf_is_wrapped():
    net = cni.parse_conflist({"cniVersion": "0.4.0", "name": "single", "type": "bridge", "bridge": "b0"})
    assert net.plugins == ({"type": "bridge", "bridge": "b0"},)
    assert net.cni_version == "0.4.0"


@pytest.mark.parametrize("data, needle", [
    (b"{not json", "not valid JSON"),
    (b"[]", "must be a JSON object"),
    ({"cniVersion": "1.0.0", "plugins": [BRIDGE]}, "'name' must match"),
    ({"cniVersion": "1.0.0", "name": "bad/name", "plugins": [BRIDGE]}, "'name' must match"),
    ({"name": "n", "plugins": [BRIDGE]}, "'cniVersion' is missing"),
    ({"cniVersion": "0.2.0", "name": "n", "plugins": [BRIDGE]}, "cniVersion '0.2.0' is not supported"),
    ({"cniVersion": "1.0.0", "name": "n", "plugins": []}, "'plugins' must be a non-empty list"),
    ({"cniVersion": "1.0.0", "name": "n", "plugins": [{"bridge": "x"}]}, "plugins[0] has no 'type'"),
    ({"cniVersion": "1.0.0", "name": "n", "plugins": [BRIDGE, {"type": "../bin/sh"}]}, "plugins[1] type '../bin/sh'"),
    ({"cniVersion": "1.0.0", "name": "n"}, "neither 'plugins' nor 'type'"),
])
def test_parse_conflist_rejects(data, needle):
    with pytest.raises(cni.CNIConfigError) as ei:
        cni.parse_conflist(data, source="/x/10-a.conflist")
    assert needle in str(ei.value)
    assert "/x/10-a.conflist" in str(ei.value)          # the file is named


def test_disable_check_string():
    assert cni.parse_conflist(conflist(disableCheck="true")).disable_check is True


def test_load_network_first_lexical_and_by_name(tmp_path):
    (tmp_path / "20-b.conflist").write_text(json.dumps(conflist(name="bnet")))
    (tmp_path / "10-a.conflist").write_text(json.dumps(conflist(name="anet")))
    (tmp_path / "05-ignored.txt").write_text("junk")
    (tmp_path / "30-broken.conf").write_text("{")
    assert cni.load_network(tmp_path).name == "anet"
    assert cni.load_network(tmp_path, "bnet").source == str(tmp_path / "20-b.conflist")
    with pytest.raises(cni.CNIConfigError) as ei:
        cni.load_network(tmp_path, "nope")
    msg = str(ei.value)
    assert "no CNI network named 'nope'" in msg and "anet" in msg and "30-broken.conf" in msg


def test_load_network_empty_dir(tmp_path):
    with pytest.raises(cni.CNIConfigError, match="no CNI network config"):
        cni.load_network(tmp_path / "missing")


def test_load_network_broken_first_file_names_it(tmp_path):
    (tmp_path / "10-a.conflist").write_text('{"name": "x", "cniVersion": "1.0.0", "plugins": [{}]}')
    with pytest.raises(cni.CNIConfigError, match=r"10-a.conflist.*plugins\[0\] has no 'type'"):
        cni.load_network(tmp_path)


# ---------------------------------------------------------------------------------------------
# invocation inputs

def test_plugin_stdin_injects_name_version_prev_and_runtime_config():
    net = cni.parse_conflist(conflist())
    prev = {"cniVersion": "1.0.0", "ips": [{"address": "10.1.0.2/24"}]}
    pm = [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]
    caps = {"portMappings": pm, "bandwidth": {"ingressRate": 1}}
    first = json.loads(cni.plugin_stdin(net, net.plugins[0], None, caps))
    assert first["name"] == "net1" and first["cniVersion"] == "1.0.0"
    assert "prevResult" not in first and "runtimeConfig" not in first   # bridge declares no capabilities
    second = json.loads(cni.plugin_stdin(net, net.plugins[1], prev, caps))
    assert second["prevResult"] == prev
    assert second["runtimeConfig"] == {"portMappings": pm}                 # only the declared capability
    assert "capabilities" in second
    assert "name" not in net.plugins[0]                                     # the list itself is untouched


def test_build_env_sets_cni_vars_and_drops_inherited():
    rt = cni.RuntimeConf("ctr1", "/run/netns/x", "eth1", (("IgnoreUnknown", "1"), ("K8S_POD_NAME", "p")))
    env = cni.build_env("ADD", rt, ["/a", "/b"], {"PATH": "/usr/bin", "CNI_ARGS": "stale", "CNI_FOO": "x"})
    assert env == {"PATH": "/usr/bin", "CNI_COMMAND": "ADD", "CNI_CONTAINERID": "ctr1",
                   "CNI_NETNS": "/run/netns/x", "CNI_IFNAME": "eth1",
                   "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAME=p", "CNI_PATH": "/a:/b"}


@pytest.mark.parametrize("rt, needle", [
    (cni.RuntimeConf("-bad", "/n"), "container id"),
    (cni.RuntimeConf("ok", "/n", ifname="waytoolonginterface"), "interface name"),
    (cni.RuntimeConf("ok", "/n", ifname="a/b"), "interface name"),
    (cni.RuntimeConf("ok", "/n", args=(("K", "a;b"),)), "CNI_ARGS"),
    (cni.RuntimeConf("ok", "/n", args=(("K=V", "x"),)), "CNI_ARGS"),
])
def test_runtime_conf_validation(rt, needle):
    with pytest.raises(cni.CNIError, match=needle):
        rt.validate()


def test_convert_result_between_versions():
    old = {"cniVersion": "0.4.0", "ips": [{"version": "4", "address": "10.0.0.2/24", "interface": 0}],
           "interfaces": [{"name": "eth0"}]}
    up = cni.convert_result(old, "1.0.0")
    assert up["cniVersion"] == "1.0.0" and "version" not in up["ips"][0]
    down = cni.convert_result({"cniVersion": "1.0.0", "ips": [{"address": "fd00::2/64"}]}, "0.4.0")
    assert down["ips"][0]["version"] == "6" and down["cniVersion"] == "0.4.0"
    with pytest.raises(cni.CNIError, match="not supported"):
        cni.convert_result({"cniVersion": "0.2.0", "ip4": {}}, "1.0.0")


@pytest.mark.parametrize("result, needle", [
    ([], "not a JSON object"),
    ({"ips": []}, "no cniVersion"),
    ({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2/24", "interface": 3}], "interfaces": []}, "out of range"),
    ({"cniVersion": "1.0.0", "routes": [{"gw": "1.1.1.1"}]}, "'routes'"),
    ({"cniVersion": "1.0.0", "dns": []}, "'dns'"),
])
def test_validate_result_rejects(result, needle):
    with pytest.raises(cni.CNIError, match=needle):
        cni.validate_result(result, "bridge")


def test_parse_plugin_error_json_and_raw():
    e = cni.parse_plugin_error("bridge", "ADD", 1, b'{"cniVersion":"1.0.0","code":7,"msg":"bad cfg","details":"x"}', b"")
    assert (e.plugin, e.command, e.cni_code, e.msg, e.details) == ("bridge", "ADD", 7, "bad cfg", "x")
    assert "CNI plugin bridge ADD failed (code 7): bad cfg; x" == str(e)
    raw = cni.parse_plugin_error("foo", "DEL", 2, b"", b"panic: boom\n")
    assert raw.cni_code is None and "exit status 2" in str(raw) and "panic: boom" in str(raw)


def test_dns_from_cni_and_resolv_conf(tmp_path):
    d = DNSConfig.from_cni({"dns": {"nameservers": ["10.0.0.10"], "search": ["svc.local"], "options": ["ndots:5"]}})
    assert d.nameservers == ["10.0.0.10"] and d.search == ["svc.local"] and d.options == ["ndots:5"]
    rc = tmp_path / "resolv.conf"
    rc.write_text("# c\nnameserver 127.0.0.53\nnameserver 1.1.1.1\nnameserver ::1\nsearch a.b c.d\noptions edns0\n")
    h = DNSConfig.from_resolv_conf(str(rc))
    assert h.nameservers == ["1.1.1.1"] and h.search == ["a.b", "c.d"] and h.options == ["edns0"]
    assert DNSConfig.from_resolv_conf(str(tmp_path / "none")).empty()


# ---------------------------------------------------------------------------------------------
# cache and lock

def test_result_cache_round_trip(tmp_path):
    cache = cni.ResultCache(tmp_path)
    net = cni.parse_conflist(conflist())
    rt = cni.RuntimeConf("c1", "/run/netns/c1", "eth0", (("A", "1"),), {"portMappings": []})
    result = {"cniVersion": "1.0.0", "ips": [{"address": "10.1.0.5/24"}]}
    p = cache.save(net, rt, result)
    assert p == tmp_path / "results" / "net1-c1-eth0"
    entry = json.loads(p.read_text())
    assert entry["kind"] == "cniCacheV1" and entry["networkName"] == "net1"   # libcni's format
    got = cache.load("net1", "c1", "eth0")
    assert got.network == net and got.rt == rt and got.result == result
    assert cache.load("net1", "c2", "eth0") is None
    cache.delete("net1", "c1", "eth0")
    assert not p.exists()
    p.write_text("{corrupt")
    with pytest.raises(cni.CNIError, match="corrupt"):
        cache.load("net1", "c1", "eth0")


async def test_host_lock_is_exclusive(tmp_path):
    order = []
    lock_path = tmp_path / "cni.lock"
    first_in = asyncio.Event()
    release = asyncio.Event()

    async def holder():
        async with cni.HostLock(lock_path):
            order.append("a-in")
            first_in.set()
            await release.wait()
            order.append("a-out")

    async def waiter():
        await first_in.wait()
        async with cni.HostLock(lock_path):
            order.append("b-in")

    t1, t2 = asyncio.create_task(holder()), asyncio.create_task(waiter())
    await first_in.wait()
    for _ in range(20):          # b must not get in while a holds the flock
        await asyncio.sleep(0)
    assert order == ["a-in"]
    release.set()
    await asyncio.gather(t1, t2)
    assert order == ["a-in", "a-out", "b-in"]


# ---------------------------------------------------------------------------------------------
# chain semantics with scripted plugins

# A plugin that logs (command, its stdin) and, on ADD, returns prevResult plus one interface
# named after itself. FAIL_<TYPE>=1 in the environment makes it fail with a CNI error object.
PLUGIN = textwrap.dedent(f"""\
    #!{sys.executable}
    import json, os, sys
    me = os.path.basename(sys.argv[0])
    conf = json.load(sys.stdin)
    with open(os.environ["LOG"], "a") as f:
        f.write(json.dumps({{"plugin": me, "cmd": os.environ["CNI_COMMAND"], "conf": conf,
                            "ifname": os.environ["CNI_IFNAME"], "netns": os.environ["CNI_NETNS"]}}) + "\\n")
    if os.path.exists(os.path.join(os.environ["FAILDIR"], me + "." + os.environ["CNI_COMMAND"])):
        print(json.dumps({{"cniVersion": "1.0.0", "code": 100, "msg": me + " refuses", "details": "by request"}}))
        sys.exit(1)
    if os.environ["CNI_COMMAND"] == "ADD":
        prev = conf.get("prevResult") or {{"cniVersion": conf["cniVersion"], "interfaces": [], "ips": []}}
        prev["interfaces"].append({{"name": me}})
        print(json.dumps(prev))
    """)


@pytest.fixture
def scripted(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name in ("p1", "p2", "p3"):
        f = bindir / name
        f.write_text(PLUGIN)
        f.chmod(f.stat().st_mode | stat.S_IXUSR)
    faildir = tmp_path / "fail"
    faildir.mkdir()
    log = tmp_path / "log.jsonl"
    monkeypatch.setenv("LOG", str(log))
    monkeypatch.setenv("FAILDIR", str(faildir))
    client = cni.CNIClient(bin_dirs=[str(tmp_path / "nobin"), str(bindir)], cache_dir=tmp_path / "cache",
                           lock_path=tmp_path / "lock")

    def calls():
        if not log.exists():
            return []
        out = [json.loads(line) for line in log.read_text().splitlines()]
        log.unlink()
        return out
    return client, faildir, calls


NET3 = {"cniVersion": "1.0.0", "name": "chain", "plugins": [{"type": "p1"}, {"type": "p2", "x": 1}, {"type": "p3"}]}
RT = cni.RuntimeConf("sb1", "/run/netns/none", "eth0")


async def test_add_threads_prev_result_and_caches(scripted):
    client, _, calls = scripted
    net = cni.parse_conflist(NET3)
    result = await client.add(net, RT)
    assert [i["name"] for i in result["interfaces"]] == ["p1", "p2", "p3"]
    log = calls()
    assert [(c["plugin"], c["cmd"]) for c in log] == [("p1", "ADD"), ("p2", "ADD"), ("p3", "ADD")]
    assert "prevResult" not in log[0]["conf"]
    assert [i["name"] for i in log[1]["conf"]["prevResult"]["interfaces"]] == ["p1"]
    assert [i["name"] for i in log[2]["conf"]["prevResult"]["interfaces"]] == ["p1", "p2"]
    assert log[1]["conf"]["x"] == 1 and log[1]["conf"]["name"] == "chain"
    assert client.cache.load("chain", "sb1", "eth0").result == result

    await client.check(net, RT)
    log = calls()
    assert [(c["plugin"], c["cmd"]) for c in log] == [("p1", "CHECK"), ("p2", "CHECK"), ("p3", "CHECK")]
    assert all(c["conf"]["prevResult"] == result for c in log)

    # DEL from a fresh client, from the cache alone (the crash path): reverse order, cached prevResult
    fresh = cni.CNIClient(bin_dirs=client.bin_dirs, cache_dir=client.cache.dir.parent, lock_path=client.lock_path)
    assert await fresh.delete_cached("chain", "sb1", "eth0") is True
    log = calls()
    assert [(c["plugin"], c["cmd"]) for c in log] == [("p3", "DEL"), ("p2", "DEL"), ("p1", "DEL")]
    assert all(c["conf"]["prevResult"] == result for c in log)
    assert log[0]["netns"] == ""          # the recorded netns no longer exists: CNI_NETNS empty
    assert fresh.cache.load("chain", "sb1", "eth0") is None
    assert await fresh.delete_cached("chain", "sb1", "eth0") is False


async def test_add_failure_surfaces_plugin_error_and_rolls_back(scripted):
    client, faildir, calls = scripted
    (faildir / "p2.ADD").touch()
    with pytest.raises(cni.CNIError) as ei:
        await client.add(cni.parse_conflist(NET3), RT)
    e = ei.value
    assert (e.plugin, e.command, e.cni_code, e.msg, e.details) == ("p2", "ADD", 100, "p2 refuses", "by request")
    assert e.cleanup_errors == []
    log = calls()
    # only what ran is undone (p3 never ran), the failed plugin included, in reverse order
    assert [(c["plugin"], c["cmd"]) for c in log] == [("p1", "ADD"), ("p2", "ADD"), ("p2", "DEL"), ("p1", "DEL")]
    assert client.cache.load("chain", "sb1", "eth0") is None


async def test_add_failure_with_failing_rollback_gets_one_more_del(scripted):
    client, faildir, calls = scripted
    (faildir / "p2.ADD").touch()
    (faildir / "p2.DEL").touch()
    with pytest.raises(cni.CNIError, match="p2 refuses") as ei:
        await client.add(cni.parse_conflist(NET3), RT)
    assert ei.value.cleanup_errors == ["CNI plugin p2 DEL failed (code 100): p2 refuses; by request"]
    cached = client.cache.load("chain", "sb1", "eth0")
    assert cached.add_failed and cached.result is None
    calls()
    with pytest.raises(cni.CNIError, match="p2 refuses"):     # still failing, but the entry goes
        await client.delete_cached("chain", "sb1", "eth0")
    assert [c["plugin"] for c in calls()] == ["p3", "p2", "p1"]
    assert client.cache.load("chain", "sb1", "eth0") is None


async def test_missing_plugin_fails_before_running_anything(scripted):
    client, _, calls = scripted
    net = cni.parse_conflist({"cniVersion": "1.0.0", "name": "m", "plugins": [{"type": "p1"}, {"type": "nosuch"}]})
    with pytest.raises(cni.PluginNotFound) as ei:
        await client.add(net, RT)
    assert "'nosuch' not found in" in str(ei.value) and client.bin_dirs[1] in str(ei.value)
    assert calls() == []
    assert not client.cache.path("m", "sb1", "eth0").exists()


async def test_del_tries_every_plugin_and_keeps_cache_on_failure(scripted):
    client, faildir, calls = scripted
    net = cni.parse_conflist(NET3)
    await client.add(net, RT)
    calls()
    (faildir / "p3.DEL").touch()
    with pytest.raises(cni.CNIError, match="p3 refuses"):
        await client.delete(net, RT)
    assert [c["plugin"] for c in calls()] == ["p3", "p2", "p1"]
    assert client.cache.load("chain", "sb1", "eth0") is not None     # retry possible
    (faildir / "p3.DEL").unlink()
    await client.delete(net, RT)
    assert client.cache.load("chain", "sb1", "eth0") is None


async def test_check_needs_version_and_cache(scripted):
    client, _, calls = scripted
    with pytest.raises(cni.CNIError, match="no cached ADD result"):
        await client.check(cni.parse_conflist(NET3), RT)
    old = cni.parse_conflist(dict(NET3, cniVersion="0.3.1"))
    with pytest.raises(cni.CNIError, match="CHECK needs cniVersion >= 0.4.0"):
        await client.check(old, RT)
    await client.check(cni.parse_conflist(dict(NET3, disableCheck=True)), RT)   # no-op
    assert calls() == []


async def test_plugin_timeout_kills_it(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    slow = bindir / "slow"
    pids = tmp_path / "pids"
    slow.write_text(f"#!/bin/sh\necho $$ >> {pids}\nexec sleep 30\n")
    slow.chmod(0o755)
    client = cni.CNIClient(bin_dirs=[str(bindir)], cache_dir=tmp_path / "c", lock_path=None, exec_timeout=0.3)
    net = cni.parse_conflist({"cniVersion": "1.0.0", "name": "s", "plugins": [{"type": "slow"}]})
    with pytest.raises(cni.CNIError, match="did not finish within 0.3 s"):
        await client.add(net, RT)
    started = [int(p) for p in pids.read_text().split()]
    assert len(started) == 2                 # the ADD, then the rollback DEL
    for pid in started:                      # both killed and reaped
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_example_conflist_is_valid():
    path = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "cni", "10-spinbox.conflist")
    net = cni.parse_conflist(open(path, "rb").read(), path)
    assert net.name == "spinbox" and [p["type"] for p in net.plugins] == ["bridge", "portmap"]
    assert net.plugins[0]["ipam"]["type"] == "host-local"
