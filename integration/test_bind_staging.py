"""shim/binds.py with real bind mounts: only the bind sources are visible in the staging dir
(never a file's siblings), "ro" binds are read-only on the host side, and release (or the
state releaser after a crash) leaves nothing mounted."""
from __future__ import annotations

import os

import pytest

from spinbox.shim import binds
from spinbox.shim.mounts import is_mountpoint
from spinbox.shim.spec import BindMount
from spinbox.shim.state import release as release_record

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _root():
    if os.geteuid() != 0:
        msg = "bind staging needs root (mount(2))"
        if os.environ.get("SPINBOX_REQUIRE_INTEGRATION"):
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)


def _tree(tmp_path):
    vol = tmp_path / "vol"
    vol.mkdir()
    (vol / "data.txt").write_text("volume\n")
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "hosts").write_text("10.0.0.1 web\n")
    (etc / "secret").write_text("do not share\n")
    return vol, etc


def test_stage_exposes_only_the_sources_and_enforces_ro(tmp_path):
    vol, etc = _tree(tmp_path)
    stage_dir = tmp_path / "stage"
    plan = [BindMount(3, str(vol), "/data", readonly=False, is_dir=True),
            BindMount(5, str(etc / "hosts"), "/etc/hosts", readonly=True, is_dir=False)]
    staged = binds.stage(plan, stage_dir)
    try:
        assert staged.paths == {3: "b0", 5: "b1/hosts"}
        assert (stage_dir / "b0" / "data.txt").read_text() == "volume\n"
        assert (stage_dir / "b1" / "hosts").read_text() == "10.0.0.1 web\n"
        assert sorted(os.listdir(stage_dir / "b1")) == ["hosts"], "a file's siblings stay hidden"
        (stage_dir / "b0" / "new").write_text("rw bind writes through\n")
        assert (vol / "new").read_text() == "rw bind writes through\n"
        with pytest.raises(OSError) as e:
            (stage_dir / "b1" / "hosts").write_text("guest was here\n")
        assert e.value.errno == 30          # EROFS: read-only on the host side too
        assert (etc / "hosts").read_text() == "10.0.0.1 web\n"
    finally:
        binds.release(stage_dir)
    assert not stage_dir.exists()
    assert not is_mountpoint(stage_dir / "b0")
    assert (etc / "hosts").read_text() == "10.0.0.1 web\n" and (vol / "data.txt").exists()


def test_a_failed_stage_leaves_nothing(tmp_path):
    vol, _ = _tree(tmp_path)
    stage_dir = tmp_path / "stage"
    plan = [BindMount(1, str(vol), "/data", readonly=True, is_dir=True),
            BindMount(2, str(tmp_path / "gone"), "/gone", readonly=False, is_dir=True)]
    with pytest.raises(binds.BindError, match="gone"):
        binds.stage(plan, stage_dir)
    assert not stage_dir.exists()


async def test_state_dir_releaser_unmounts_after_a_crash(tmp_path):
    vol, _ = _tree(tmp_path)
    stage_dir = tmp_path / "stage"
    binds.stage([BindMount(1, str(vol), "/data", readonly=False, is_dir=True)], stage_dir)
    assert is_mountpoint(stage_dir / "b0")
    # what `delete` does from state.json after a crashed shim
    await release_record({"kind": "dir", "key": str(stage_dir), "path": str(stage_dir)})
    assert not stage_dir.exists()
    assert (vol / "data.txt").read_text() == "volume\n", "the source is untouched"
