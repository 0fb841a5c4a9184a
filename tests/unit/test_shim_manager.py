"""Shim manager logic: argv as containerd passes it, group selection, socket naming, stdin
classification (BootstrapParams vs options Any vs empty), outputs."""
from __future__ import annotations

import json
import os

import pytest
from google.protobuf import any_pb2

from spinbox.api._pb.containerd.runtime.bootstrap.v1 import bootstrap_pb2
from spinbox.api._pb.containerd.task.v2 import shim_pb2
from spinbox.api._pb.containerd.types import introspection_pb2
from spinbox.api._pb.runtimeoptions.v1 import api_pb2
from spinbox.api import contract
from spinbox.shim import manager as m


def test_start_argv_of_containerd_16_verbatim():
    # docs/host-facts.md §4: the argv containerd 1.6.20 passed, verbatim
    a = m.parse_args(["-namespace", "test", "-address", "/w/containerd.sock", "-publish-binary",
                      "/usr/bin/containerd", "-id", "p1", "-debug", "start"])
    assert (a.namespace, a.address, a.publish_binary, a.id, a.debug, a.action) == \
        ("test", "/w/containerd.sock", "/usr/bin/containerd", "p1", True, "start")


def test_delete_argv_and_go_flag_syntax():
    a = m.parse_args(["--namespace=k8s.io", "-address", "/a.sock", "-publish-binary", "/c",
                      "-id", "x", "-bundle", "/run/b/x", "-debug=false", "delete"])
    assert (a.namespace, a.bundle, a.debug, a.action) == ("k8s.io", "/run/b/x", False, "delete")
    assert m.parse_args(["-v"]).version and m.parse_args(["-version"]).version
    assert m.parse_args(["-info"]).info and m.parse_args(["-info"]).action == ""


@pytest.mark.parametrize("argv, message", [
    (["-bogus", "start"], "flag provided but not defined: -bogus"),
    (["-id"], "flag needs an argument: -id"),
    (["-debug=maybe", "start"], "invalid boolean value"),
])
def test_bad_argv(argv, message):
    with pytest.raises(m.ShimError, match=message):
        m.parse_args(argv)


def test_identifiers_are_checked():
    with pytest.raises(m.ShimError, match="-namespace is required"):
        m.check_identifiers(m.ShimArgs(id="x"))
    with pytest.raises(m.ShimError, match="invalid -id"):
        m.check_identifiers(m.ShimArgs(namespace="n", id="../etc"))


def test_group_selection(tmp_path):
    assert m.group_id("t1", {}) == "t1"
    assert m.group_id("c1", {"io.kubernetes.cri.sandbox-id": "sb1"}) == "sb1"
    assert m.group_id("c1", {"io.containerd.spinbox.v1.group": "g1"}) == "g1"
    assert m.group_id("c1", {"spinbox.io/sandbox": "g2"}) == "g2"
    with pytest.raises(m.ShimError, match="not a valid sandbox id"):
        m.group_id("c1", {"io.kubernetes.cri.sandbox-id": "../../x"})
    (tmp_path / "config.json").write_text(json.dumps({"annotations": {
        "io.kubernetes.cri.sandbox-id": "pod1", "n": 3}}))
    assert m.read_annotations(tmp_path) == {"io.kubernetes.cri.sandbox-id": "pod1"}
    assert m.read_annotations(tmp_path / "nothing") == {}


@pytest.mark.parametrize("key", ["io.containerd.spinbox.v1.group", "spinbox.io/sandbox"])
def test_under_cri_the_sandbox_id_decides_the_group(key):
    """A pod's annotations pass through to the spec: its group annotation must not put its
    containers into another pod's VM."""
    cri = {"io.kubernetes.cri.sandbox-id": "sb1", "io.kubernetes.cri.container-type": "container"}
    with pytest.raises(m.ShimError, match=rf"annotation {key}='other-pod' names another sandbox .*'sb1'"):
        m.group_id("c1", {**cri, key: "other-pod"})
    assert m.group_id("c1", {**cri, key: "sb1"}) == "sb1", "the same group is fine"
    # the pod's sandbox container itself (its id is the sandbox id)
    with pytest.raises(m.ShimError, match="names another sandbox"):
        m.group_id("sb1", {"io.kubernetes.cri.container-type": "sandbox", key: "other-pod"})


