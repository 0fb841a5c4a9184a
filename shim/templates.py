"""The host's VM template cache: start a sandbox's VM by restoring a saved one, or say why not.

    <template_dir>/
        .lock                      flock: one builder at a time, host-wide
        <key>/                     one template per VM shape (shim.vm.template: ram, state, manifest)
        .b-<key>-<random>          a build in progress (or the leftover of a builder that died)
        .vm-<pid>                  the builder VM's own dir (sockets, vm.json), kept short

`start_guest` is what a sandbox boot calls when `runtime.start = template`: it restores the
template for this VM's shape, building it first under the lock when there is none (two shims
starting at once build it once), and returns None, after one log line saying why, whenever a
template cannot be used — the caller then boots cold. It never leaves a broken sandbox: a
template that fails to restore is removed, so the next start builds a fresh one.

Stale templates: after a build, only the KEEP most recently used shapes are kept; builds left by
a dead builder (its QEMU recorded in their vm.json) are killed and removed under the lock.
"""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import re
import time
from pathlib import Path

from .errors import HostError
from .state import State
from .guest import Guest, restore_guest
from .vm import accel as accel_mod
from .vm.config import VMConfig
from .vm.machine import kill_from_state
from .vm.qemu_args import Resolved
from .vm.template import (BUILDING_PREFIX, MANIFEST, Template, build_template, qemu_identity, remove_template,
                          template_key, template_problem)

log = logging.getLogger(__name__)

KEEP = 4                    # VM shapes kept (runtime options may ask for several)
LOCK_TIMEOUT_S = 120.0      # waiting for another shim's build (a build takes a few seconds)
LOCK_FILE = ".lock"
KEY_CHARS = 12              # a template dir's name: the first characters of its key
_KEY_NAME = re.compile(f"[0-9a-f]{{{KEY_CHARS}}}")
BUILDER_VM_PREFIX = ".vm-"  # the builder VM's state dir (vm.json: what to kill if it was left)


class TemplateUnusable(HostError):
    """This VM cannot start from a template (the reason is the message)."""


