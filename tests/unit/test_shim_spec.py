"""OCI spec adaptation for the guest (shim/spec.py)."""
from __future__ import annotations

import json

import pytest

from spinbox.shim.spec import SpecError, adapt_process, adapt_spec, load_spec, plan_binds


def base_spec(tmp_path, mounts=()):
    return {
        "ociVersion": "1.0.2",
        "process": {"args": ["sh"], "terminal": False, "cwd": "/"},
        "root": {"path": "rootfs"},
        "hooks": {"prestart": [{"path": "/usr/bin/host-hook"}]},
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}, *mounts],
        "linux": {"namespaces": [{"type": "pid"}, {"type": "network", "path": "/var/run/netns/cni-1"},
                                 {"type": "ipc"}, {"type": "mount"}]},
    }


def test_rootfs_netns_hooks(tmp_path):
    s = base_spec(tmp_path)
    out, notes = adapt_spec(s, rootfs="/run/guest/rootfs", terminal=True)
    assert out["root"]["path"] == "/run/guest/rootfs"
    assert out["process"]["terminal"] is True
    assert "hooks" not in out
    kinds = [ns["type"] for ns in out["linux"]["namespaces"]]
    assert "network" not in kinds and kinds == ["pid", "ipc", "mount"]
    assert {"type": "ipc"} in out["linux"]["namespaces"]
    assert any("/var/run/netns/cni-1" in n for n in notes)
    assert s["root"]["path"] == "rootfs" and "hooks" in s          # input untouched


def test_network_namespace_without_path_is_dropped_too(tmp_path):
    s = base_spec(tmp_path)
    s["linux"]["namespaces"][1] = {"type": "network"}
    out, _ = adapt_spec(s, rootfs="/r")
    assert all(ns["type"] != "network" for ns in out["linux"]["namespaces"])


def test_bind_of_a_missing_host_path_is_refused_by_name(tmp_path):
    s = base_spec(tmp_path, [{"destination": "/data", "type": "bind", "source": str(tmp_path / "nope"),
                              "options": ["rbind"]}])
    with pytest.raises(SpecError, match=r"nope.*/data.*does not exist"):
        plan_binds(s)
    with pytest.raises(SpecError, match="nope"):
        adapt_spec(s, rootfs="/r", shared={})


def test_relative_bind_source_is_refused(tmp_path):
    s = base_spec(tmp_path, [{"destination": "/data", "type": "none", "source": "rel/dir", "options": ["bind"]}])
    with pytest.raises(SpecError, match="absolute"):
        plan_binds(s)


def test_binds_are_planned_and_rewritten(tmp_path):
    d = tmp_path / "vol"
    d.mkdir()
    f = tmp_path / "sbx" / "hosts"
    f.parent.mkdir()
    f.write_text("127.0.0.1 localhost\n")
    s = base_spec(tmp_path, [
        {"destination": "/data", "type": "bind", "source": str(d), "options": ["rbind", "ro"]},
        {"destination": "/etc/hosts", "type": "bind", "source": str(f), "options": ["rbind", "rw"]},
    ])
    plan = plan_binds(s)
    assert [(b.index, b.source, b.readonly, b.is_dir) for b in plan] == [(1, str(d), True, True),
                                                                        (2, str(f), False, False)]
    shared = {1: "/run/spinbox/shares/c1/binds/b0", 2: "/run/spinbox/shares/c1/binds/b1/hosts"}
    out, notes = adapt_spec(s, rootfs="/r", shared=shared)
    assert out["mounts"][1]["source"] == "/run/spinbox/shares/c1/binds/b0"
    assert out["mounts"][2]["source"] == "/run/spinbox/shares/c1/binds/b1/hosts"
    assert out["mounts"][2]["options"] == ["rbind", "rw"]
    assert out["mounts"][0] == {"destination": "/proc", "type": "proc", "source": "proc"}
    # a share the sandbox could not make is an error naming the mount, never silently dropped
    with pytest.raises(SpecError, match=r"/etc/hosts.*cannot be shared"):
        adapt_spec(s, rootfs="/r", shared={1: "/g"})


def test_local_agent_keeps_host_paths(tmp_path):
    d = tmp_path / "vol"
    d.mkdir()
    s = base_spec(tmp_path, [{"destination": "/data", "type": "bind", "source": str(d) + "/", "options": ["rbind"]}])
    out, _ = adapt_spec(s, rootfs=str(tmp_path / "rootfs"), shared=None)
    assert out["mounts"][1]["source"] == str(d)


def test_spec_without_args_and_bad_json(tmp_path):
    with pytest.raises(SpecError, match="process.args"):
        adapt_spec({"process": {}}, rootfs="/r")
    p = tmp_path / "config.json"
    p.write_text("{nope")
    with pytest.raises(SpecError, match="not valid JSON"):
        load_spec(p)
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "missing.json")
    p.write_text(json.dumps(base_spec(tmp_path)))
    assert load_spec(p)["process"]["args"] == ["sh"]


def test_exec_process():
    p = adapt_process({"args": ["ls"], "terminal": False}, terminal=True)
    assert p == {"args": ["ls"], "terminal": True}
    with pytest.raises(SpecError):
        adapt_process({"args": []}, terminal=False)
