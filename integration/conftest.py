"""Fixtures for tests against real containerd (and, later, QEMU / runc / CNI).

Integration tests skip only when a prerequisite is missing (not root, containerd not installed),
with the reason shown in the report header and on the skip. Set SPINBOX_REQUIRE_INTEGRATION=1
(CI does: it is root with the packages) to turn such a skip into a failure, so a broken CI image
cannot pass by skipping everything.
"""
from __future__ import annotations

import os

import pytest

from integration.containerd import BIN_DIR, BIN_DIR_ENV, Containerd, ContainerdError, containerd_version, \
    missing_prerequisites


def skip_or_fail(reasons: list[str]) -> None:
    msg = "integration prerequisites missing: " + "; ".join(reasons)
    if os.environ.get("SPINBOX_REQUIRE_INTEGRATION"):
        pytest.fail(msg + " (SPINBOX_REQUIRE_INTEGRATION is set)", pytrace=False)
    pytest.skip(msg)


def pytest_report_header(config):
    why = missing_prerequisites()
    if why:
        return "containerd integration: WILL SKIP: " + "; ".join(why)
    # the version under test: the matrix (docs/testing.md) runs the suites once per release
    where = f"{BIN_DIR_ENV}={BIN_DIR}" if BIN_DIR else "PATH"
    try:
        version = containerd_version()
    except ContainerdError as e:
        version = f"of unknown version ({e})"
    return f"containerd integration: ready (root, containerd {version} from {where})"


@pytest.fixture(scope="session")
def containerd():
    """A private containerd shared by the session: .address, .ttrpc_address, .ctr(...),
    .ctr_popen(...), .stop(), .restart(), .namespace, .fifo_dir. Torn down with everything it made."""
    why = missing_prerequisites()
    if why:
        skip_or_fail(why)
    c = Containerd.create()
    try:
        yield c
    finally:
        c.cleanup()


@pytest.fixture
def containerd_running(containerd):
    """The session containerd, restarted if an earlier test left it stopped."""
    if not containerd.running:
        containerd.start()
    return containerd
