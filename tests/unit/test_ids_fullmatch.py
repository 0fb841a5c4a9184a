"""Every id rule is checked with fullmatch: `re.match` + `$` would let "id\\n" through, and an id
becomes a directory name, a runc id, a netns name, a socket hash input."""
from __future__ import annotations

import pytest

from spinbox.api import contract
from spinbox.shim import manager
from spinbox.shim.network import netns
from spinbox.shim.task_service import check_id
from spinbox.shim.vm.paths import check_tag
from spinbox.vminitd.ids import validate_id

BAD = ["abc\n", "abc\r\n", "\nabc", "a\nb"]


@pytest.mark.parametrize("value", BAD)
def test_a_newline_is_never_part_of_an_id(value):
    assert contract.id_problem(value) is not None
    assert not contract.is_valid_id(value)
    with pytest.raises(Exception, match="invalid"):
        check_id(value)
    with pytest.raises(Exception, match="invalid"):
        validate_id(value)
    with pytest.raises(manager.ShimError):
        manager.check_identifiers(manager.ShimArgs(namespace="default", id=value))
    with pytest.raises(manager.ShimError):
        manager.group_id("t1", {"io.containerd.spinbox.v1.group": value})
    with pytest.raises(netns.NetnsError):
        netns.path_of(value)
    with pytest.raises(ValueError):
        check_tag(value)


def test_the_contract_pattern_is_anchored_by_fullmatch():
    assert contract.is_valid_id("abc-1.2_3")
    assert contract.id_problem("abc\n") == f"must match {contract.ID_PATTERN}"