def test_a_refused_group_fails_start_before_anything_is_made(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"annotations": {
        "io.kubernetes.cri.sandbox-id": "sb1", "spinbox.io/sandbox": "victim"}}))
    args = m.ShimArgs(namespace="k8s.io", id="c1", bundle=str(tmp_path), address="/x")
    with pytest.raises(m.ShimError, match="names another sandbox"):
        m.start(args, b"", env={"SPINBOX_CONFIG": str(tmp_path / "none.json")})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_socket_address():
    a = m.socket_address("/run/containerd/containerd.sock", "k8s.io", "x" * 76)
    assert a.startswith("unix:///run/containerd/s/")
    path = a[len("unix://"):]
    assert len(path.encode()) <= 106
    # deterministic per (containerd, namespace, group), different otherwise
    assert a == m.socket_address("/run/containerd/containerd.sock", "k8s.io", "x" * 76)
    assert a != m.socket_address("/tmp/other.sock", "k8s.io", "x" * 76)
    assert a != m.socket_address("/run/containerd/containerd.sock", "default", "x" * 76)
    with pytest.raises(m.ShimError, match="socket path too long"):
        m.socket_address("/a", "n", "g", socket_dir="/" + "d" * 60)


def _options_any(path="/etc/spinbox/x.toml") -> any_pb2.Any:
    return any_pb2.Any(type_url="runtimeoptions.v1.Options",
                       value=api_pb2.Options(config_path=path).SerializeToString())


def test_stdin_empty():
    assert m.classify_stdin(b"", "t1", "ns").kind == "empty"


def test_stdin_legacy_options_any():
    raw = _options_any().SerializeToString()
    inp = m.classify_stdin(raw, "t1", "ns")
    assert inp.kind == "options" and inp.options.type_url == "runtimeoptions.v1.Options"


def test_stdin_options_any_that_parses_as_bootstrap_params_is_not_bootstrap():
    # type_url lands in BootstrapParams.instance_id; value (valid UTF-8 here) in namespace
    a = any_pb2.Any(type_url="t1", value=b"ns")
    raw = a.SerializeToString()
    parsed = bootstrap_pb2.BootstrapParams()
    parsed.ParseFromString(raw)
    assert parsed.instance_id == "t1"             # the accidental parse really happens...
    inp = m.classify_stdin(raw, "other-task", "ns")
    assert inp.kind == "options"                  # ...but the ids do not match: options


def test_stdin_bootstrap_params():
    p = bootstrap_pb2.BootstrapParams(instance_id="t1", namespace="ns", containerd_version="2.3.0",
                                      containerd_ttrpc_address="unix:///run/c.sock.ttrpc",
                                      extensions=[bootstrap_pb2.Extension(value=_options_any())])
    raw = p.SerializeToString() + b"\x4a\x08/run/s9x"   # field 9 socket_dir, as the wire has it
    assert m.classify_stdin(p.SerializeToString(), "t1", "ns").socket_dir is None   # unset
    inp = m.classify_stdin(raw, "t1", "ns")
    assert inp.kind == "bootstrap"
    assert inp.options.type_url == "runtimeoptions.v1.Options"
    assert inp.socket_dir == "/run/s9x"
    assert inp.params.containerd_ttrpc_address == "unix:///run/c.sock.ttrpc"


def test_stdin_garbage_is_an_error():
    with pytest.raises(m.ShimError, match="neither BootstrapParams"):
        m.classify_stdin(b"\xff\xff\xff", "t1", "ns")


