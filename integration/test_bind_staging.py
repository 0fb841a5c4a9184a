"""shim/binds.py with real bind mounts: only the bind sources are visible in the staging dir
(never a file's siblings), "ro" binds are read-only on the host side, and release (or the
state releaser after a crash) leaves nothing mounted."""
from __future__ import annotations

import errno
import os

import pytest

from spinbox.shim import binds, mounts
from spinbox.shim.mounts import is_mountpoint
from spinbox.shim.spec import BindMount, plan_binds
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


# --- the guest is hostile: what the staged tree lets virtiofsd do is what the guest can do ---

def _with_tmpfs_submount(tmp_path):
    """A bind source with a tmpfs mounted below it (a volume with a submount)."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "top.txt").write_text("top\n")
    mounts.mount_syscall("tmpfs", str(src / "sub"), 0, fstype="tmpfs", data="size=1m")
    (src / "sub" / "inner.txt").write_text("inner\n")
    return src


def _mount_options(path) -> dict[str, set[str]]:
    """mount point -> its per-mount options, for every mount at or below `path`."""
    out = {}
    for line in open("/proc/self/mountinfo"):
        f = line.split()
        point = mounts.decode_mountinfo_path(f[4])
        if point == str(path) or point.startswith(str(path) + "/"):
            out[point] = set(f[5].split(","))
    return out


@pytest.fixture
def submount_src(tmp_path):
    src = _with_tmpfs_submount(tmp_path)
    yield src
    mounts.unmount_all(src / "sub")


def test_ro_rbind_is_read_only_below_its_submounts(tmp_path, submount_src):
    stage_dir = tmp_path / "stage"
    b = BindMount(0, str(submount_src), "/vol", readonly=True, is_dir=True, recursive=True)
    binds.stage([b], stage_dir)
    try:
        assert (stage_dir / "b0" / "sub" / "inner.txt").read_text() == "inner\n", "rbind carries the submount"
        for target in (stage_dir / "b0" / "new", stage_dir / "b0" / "sub" / "new"):
            with pytest.raises(OSError) as e:
                target.write_text("guest was here\n")
            assert e.value.errno == errno.EROFS, target
        assert not (submount_src / "sub" / "new").exists()
        opts = _mount_options(stage_dir)
        assert set(opts) == {str(stage_dir / "b0"), str(stage_dir / "b0" / "sub")}
        for point, o in opts.items():
            assert {"ro", "nosuid", "nodev"} <= o, (point, o)
    finally:
        binds.release(stage_dir)
    assert not stage_dir.exists()
    assert (submount_src / "sub" / "inner.txt").read_text() == "inner\n", "the source's submount is untouched"


def test_plain_bind_does_not_carry_the_submount(tmp_path, submount_src):
    stage_dir = tmp_path / "stage"
    b = BindMount(0, str(submount_src), "/vol", readonly=False, is_dir=True, recursive=False)
    binds.stage([b], stage_dir)
    try:
        assert (stage_dir / "b0" / "top.txt").read_text() == "top\n"
        assert os.listdir(stage_dir / "b0" / "sub") == [], "the tmpfs below the source is not staged"
        opts = _mount_options(stage_dir)
        assert list(opts) == [str(stage_dir / "b0")]
        assert {"rw", "nosuid", "nodev"} <= opts[str(stage_dir / "b0")]
    finally:
        binds.release(stage_dir)


def test_bind_kinds_from_the_spec(tmp_path):
    src = tmp_path / "d"
    src.mkdir()
    spec = {"mounts": [{"type": "bind", "source": str(src), "destination": "/a", "options": ["rbind", "ro"]},
                       {"type": "bind", "source": str(src), "destination": "/b", "options": ["bind"]},
                       {"type": "rbind", "source": str(src), "destination": "/c"}]}
    assert [(b.recursive, b.readonly) for b in plan_binds(spec)] == [(True, True), (False, False), (True, False)]


def test_a_symlink_swapped_in_after_the_check_is_not_followed(tmp_path, monkeypatch):
    """The source is checked, then (through a writable share, say) replaced by a symlink to
    another host path before the mount: the staged tree is still the checked directory."""
    vol, _ = _tree(tmp_path)
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "shadow").write_text("host secret\n")
    [b] = plan_binds({"mounts": [{"type": "bind", "source": str(vol), "destination": "/data",
                                  "options": ["rbind"]}]})
    real_bind = mounts.bind

    def swap_then_bind(source, target, **kw):
        os.rename(vol, tmp_path / "moved")
        os.symlink(secret, vol)
        real_bind(source, target, **kw)

    monkeypatch.setattr(mounts, "bind", swap_then_bind)
    stage_dir = tmp_path / "stage"
    binds.stage([b], stage_dir)
    try:
        assert sorted(os.listdir(stage_dir / "b0")) == ["data.txt"], "the checked tree, not the symlink's target"
    finally:
        binds.release(stage_dir)


def test_release_keeps_a_dir_that_is_still_mounted(tmp_path, monkeypatch):
    """An unmount that stopped early must not turn into a recursive delete of the source."""
    vol, _ = _tree(tmp_path)
    stage_dir = tmp_path / "stage"
    binds.stage([BindMount(1, str(vol), "/data", readonly=False, is_dir=True)], stage_dir)
    monkeypatch.setattr(mounts, "unmount_all", lambda path: 0)
    with pytest.raises(binds.BindError, match="still mounted"):
        binds.release(stage_dir)
    assert (vol / "data.txt").read_text() == "volume\n", "the source is untouched"
    assert is_mountpoint(stage_dir / "b0")
    monkeypatch.undo()
    binds.release(stage_dir)
    assert not stage_dir.exists()


async def test_read_only_rootfs_is_read_only_on_the_host(tmp_path):
    """root.readonly: the rootfs the guest's virtiofsd serves is read-only, submounts too."""
    from spinbox.shim import rootfs

    bundle = tmp_path / "bundle"
    _with_tmpfs_submount(bundle).rename(bundle / "rootfs")   # a rootfs already in the bundle
    root = bundle / "rootfs"
    r = await rootfs.mount_rootfs(bundle, [], readonly=True)
    try:
        for target in (root / "new", root / "sub" / "new"):
            with pytest.raises(OSError) as e:
                target.write_text("guest was here\n")
            assert e.value.errno == errno.EROFS, target
    finally:
        rootfs.release(r)
    (root / "sub" / "new").write_text("writable again\n")
    mounts.unmount_all(root / "sub")
    assert not mounts.mounts_under(root)


