"""Composition: the one place that builds the shim's object graph.

    TaskService ── ContainerManager ──┬── Sandbox (VMSandbox: Guest + NetworkAttachment)
         │              │             ├── GuestEventFollower, ExitSequencer per container
         └──────── TaskEvents ────────┴── Publisher (containerd's event service)
    SandboxService ── PodSandbox ─┘   (containerd 2.x `sandboxer = "shim"`: the pod holder)

`build_task_service` takes any sandbox factory (tests pass a LocalSandbox); `vm_task_service`
is what the daemon serves: a VM per sandbox configured from the shim's config.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

from spinbox.api import contract

from . import config as config_mod
from .autoscaler import policy_of
from .containers import ContainerManager, SandboxFactory
from .exits import DRAIN_TIMEOUT, Publisher, TaskEvents
from .guest import Guest, boot_guest
from .network.attachment import NetworkAttachment, NetworkSettings
from .pod_sandbox import PodSandbox
from .sandbox import VMSandbox
from .sandbox_service import SandboxService
from .state import GroupPaths, State
from .task_service import TaskService
from .templates import TemplateCache
from .vm import hostcgroup


def build_task_service(sandbox_factory: SandboxFactory, publisher: Publisher | None, *,
                       namespace: str = "default", state: State | None = None,
                       request_exit: Callable[[], None] | None = None,
                       drain_timeout: float = DRAIN_TIMEOUT,
                       agent_timeout: float = contract.AGENT_CALL_TIMEOUT_S) -> TaskService:
    """The Task service over a container manager for sandboxes from `sandbox_factory`.
    `namespace` is the default for events (per-call metadata wins); `request_exit` is called
    when Shutdown found no container left; `state` keeps crash-safe records."""
    events = TaskEvents(publisher, namespace)
    containers = ContainerManager(sandbox_factory, events, state=state, agent_timeout=agent_timeout,
                                  drain_timeout=drain_timeout)
    return TaskService(containers, events, request_exit=request_exit)


def vm_sandbox_factory(group: str, config: config_mod.SpinboxConfig, paths: GroupPaths,
                       state: State) -> SandboxFactory:
    """A VMSandbox per call: the VM's directory recorded before QEMU starts (crash cleanup),
    restored from the template of its shape (`runtime.start = template`; cold boot when that
    cannot be), the network from the config and the first container's spec."""
    vm_config = config_mod.vm_config(config)
    templates = (TemplateCache(config_mod.template_dir(config), state=state, owner=group)
                 if config.runtime.start == "template" else None)
    image_hash = config_mod.guest_image(config).hash

    def sandbox() -> VMSandbox:
        # made by VMSandbox._start from the first spec (the pod's cgroup) before boot() runs
        cgroup = (hostcgroup.CgroupOwner(group, vm_config.vcpus, vm_config.memory_mb,
                                         parent=config.confinement.host_cgroup_parent, state=state, owner=group)
                  if config.confinement.host_cgroup else None)

        async def boot() -> Guest:
            vm_dir = paths.vm_dir
            state.record("vm", str(vm_dir), owner=group, path=str(vm_dir))
            cfg = dataclasses.replace(vm_config, host_cgroup_dirs=cgroup.dirs) if cgroup else vm_config
            if templates is not None:
                guest = await templates.start_guest(vm_dir, cfg, image_hash, name=group)
                if guest is not None:
                    return guest
            return await boot_guest(vm_dir, cfg, name=group)

        networking = NetworkAttachment(group, NetworkSettings.from_config(config), state=state, owner=group)
        autoscale = policy_of(config.autoscale) if config.autoscale.enabled else None
        return VMSandbox(group, boot, network=networking, state=state, cgroup=cgroup, autoscale=autoscale)

    return sandbox


def vm_task_service(*, group: str, namespace: str, config: config_mod.SpinboxConfig, paths: GroupPaths,
                    state: State, publisher: Publisher,
                    request_exit: Callable[[], None]) -> TaskService:
    return build_task_service(
        vm_sandbox_factory(group, config, paths, state), publisher, namespace=namespace, state=state,
        request_exit=request_exit, agent_timeout=config.timeouts.agent_call_s)


def sandbox_service(tasks: TaskService, *, group: str,
                    request_exit: Callable[[], None] | None = None) -> SandboxService:
    """containerd's Sandbox API for the daemon's group, on the Task service's container manager."""
    return SandboxService(PodSandbox(group, tasks.manager), tasks, request_exit=request_exit)
