"""The private-containerd harness (integration/containerd.py, used by the suites and the bench)
leaves nothing of a run on the host: runc's per-namespace cgroup dirs included."""
from __future__ import annotations

import os
import uuid

import pytest

from integration.containerd import CGROUP_ROOT, Containerd, missing_prerequisites, namespace_cgroups
from integration.images import import_busybox


def test_runc_containers_leave_no_namespace_cgroups():
    why = missing_prerequisites()
    if why:
        if os.environ.get("SPINBOX_REQUIRE_INTEGRATION"):
            pytest.fail("; ".join(why))
        pytest.skip("; ".join(why))
    ns = f"spinbox-harness-{uuid.uuid4().hex[:6]}"
    with Containerd.create(namespace=ns, cri=False) as c:
        ref = import_busybox(c)
        c.ctr("run", "--rm", "--runtime", "io.containerd.runc.v2", "--fifo-dir", str(c.fifo_dir), ref, "h1", "true")
        made = namespace_cgroups(CGROUP_ROOT, ns)
        assert made, "runc made no cgroup for the namespace: this test would prove nothing"
    assert namespace_cgroups(CGROUP_ROOT, ns) == []