def test_outputs():
    r = bootstrap_pb2.BootstrapResult()
    r.ParseFromString(m.bootstrap_result("unix:///run/containerd/s/ab"))
    assert (r.version, r.address, r.protocol) == (2, "unix:///run/containerd/s/ab", "ttrpc")
    d = shim_pb2.DeleteResponse()
    d.ParseFromString(m.delete_response(m.DeleteOutcome(pid=7, exit_status=137)))
    assert (d.pid, d.exit_status) == (7, 137) and d.exited_at.seconds > 0
    info = introspection_pb2.RuntimeInfo()
    info.ParseFromString(m.runtime_info(_options_any().SerializeToString()))
    assert info.name == "io.containerd.spinbox.v1" and info.version.version == contract.version()
    assert info.options.type_url == "runtimeoptions.v1.Options"
    assert "Version:  " + contract.version() in m.version_text()


# ---------------------------------------------------------------------------------------------
# bootstrap without the deprecated flags (containerd 2.3 marks -namespace/-id/-address/
# -publish-binary deprecated; BootstrapParams carry the same)

def _params(**kw) -> bootstrap_pb2.BootstrapParams:
    base = dict(instance_id="t1", namespace="ns", containerd_version="2.3.0",
                containerd_grpc_address="/run/c.sock", containerd_ttrpc_address="/run/c.sock.ttrpc",
                containerd_binary="/usr/bin/containerd")
    return bootstrap_pb2.BootstrapParams(**{**base, **kw})


def test_bootstrap_params_without_flags_give_the_identity():
    args = m.parse_args(["start"])
    env: dict[str, str] = {}
    inp = m.classify_stdin(_params(log_level=bootstrap_pb2.LOG_LEVEL_DEBUG).SerializeToString(),
                           args.id, args.namespace)
    assert inp.kind == "bootstrap"
    m.resolve_start(args, inp, env)
    m.check_identifiers(args)
    assert (args.id, args.namespace, args.address, args.publish_binary, args.log_level) == \
        ("t1", "ns", "/run/c.sock", "/usr/bin/containerd", "debug")
    assert env["TTRPC_ADDRESS"] == "/run/c.sock.ttrpc"


def test_bootstrap_params_win_over_flags_and_env_for_addresses():
    args = m.parse_args(["-namespace", "ns", "-id", "t1", "-address", "/old.sock",
                         "-publish-binary", "/old/containerd", "start"])
    env = {"TTRPC_ADDRESS": "/old.sock.ttrpc", "GRPC_ADDRESS": "/old.sock"}
    m.resolve_start(args, m.classify_stdin(_params().SerializeToString(), args.id, args.namespace), env)
    assert (args.address, args.publish_binary, env["TTRPC_ADDRESS"]) == \
        ("/run/c.sock", "/usr/bin/containerd", "/run/c.sock.ttrpc")


def test_flags_and_env_fill_what_the_params_leave_empty():
    args = m.parse_args(["-address", "/flag.sock", "-publish-binary", "/flag/containerd", "start"])
    env = {"TTRPC_ADDRESS": "/env.sock.ttrpc"}
    p = bootstrap_pb2.BootstrapParams(instance_id="t1", namespace="ns")
    m.resolve_start(args, m.classify_stdin(p.SerializeToString(), args.id, args.namespace), env)
    assert (args.id, args.address, args.publish_binary, env["TTRPC_ADDRESS"]) == \
        ("t1", "/flag.sock", "/flag/containerd", "/env.sock.ttrpc")
    # no params at all: containerd's env (1.7+) fills what the flags lack
    legacy = m.parse_args(["-id", "t2", "start"])
    m.resolve_start(legacy, m.classify_stdin(b""), {"NAMESPACE": "k8s.io", "GRPC_ADDRESS": "/g.sock"})
    assert (legacy.namespace, legacy.address, legacy.log_level) == ("k8s.io", "/g.sock", "")


