"""The state dir chain must be root's alone (shim/state.py check_dir_chain): a state file
decides what `delete` unmounts, kills and removes."""
from __future__ import annotations

import os

import pytest

from spinbox.shim.state import GroupLock, GroupPaths, State, StateError


def _paths(tmp_path):
    return GroupPaths(tmp_path / "run" / "spinbox", "ns1", "grp1")


def test_a_private_chain_is_accepted(tmp_path):
    paths = _paths(tmp_path)
    State.open(paths).record("socket", "/x", path="/x")
    with GroupLock(paths):
        assert State.load(paths) is not None
    assert os.stat(paths.dir).st_mode & 0o777 == 0o700


@pytest.mark.parametrize("which", ["parent", "state_dir", "namespace", "group"])
def test_a_group_or_world_writable_dir_is_refused(tmp_path, which):
    paths = _paths(tmp_path)
    State.open(paths)
    d = {"parent": paths.state_dir.parent, "state_dir": paths.state_dir,
         "namespace": paths.dir.parent, "group": paths.dir}[which]
    os.chmod(d, 0o777 if which != "group" else 0o720)
    for attempt in (lambda: State.open(paths), lambda: State.load(paths), lambda: GroupLock(paths).acquire(),
                    lambda: State(paths).save()):
        with pytest.raises(StateError, match=rf"{d} is writable by group or others \(mode 0{7 if which != 'group' else 7}"):
            attempt()


def test_a_dir_owned_by_another_user_is_refused(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("chown needs root")
    paths = _paths(tmp_path)
    paths.state_dir.mkdir(parents=True)
    os.chown(paths.state_dir.parent, 1234, 1234)
    with pytest.raises(StateError, match=rf"{paths.state_dir.parent} is owned by uid 1234, not root"):
        State.open(paths)
    assert not paths.dir.exists(), "nothing made below it"


def test_a_sticky_root_dir_above_the_state_dir_is_accepted_but_not_as_the_state_dir(tmp_path):
    paths = _paths(tmp_path)
    paths.state_dir.mkdir(parents=True)
    os.chmod(paths.state_dir.parent, 0o1777)          # like /tmp
    State.open(paths)
    os.chmod(paths.state_dir, 0o1777)
    with pytest.raises(StateError, match="writable by group or others"):
        State.open(paths)


def test_a_symlinked_state_dir_is_checked_where_it_points(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o777)
    os.chmod(target, 0o777)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "spinbox").symlink_to(target)
    with pytest.raises(StateError, match=f"{target} is writable"):
        State.open(_paths(tmp_path))