class TemplateCache:
    def __init__(self, root: str | os.PathLike[str], *, keep: int = KEEP,
                 lock_timeout: float = LOCK_TIMEOUT_S, state: State | None = None, owner: str = "") -> None:
        self.root = Path(root)
        self.keep = keep
        self.lock_timeout = lock_timeout
        self.state = state        # the building shim's records: `delete` kills a builder it left
        self.owner = owner

    # --- keys ------------------------------------------------------------------------------

    def key(self, config: VMConfig, image_hash: str) -> str:
        resolved = Resolved(accel_mod.select_accel(config.accel).value,
                            accel_mod.select_transport(config.transport).value)
        if resolved.transport != "virtio-serial":
            raise TemplateUnusable("templates need the virtio-serial transport (a vsock CID is per VM)")
        return template_key(config, resolved, qemu_identity(config.qemu_binary), image_hash)

    def dir_for(self, key: str) -> Path:
        return self.root / key[:KEY_CHARS]     # short: builder VM sockets live below it

    # --- the lock --------------------------------------------------------------------------

    async def _locked(self) -> int:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + self.lock_timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise TemplateUnusable(f"another shim held {self.root / LOCK_FILE} for "
                                           f"{self.lock_timeout:.0f} s") from None
                await asyncio.sleep(0.05)

    @staticmethod
    def _unlock(fd: int) -> None:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    # --- get, build, prune -----------------------------------------------------------------

    async def get(self, config: VMConfig, image_hash: str) -> Template:
        """The template for this shape: loaded, or built now (under the lock)."""
        key = self.key(config, image_hash)
        d = self.dir_for(key)
        t = self._load(d, key)
        if t is not None:
            return self._used(t)
        fd = await self._locked()
        try:
            t = self._load(d, key)               # built by another shim while we waited
            if t is not None:
                return self._used(t)
            self._remove_dead_builds()
            return await self._build(config, d, key)
        finally:
            self._unlock(fd)

    async def _build(self, config: VMConfig, d: Path, key: str) -> Template:
        # the builder VM's dir is short and apart: its unix sockets must fit in 107 bytes
        vm_dir = self.root / f"{BUILDER_VM_PREFIX}{os.getpid()}"
        if self.state is not None:     # recorded first: a crash mid-build leaves a QEMU to kill
            self.state.record("vm", str(vm_dir), owner=self.owner, path=str(vm_dir))
        try:
            t = await build_template(config, d, key=key, name="spinbox-template", vm_dir=vm_dir)
        finally:
            with contextlib.suppress(OSError):
                vm_dir.rmdir()
            if self.state is not None and not vm_dir.exists():
                with contextlib.suppress(Exception):
                    self.state.forget("vm", str(vm_dir))
        self._prune(keep=t.dir)
        return t

    async def build(self, config: VMConfig, image_hash: str) -> Template:
        """Build (or rebuild) the template for this shape now: `spinbox template build`."""
        key = self.key(config, image_hash)
        fd = await self._locked()
        try:
            self._remove_dead_builds()
            return await self._build(config, self.dir_for(key), key)
        finally:
            self._unlock(fd)

    @staticmethod
    def _load(d: Path, key: str) -> Template | None:
        """The template in `d`; None when there is none yet (build it). One that exists but
        cannot be used (corrupt, another shape) is removed and this start boots cold: the
        next one builds afresh."""
        if not (d / MANIFEST).exists():
            return None
        t, why = template_problem(d, key)
        if t is None:
            remove_template(d)
            raise TemplateUnusable(f"{why}; removed")
        return t

    @staticmethod
    def _used(t: Template) -> Template:
        with contextlib.suppress(OSError):
            os.utime(t.dir / MANIFEST)           # most recently used: kept by _prune
        return t

    def templates(self) -> list[Path]:
        """The template dirs here (named by their key): nothing else in the root is touched."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and _KEY_NAME.fullmatch(p.name))

    def _prune(self, keep: Path) -> None:
        def used(p: Path) -> float:
            try:
                return (p / MANIFEST).stat().st_mtime
            except OSError:
                return 0.0
        others = sorted((p for p in self.templates() if p != keep), key=used, reverse=True)
        for p in others[max(0, self.keep - 1):]:
            log.info("vm template %s removed (least recently used of more than %d)", p, self.keep)
            remove_template(p)

    def _remove_dead_builds(self) -> None:
        """Builds left by a builder that died (we hold the lock: nobody is building): kill its
        QEMU from the build's vm.json, remove the files."""
        for p in self.root.iterdir():
            if p.is_dir() and p.name.startswith(BUILDER_VM_PREFIX):
                with contextlib.suppress(Exception):
                    kill_from_state(p, timeout=2.0)      # its QEMU, if still running
                remove_template(p)
                log.info("vm template: removed the leftover builder VM %s", p)
        for p in self.root.iterdir():
            if p.is_dir() and p.name.startswith(BUILDING_PREFIX):
                remove_template(p)
                log.info("vm template: removed the leftover build %s", p)

    def remove_all(self) -> list[Path]:
        removed = self.templates()
        for p in removed:
            remove_template(p)
        return removed

    # --- the sandbox's start ---------------------------------------------------------------

    async def start_guest(self, state_dir: str | os.PathLike[str], config: VMConfig, image_hash: str, *,
                          name: str) -> Guest | None:
        """A guest restored from this shape's template, or None (one log line says why) when
        the caller should boot cold. Cancellation propagates; nothing is left running."""
        try:
            template = await self.get(config, image_hash)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.warning("vm %s: no template (%s): booting cold", name, e)
            return None
        try:
            return await restore_guest(state_dir, config, template, name=name)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.warning("vm %s: template %s failed to restore (%s): removed; booting cold", name, template.dir, e)
            remove_template(template.dir)
            return None
