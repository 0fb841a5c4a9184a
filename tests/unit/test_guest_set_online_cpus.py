"""vminitd's SetOnlineCpus on a sysfs-shaped tree: the lowest-numbered CPUs stay, the rest go
offline highest first; more than present onlines what is there; a count past the bound is
refused."""
from __future__ import annotations

import pytest

from spinbox.vminitd import system
from spinbox.vminitd.errors import InvalidArgument


def tree(tmp_path, online: list[int], n: int = 4):
    root = tmp_path / "cpu"
    root.mkdir()
    (root / "present").write_text(f"0-{n - 1}\n")
    (root / "cpu0").mkdir()                       # no online file: always on
    for i in range(1, n):
        (root / f"cpu{i}").mkdir()
        (root / f"cpu{i}" / "online").write_text("1" if i in online else "0")

    def sync_online():                            # what the kernel keeps in cpu/online
        on = [0] + [i for i in range(1, n) if (root / f"cpu{i}" / "online").read_text() == "1"]
        (root / "online").write_text(",".join(map(str, on)))
    sync_online()
    return root, sync_online


def states(root, n=4):
    return [(root / f"cpu{i}" / "online").read_text() for i in range(1, n)]


def test_parks_the_highest_and_brings_them_back(tmp_path):
    root, sync = tree(tmp_path, online=[1, 2, 3])
    r = system.set_online_cpus(2, str(root))
    assert states(root) == ["1", "0", "0"] and r["onlined"] == 2 and r["present"] == 4
    sync()
    r = system.set_online_cpus(4, str(root))
    assert states(root) == ["1", "1", "1"] and r["onlined"] == 2
    sync()
    assert system.set_online_cpus(4, str(root))["online"] == 4


def test_more_than_present_onlines_all_present_for_the_shim_to_ask_again(tmp_path):
    root, _ = tree(tmp_path, online=[1])          # a hot-plugged CPU the kernel has not added yet
    assert system.set_online_cpus(5, str(root))["present"] == 4
    assert states(root) == ["1", "1", "1"]


@pytest.mark.parametrize("n", [0, 4097])
def test_a_count_outside_the_bound_is_refused(tmp_path, n):
    root, _ = tree(tmp_path, online=[1])
    with pytest.raises(InvalidArgument, match="1..4096"):
        system.set_online_cpus(n, str(root))
