"""shim/templates.py: the host's template cache around shim/vm/template.py (no VM here)."""
from __future__ import annotations

import asyncio
import fcntl
import os
import time

import pytest

from spinbox.shim.templates import TemplateCache, TemplateUnusable


def _fake_template(root, name, age_s):
    d = root / name
    d.mkdir(parents=True)
    m = d / "manifest.json"
    m.write_text("{}")
    t = time.time() - age_s
    os.utime(m, (t, t))
    return d


def test_no_template_yet_means_build(tmp_path):
    assert TemplateCache._load(tmp_path / "k", "key") is None


def test_a_corrupt_template_is_refused_once_and_removed(tmp_path):
    d = tmp_path / "k"
    d.mkdir()
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(TemplateUnusable, match="corrupt manifest.*removed"):
        TemplateCache._load(d, "key")
    assert not d.exists()
    assert TemplateCache._load(d, "key") is None      # the next start builds afresh


def test_prune_keeps_the_most_recently_used(tmp_path):
    cache = TemplateCache(tmp_path, keep=2)
    old = _fake_template(tmp_path, "0000000000aa", 300)
    mid = _fake_template(tmp_path, "0000000000bb", 100)
    new = _fake_template(tmp_path, "0000000000cc", 0)
    other = _fake_template(tmp_path, "not-a-template", 900)     # someone else's dir: never touched
    cache._prune(keep=new)
    assert new.exists() and mid.exists() and not old.exists() and other.exists()
    assert cache.templates() == [mid, new]


def test_leftover_builds_are_removed(tmp_path):
    cache = TemplateCache(tmp_path)
    (tmp_path / ".b-abc-123456").mkdir()
    (tmp_path / ".vm-4242").mkdir()                     # a builder VM dir without vm.json
    keep = _fake_template(tmp_path, "0123456789ab", 0)
    cache._remove_dead_builds()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0123456789ab"] and keep.exists()


async def test_the_lock_is_host_wide_and_bounded(tmp_path):
    cache = TemplateCache(tmp_path, lock_timeout=0.2)
    fd = os.open(tmp_path / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)                      # another shim building
    try:
        with pytest.raises(TemplateUnusable, match="held"):
            await cache._locked()
    finally:
        os.close(fd)
    got = await asyncio.wait_for(cache._locked(), 2)
    cache._unlock(got)