async def test_read_only_rootfs_gets_its_mount_points_made_inside_it(tmp_path):
    """runc cannot create mount points in a rootfs that is read-only on the host: they are made
    first, resolved inside the rootfs (an image's symlink cannot point the mkdir elsewhere)."""
    from spinbox.shim import rootfs

    bundle = tmp_path / "bundle"
    root = bundle / "rootfs"
    (root / "etc").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "var").symlink_to(outside)                 # absolute: means <rootfs><outside> in there
    (root / "up").symlink_to("../../outside")         # dangling inside the rootfs: left to runc
    (root / "lib").symlink_to("/usr/lib")              # an image's usual absolute link
    (root / "usr" / "lib").mkdir(parents=True)
    r = await rootfs.mount_rootfs(bundle, [], readonly=True, mount_points=[
        ("/run", True), ("/etc/hosts", False), ("/var/run/secrets", True), ("/up/x", True), ("/etc", True),
        ("/lib/modules", True)])
    try:
        assert (root / "run").is_dir() and (root / "etc" / "hosts").is_file()
        assert os.listdir(outside) == [], "nothing made outside the rootfs"
        assert not (root / "outside").exists()
        assert (root / "usr" / "lib" / "modules").is_dir(), "made where the link points inside the rootfs"
        with pytest.raises(OSError) as e:
            (root / "new").mkdir()
        assert e.value.errno == errno.EROFS
    finally:
        rootfs.release(r)
    with pytest.raises(rootfs.RootfsError, match="leaves the rootfs"):
        await rootfs.mount_rootfs(bundle, [], readonly=True, mount_points=[("../x", True)])
    assert not mounts.mounts_under(root)