@pytest.mark.parametrize("flags, message", [
    (["-id", "other"], "-id 'other' but BootstrapParams.instance_id 't1'"),
    (["-namespace", "k8s.io"], "-namespace 'k8s.io' but BootstrapParams.namespace 'ns'"),
])
def test_flags_that_disagree_with_real_bootstrap_params_are_an_error(flags, message):
    args = m.parse_args([*flags, "start"])
    with pytest.raises(m.ShimError, match="name different tasks: " + message):
        m.classify_stdin(_params().SerializeToString(), args.id, args.namespace)


def test_bootstrap_params_without_an_id_and_no_flags_fail_start_by_name(tmp_path):
    p = bootstrap_pb2.BootstrapParams(namespace="ns", containerd_version="2.3.0")
    with pytest.raises(m.ShimError, match="BootstrapParams.instance_id is empty and no -id was given"):
        m.start(m.parse_args(["start"]), p.SerializeToString(),
                env={"SPINBOX_CONFIG": str(tmp_path / "none.json")})


@pytest.mark.parametrize("value, name", [(-8, "trace"), (-4, "debug"), (-5, "trace"), (0, "info"),
                                         (3, "info"), (4, "warn"), (8, "error"), (10, "fatal"),
                                         (12, "panic"), (99, "panic"), (-99, "trace")])
def test_log_level_names_of_the_open_enum(value, name):
    assert m.log_level_name(value) == name


def test_log_level_reaches_the_daemon():
    import logging

    def level(argv, params):
        args = m.parse_args([*argv, "start"])
        inp = m.classify_stdin(params.SerializeToString(), args.id, args.namespace)
        m.resolve_start(args, inp, {})
        return args.log_level, m.daemon_log_level(args)

    assert level([], _params(log_level=bootstrap_pb2.LOG_LEVEL_TRACE)) == ("trace", logging.DEBUG)
    assert level([], _params(log_level=bootstrap_pb2.LOG_LEVEL_WARN)) == ("warn", logging.WARNING)
    assert level([], _params()) == ("info", logging.INFO)
    # INFO (0) is also "unset": containerd's -debug still counts
    assert level(["-debug"], _params()) == ("", logging.DEBUG)
    # the daemon's hidden flag, as start passes it
    assert m.daemon_log_level(m.parse_args(["-log-level", "error", "serve"])) == logging.ERROR
    with pytest.raises(m.ShimError, match="invalid -log-level 'loud'"):
        m.daemon_log_level(m.parse_args(["-log-level", "loud", "serve"]))


def test_the_daemon_argv_carries_the_resolved_identity(tmp_path):
    """The daemon never needs containerd's flags: start passes what it resolved, and the
    daemon's own parser reads it back."""
    args = m.parse_args(["start"])
    m.resolve_start(args, m.classify_stdin(_params(log_level=-4).SerializeToString()), {})
    argv = m.daemon_argv(args, "g1", "unix:///x", tmp_path)
    back = m.parse_args(argv[argv.index("-namespace"):])
    assert (back.namespace, back.id, back.address, back.publish_binary, back.log_level, back.group,
            back.socket, back.bundle, back.action) == \
        ("ns", "t1", "/run/c.sock", "/usr/bin/containerd", "debug", "g1", "unix:///x", str(tmp_path), "serve")


def test_delete_takes_the_namespace_from_containerds_env(tmp_path):
    import tempfile

    cfg = tmp_path / "config.json"
    short = tempfile.mkdtemp(prefix="sbx-", dir="/tmp")     # the state dir holds sockets: short
    cfg.write_text(json.dumps({"paths": {"state_dir": short}}))
    args = m.parse_args(["-id", "gone1", "-bundle", str(tmp_path), "delete"])
    out = m.delete(args, env={"NAMESPACE": "ns", "SPINBOX_CONFIG": str(cfg)})
    assert args.namespace == "ns" and out.warnings == []
    os.rmdir(short)
