"""`import ttrpc` loads its submodules lazily, so a server-only user (vminitd, which boots under
TCG where every module costs guest time) never loads the client; the public names still work,
and the record types that replaced dataclasses behave as the dataclasses did."""
from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

import ttrpc
from ttrpc.frame import Frame, Oversized
from ttrpc.metadata import CallContext, Metadata
from ttrpc.server import PeerCredentials

INIT = Path(ttrpc.__file__)


def _ttrpc_modules_after(code: str) -> set[str]:
    """The ttrpc modules a fresh interpreter has loaded after running `code`."""
    probe = code + "\nimport sys, json\n" \
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'ttrpc')))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         cwd=INIT.parent.parent).stdout
    return set(json.loads(out.splitlines()[-1]))


def test_import_ttrpc_server_does_not_load_the_client():
    loaded = _ttrpc_modules_after("import ttrpc.server")
    assert "ttrpc.server" in loaded
    assert not {"ttrpc.client", "ttrpc.flow"} & loaded, loaded


def test_from_ttrpc_import_server_and_errors_does_not_load_the_client():
    loaded = _ttrpc_modules_after(
        "from ttrpc import Server, Code, TTRPCError\nServer(); TTRPCError(Code.NOT_FOUND, 'x')")
    assert {"ttrpc.server", "ttrpc.status"} <= loaded
    assert not {"ttrpc.client", "ttrpc.flow"} & loaded, loaded


def test_import_ttrpc_alone_loads_no_submodule():
    assert _ttrpc_modules_after("import ttrpc") == {"ttrpc"}


def test_client_names_still_load_the_client():
    loaded = _ttrpc_modules_after("import ttrpc\nttrpc.connect_unix")
    assert "ttrpc.client" in loaded


@pytest.mark.parametrize("name", ttrpc.__all__)
def test_every_public_name_is_its_submodules_object(name):
    value = getattr(ttrpc, name)
    assert value is getattr(importlib.import_module(f"ttrpc.{ttrpc._EXPORTS[name]}"), name)
    assert name in dir(ttrpc)


def test_type_checking_imports_all_and_lazy_table_agree():
    """The names exist three times in __init__.py (for type checkers, for `import *`, for
    __getattr__); a name added to one list only would be silently missing elsewhere."""
    tree = ast.parse(INIT.read_text())
    checked: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) \
                and node.test.id == "TYPE_CHECKING":
            for imp in node.body:
                assert isinstance(imp, ast.ImportFrom) and imp.level == 1
                checked.update({alias.name: imp.module for alias in imp.names})
    assert checked == ttrpc._EXPORTS
    assert sorted(ttrpc.__all__) == sorted(ttrpc._EXPORTS)
    assert len(set(ttrpc.__all__)) == len(ttrpc.__all__)


def test_submodules_and_unknown_names():
    assert ttrpc.status.ERROR_CLASSES[ttrpc.Code.NOT_FOUND] is ttrpc.NotFound
    from ttrpc import testing  # a submodule not in the lazy table still imports as one
    assert testing.SERVICE_NAME
    with pytest.raises(AttributeError, match="no attribute 'NoSuchThing'"):
        ttrpc.NoSuchThing  # noqa: B018
    with pytest.raises(ImportError):
        from ttrpc import NoSuchThing  # noqa: F401


def test_frame_records_are_immutable_values():
    f = Frame(1, 2, 0, b"x")
    assert f == Frame(1, 2, 0, b"x") and f != Frame(1, 2, 0, b"y")
    assert hash(f) == hash(Frame(1, 2, 0, b"x"))
    assert repr(f) == "Frame(stream_id=1, type=2, flags=0, data=b'x')"
    assert Oversized(3, 1, 0, 99).message(10) == "message length 99 exceed maximum message size of 10"
    with pytest.raises(AttributeError):
        f.data = b"y"  # type: ignore[misc]
    creds = PeerCredentials(10, 20, 30)
    assert (creds.pid, creds.uid, creds.gid) == (10, 20, 30)
    with pytest.raises(AttributeError):
        creds.uid = 0  # type: ignore[misc]


def test_call_context_defaults_equality_and_repr():
    a, b = CallContext("svc", "M", 1), CallContext("svc", "M", 1)
    assert a.metadata == Metadata() and a.metadata is not b.metadata  # a fresh one each
    assert a == b and a != CallContext("svc", "M", 3)
    a.metadata.add("k", "v")
    assert a != b
    assert a.full_method == "/svc/M" and a.time_remaining() is None
    assert repr(b) == ("CallContext(service='svc', method='M', stream_id=1, metadata=Metadata([]), "
                       "deadline=None, peer=None)")
    with pytest.raises(TypeError):
        hash(a)
