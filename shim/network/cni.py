"""A CNI client (spec 1.0.0, like libcni): load and validate network config lists, run the plugin
chain for ADD / CHECK / DEL, cache the final result on disk so DEL works after a crash, and
serialize ADD/DEL host-wide with a flock (parallel shims raced on the xtables lock in peers).

Plugins are executables named by `type`, found in the bin dirs; each gets its config on stdin and
the CNI_* variables in its environment; a failure is a JSON error object on stdout plus a
non-zero exit. Pure helpers (parse, env, stdin, conversion) are module functions so they can be
unit-tested without plugins.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import errno
import fcntl
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spinbox.shim.errors import HostError

log = logging.getLogger(__name__)

DEFAULT_CONF_DIR = "/etc/cni/net.d"
DEFAULT_BIN_DIRS = ("/usr/lib/cni", "/opt/cni/bin")
DEFAULT_CACHE_DIR = "/var/lib/cni"           # results under <cache_dir>/results, as libcni
DEFAULT_LOCK_PATH = "/run/spinbox/cni.lock"
DEFAULT_EXEC_TIMEOUT = 60.0

# Versions whose result has the interfaces/ips/routes/dns shape (0.1/0.2 had ip4/ip6: refused).
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0")
CHECK_MIN_VERSION = "0.4.0"
CONF_EXTENSIONS = (".conf", ".conflist", ".json")

_NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.\-]*")      # libcni ValidateNetworkName/ContainerID
_MAX_OUTPUT = 4 << 20                                          # a plugin's stdout we accept


# ---------------------------------------------------------------------------------------------
# Errors

class CNIError(HostError):
    """A CNI operation failed. For plugin failures `plugin`, `command`, `cni_code`, `msg` and
    `details` are the plugin's own (CNI error object); `msg` is what a user should read.
    (`cni_code`, not `code`: `code` is the Task API status every SpinboxError answers with.)"""

    def __init__(self, message: str, *, plugin: str = "", command: str = "", cni_code: int | None = None,
                 msg: str = "", details: str = "", stderr: str = "") -> None:
        super().__init__(message)
        self.plugin, self.command, self.cni_code = plugin, command, cni_code
        self.msg, self.details, self.stderr = msg or message, details, stderr
        self.cleanup_errors: list[str] = []   # DEL failures while undoing a failed ADD


class CNIConfigError(CNIError):
    """The network configuration is unreadable or invalid."""


class PluginNotFound(CNIError):
    """No executable for a plugin `type` in any bin dir."""


# ---------------------------------------------------------------------------------------------
# Network configuration lists

@dataclass(frozen=True)
class NetworkConfigList:
    name: str
    cni_version: str
    plugins: tuple[dict[str, Any], ...]
    disable_check: bool = False
    source: str = field(default="", compare=False)   # file it came from ("" = given as data)
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def to_bytes(self) -> bytes:
        return json.dumps(self.raw, sort_keys=True).encode()


def _version_key(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split("."))


def _where(source: str) -> str:
    return f" in {source}" if source else ""


def parse_conflist(data: Mapping[str, Any] | bytes | str, source: str = "") -> NetworkConfigList:
    """Validate a conflist (or a single-plugin .conf, which is wrapped like libcni's
    ConfListFromConf). Raises CNIConfigError naming the problem and the file."""
    if isinstance(data, (bytes, str)):
        try:
            data = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise CNIConfigError(f"CNI config{_where(source)} is not valid JSON: {e}") from None
    if not isinstance(data, Mapping):
        raise CNIConfigError(f"CNI config{_where(source)} must be a JSON object")
    raw = copy.deepcopy(dict(data))
    if "plugins" not in raw:
        if "type" not in raw:
            raise CNIConfigError(f"CNI config{_where(source)} has neither 'plugins' nor 'type'")
        plugin = {k: v for k, v in raw.items() if k not in ("name", "cniVersion")}
        raw = {"cniVersion": raw.get("cniVersion"), "name": raw.get("name"), "plugins": [plugin]}
    name, version, plugins = raw.get("name"), raw.get("cniVersion"), raw.get("plugins")
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise CNIConfigError(f"CNI config{_where(source)}: 'name' must match {_NAME_RE.pattern} (got {name!r})")
    if not isinstance(version, str) or not version:
        raise CNIConfigError(f"CNI network {name!r}{_where(source)}: 'cniVersion' is missing")
    if version not in SUPPORTED_VERSIONS:
        raise CNIConfigError(f"CNI network {name!r}{_where(source)}: cniVersion {version!r} is not supported "
                          f"(supported: {', '.join(SUPPORTED_VERSIONS)})")
    if not isinstance(plugins, list) or not plugins:
        raise CNIConfigError(f"CNI network {name!r}{_where(source)}: 'plugins' must be a non-empty list")
    for i, p in enumerate(plugins):
        if not isinstance(p, dict):
            raise CNIConfigError(f"CNI network {name!r}{_where(source)}: plugins[{i}] must be an object")
        t = p.get("type")
        if not isinstance(t, str) or not t:
            raise CNIConfigError(f"CNI network {name!r}{_where(source)}: plugins[{i}] has no 'type'")
        if "/" in t or t in (".", ".."):
            raise CNIConfigError(f"CNI network {name!r}{_where(source)}: plugins[{i}] type {t!r} "
                              "must be a plain executable name")
    disable_check = raw.get("disableCheck", False)
    if isinstance(disable_check, str):   # libcni accepts "true"/"false" strings too
        disable_check = disable_check.lower() == "true"
    return NetworkConfigList(name=name, cni_version=version, plugins=tuple(plugins),
                             disable_check=bool(disable_check), source=source, raw=raw)


def conf_files(conf_dir: str | os.PathLike) -> list[Path]:
    d = Path(conf_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.suffix in CONF_EXTENSIONS and p.is_file())


def load_network(conf_dir: str | os.PathLike = DEFAULT_CONF_DIR, name: str = "") -> NetworkConfigList:
    """The first config in lexical order (libcni/go-cni), or the one whose name is `name`."""
    files = conf_files(conf_dir)
    if not files:
        raise CNIConfigError(f"no CNI network config (*.conflist, *.conf, *.json) in {conf_dir}")
    if not name:
        return parse_conflist(files[0].read_bytes(), str(files[0]))
    found, problems = [], []
    for f in files:
        try:
            net = parse_conflist(f.read_bytes(), str(f))
        except CNIConfigError as e:
            problems.append(str(e))
            continue
        if net.name == name:
            return net
        found.append(net.name)
    extra = f"; unreadable: {'; '.join(problems)}" if problems else ""
    raise CNIConfigError(f"no CNI network named {name!r} in {conf_dir} (found: {', '.join(found) or 'none'}){extra}")


# ---------------------------------------------------------------------------------------------
# Per-invocation inputs

@dataclass(frozen=True)
class RuntimeConf:
    container_id: str
    netns: str                                        # path, e.g. /run/netns/<name>
    ifname: str = "eth0"
    args: tuple[tuple[str, str], ...] = ()            # CNI_ARGS key=value pairs
    capability_args: Mapping[str, Any] = field(default_factory=dict)   # e.g. {"portMappings": [...]}

    def validate(self) -> None:
        if not _NAME_RE.fullmatch(self.container_id or ""):
            raise CNIError(f"invalid CNI container id {self.container_id!r}: must match {_NAME_RE.pattern}")
        validate_ifname(self.ifname)
        for k, v in self.args:
            if not k or "=" in k or ";" in k + v or "\0" in k + v:
                raise CNIError(f"invalid CNI_ARGS entry {k!r}={v!r}: non-empty key without '=', "
                               "no ';' or NUL anywhere")


def validate_ifname(ifname: str) -> str:
    """libcni ValidateInterfaceName: 1..15 bytes, not . or .., no '/', ':' or whitespace."""
    if not ifname or len(ifname.encode()) > 15 or ifname in (".", "..") \
            or any(c in "/:" or c.isspace() for c in ifname):
        raise CNIError(f"invalid interface name {ifname!r}: 1-15 characters, no '/', ':' or whitespace")
    return ifname


def format_cni_args(args: Iterable[tuple[str, str]]) -> str:
    return ";".join(f"{k}={v}" for k, v in args)


def build_env(command: str, rt: RuntimeConf, bin_dirs: Iterable[str],
              base_env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The plugin's environment: the caller's (plugins exec iptables etc. via PATH) without any
    inherited CNI_* variables, plus the six CNI_* of this invocation."""
    env = {k: v for k, v in (os.environ if base_env is None else base_env).items() if not k.startswith("CNI_")}
    env.update({
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": rt.container_id,
        "CNI_NETNS": rt.netns,
        "CNI_IFNAME": rt.ifname,
        "CNI_ARGS": format_cni_args(rt.args),
        "CNI_PATH": os.pathsep.join(bin_dirs),
    })
    return env


def plugin_stdin(net: NetworkConfigList, plugin: Mapping[str, Any], prev_result: Mapping[str, Any] | None,
                 capability_args: Mapping[str, Any] | None = None) -> bytes:
    """The plugin's own config with the list's name/cniVersion injected, prevResult when there is
    one, and runtimeConfig for the capabilities it declares that the runtime supplies."""
    conf = copy.deepcopy(dict(plugin))
    conf["name"], conf["cniVersion"] = net.name, net.cni_version
    conf.pop("prevResult", None)
    if prev_result is not None:
        conf["prevResult"] = prev_result
    caps = conf.get("capabilities") or {}
    runtime = {k: v for k, v in (capability_args or {}).items() if isinstance(caps, dict) and caps.get(k)}
    if runtime:
        conf["runtimeConfig"] = runtime
    return json.dumps(conf).encode()


def convert_result(result: Mapping[str, Any], to_version: str) -> dict[str, Any]:
    """Bring a 0.3.x/0.4.0/1.0.0 result to the list's version (the shapes differ only in
    ips[].version, which 1.0.0 dropped)."""
    out = copy.deepcopy(dict(result))
    if out.get("cniVersion") not in SUPPORTED_VERSIONS:
        raise CNIError(f"CNI result version {out.get('cniVersion')!r} is not supported "
                       f"(supported: {', '.join(SUPPORTED_VERSIONS)})")
    for ip in out.get("ips") or []:
        if not isinstance(ip, dict):
            continue
        if _version_key(to_version) >= (1, 0, 0):
            ip.pop("version", None)
        elif "version" not in ip and isinstance(ip.get("address"), str):
            ip["version"] = "6" if ":" in ip["address"] else "4"
    out["cniVersion"] = to_version
    return out


def validate_result(result: Any, plugin: str) -> dict[str, Any]:
    """A plugin's ADD result must be an object with well-typed interfaces/ips/routes/dns."""
    def bad(why: str) -> CNIError:
        return CNIError(f"CNI plugin {plugin} returned an invalid result: {why}", plugin=plugin, command="ADD")
    if not isinstance(result, dict):
        raise bad("not a JSON object")
    if not isinstance(result.get("cniVersion"), str):
        raise bad("no cniVersion")
    ifaces = result.get("interfaces", [])
    if not isinstance(ifaces, list) or not all(isinstance(i, dict) and isinstance(i.get("name"), str) for i in ifaces):
        raise bad("'interfaces' must be a list of objects with a name")
    ips = result.get("ips", [])
    if not isinstance(ips, list) or not all(isinstance(i, dict) and isinstance(i.get("address"), str) for i in ips):
        raise bad("'ips' must be a list of objects with an address")
    for ip in ips:
        idx = ip.get("interface")
        if idx is not None and (not isinstance(idx, int) or not 0 <= idx < len(ifaces)):
            raise bad(f"ips entry {ip['address']} names interface {idx!r}, out of range")
    routes = result.get("routes", [])
    if not isinstance(routes, list) or not all(isinstance(r, dict) and isinstance(r.get("dst"), str) for r in routes):
        raise bad("'routes' must be a list of objects with a dst")
    if not isinstance(result.get("dns", {}), dict):
        raise bad("'dns' must be an object")
    return result


def parse_plugin_error(plugin: str, command: str, rc: int, stdout: bytes, stderr: bytes) -> CNIError:
    """A failed plugin: its CNI error object ({code, msg, details}) if it printed one, else its
    raw output."""
    err_text = stderr.decode(errors="replace").strip()
    try:
        obj = json.loads(stdout)
    except (ValueError, UnicodeDecodeError):
        obj = None
    if isinstance(obj, dict) and ("msg" in obj or "code" in obj):
        msg, details = str(obj.get("msg", "")), str(obj.get("details", "") or "")
        code = obj.get("code") if isinstance(obj.get("code"), int) else None
        text = f"CNI plugin {plugin} {command} failed (code {code}): {msg}" + (f"; {details}" if details else "")
        return CNIError(text, plugin=plugin, command=command, cni_code=code, msg=msg, details=details, stderr=err_text)
    raw = (stdout.decode(errors="replace").strip() or err_text or "no output")[:2000]
    return CNIError(f"CNI plugin {plugin} {command} failed (exit status {rc}): {raw}",
                    plugin=plugin, command=command, msg=raw, stderr=err_text)


# ---------------------------------------------------------------------------------------------
# Result cache (libcni's layout and format: <cache_dir>/results/<net>-<container>-<ifname>)

@dataclass
class CachedResult:
    network: NetworkConfigList
    rt: RuntimeConf
    result: dict[str, Any] | None
    add_failed: bool = False       # ADD failed and its rollback DEL too: one more DEL, then drop


class ResultCache:
    def __init__(self, cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR) -> None:
        self.dir = Path(cache_dir) / "results"

    def path(self, network: str, container_id: str, ifname: str) -> Path:
        return self.dir / f"{network}-{container_id}-{ifname}"

    def save(self, net: NetworkConfigList, rt: RuntimeConf, result: Mapping[str, Any] | None,
             add_failed: bool = False) -> Path:
        entry = {
            "kind": "cniCacheV1",
            "containerId": rt.container_id,
            "config": base64.b64encode(net.to_bytes()).decode(),   # Go []byte → base64
            "ifName": rt.ifname,
            "networkName": net.name,
            "netns": rt.netns,                                      # ours: DEL needs it after a crash
            "cniArgs": [list(a) for a in rt.args],
            "capabilityArgs": dict(rt.capability_args),
            "result": result,
            "spinboxAddFailed": add_failed,
        }
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        final = self.path(net.name, rt.container_id, rt.ifname)
        tmp = final.with_name(final.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(entry, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        return final

    def load(self, network: str, container_id: str, ifname: str) -> CachedResult | None:
        p = self.path(network, container_id, ifname)
        try:
            entry = json.loads(p.read_bytes())
        except FileNotFoundError:
            return None
        except ValueError as e:
            raise CNIError(f"CNI result cache {p} is corrupt: {e}") from None
        try:
            net = parse_conflist(base64.b64decode(entry["config"]), str(p))
            rt = RuntimeConf(container_id=entry["containerId"], netns=entry.get("netns", ""),
                             ifname=entry["ifName"], args=tuple(tuple(a) for a in entry.get("cniArgs") or ()),
                             capability_args=entry.get("capabilityArgs") or {})
        except (KeyError, TypeError, ValueError) as e:
            raise CNIError(f"CNI result cache {p} is corrupt: {e!r}") from None
        return CachedResult(net, rt, entry.get("result"), bool(entry.get("spinboxAddFailed")))

    def delete(self, network: str, container_id: str, ifname: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(network, container_id, ifname).unlink()


# ---------------------------------------------------------------------------------------------
# Host-wide lock

class HostLock:
    """An exclusive flock on a file, taken without blocking the event loop (LOCK_NB polling, so
    a cancelled waiter leaves nothing behind)."""

    def __init__(self, path: str | os.PathLike = DEFAULT_LOCK_PATH) -> None:
        self.path = Path(path)
        self._fd = -1

    async def __aenter__(self) -> HostLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        delay = 0.002
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as e:
                    if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                        raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.05)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    async def __aexit__(self, *exc: object) -> None:
        fd, self._fd = self._fd, -1
        os.close(fd)   # closing the only description drops the flock


# ---------------------------------------------------------------------------------------------
# The client

class CNIClient:
    def __init__(self, bin_dirs: Iterable[str] = DEFAULT_BIN_DIRS, cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR,
                 lock_path: str | os.PathLike | None = DEFAULT_LOCK_PATH, exec_timeout: float = DEFAULT_EXEC_TIMEOUT,
                 base_env: Mapping[str, str] | None = None) -> None:
        self.bin_dirs = tuple(bin_dirs)
        self.cache = ResultCache(cache_dir)
        self.lock_path = lock_path
        self.exec_timeout = exec_timeout
        self.base_env = base_env

    def find_plugin(self, plugin_type: str) -> str:
        for d in self.bin_dirs:
            p = os.path.join(d, plugin_type)
            if os.path.isfile(p) and os.access(p, os.X_OK):
                return p
        raise PluginNotFound(f"CNI plugin {plugin_type!r} not found in {', '.join(self.bin_dirs) or '(no bin dirs)'}",
                             plugin=plugin_type)

    def _lock(self) -> contextlib.AbstractAsyncContextManager:
        return HostLock(self.lock_path) if self.lock_path else contextlib.nullcontext()

    async def _exec(self, plugin: Mapping[str, Any], command: str, net: NetworkConfigList, rt: RuntimeConf,
                    prev_result: Mapping[str, Any] | None) -> dict[str, Any] | None:
        ptype = plugin["type"]
        path = self.find_plugin(ptype)
        stdin = plugin_stdin(net, plugin, prev_result, rt.capability_args)
        env = build_env(command, rt, self.bin_dirs, self.base_env)
        proc = await asyncio.create_subprocess_exec(
            path, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=env, cwd="/", start_new_session=True)
        try:
            stdout, stderr = await asyncio.wait_for(proc.communicate(stdin), self.exec_timeout)
        except asyncio.TimeoutError:
            raise CNIError(f"CNI plugin {ptype} {command} did not finish within {self.exec_timeout:g} s",
                           plugin=ptype, command=command) from None
        finally:
            if proc.returncode is None:     # timeout or cancellation: never leave it running
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        rc = proc.returncode if proc.returncode is not None else -1   # set: it was waited for
        if rc != 0:
            raise parse_plugin_error(ptype, command, rc, stdout, stderr)
        if command != "ADD":
            return None
        if len(stdout) > _MAX_OUTPUT:
            raise CNIError(f"CNI plugin {ptype} ADD printed more than {_MAX_OUTPUT} bytes", plugin=ptype, command=command)
        try:
            result = json.loads(stdout)
        except (ValueError, UnicodeDecodeError):
            raise CNIError(f"CNI plugin {ptype} ADD returned no JSON result: {stdout[:200]!r}",
                           plugin=ptype, command=command) from None
        return convert_result(validate_result(result, ptype), net.cni_version)

    async def add(self, net: NetworkConfigList, rt: RuntimeConf) -> dict[str, Any]:
        """Run ADD through the chain; each plugin gets the previous one's result. The final
        result is cached before returning. On failure the chain is DELeted (so nothing leaks)
        and the plugin's error raised."""
        rt.validate()
        for plugin in net.plugins:      # fail before anything ran, when a plugin is missing
            self.find_plugin(plugin["type"])
        async with self._lock():
            # Record intent first: a crash mid-chain still leaves what DEL needs.
            self.cache.save(net, rt, None)
            result: dict[str, Any] | None = None
            ran = 0
            try:
                for plugin in net.plugins:
                    ran += 1
                    result = await self._exec(plugin, "ADD", net, rt, result)
            except BaseException as e:
                # Undo what ran (the failed plugin included: it may have half-done things).
                cleanup = await self._del_chain(net, rt, None, skip_missing=True, plugins=net.plugins[:ran])
                if isinstance(e, CNIError):
                    e.cleanup_errors = [str(c) for c in cleanup]
                if cleanup:
                    # A plugin that cannot DEL its own config (the reason ADD failed, often)
                    # would pin this entry forever: allow one more DEL, then drop it.
                    self.cache.save(net, rt, None, add_failed=True)
                else:
                    self.cache.delete(net.name, rt.container_id, rt.ifname)
                raise
            assert result is not None
            self.cache.save(net, rt, result)
            return result

    async def check(self, net: NetworkConfigList, rt: RuntimeConf) -> None:
        """CHECK every plugin against the cached result (cniVersion >= 0.4.0, not disableCheck)."""
        rt.validate()
        if _version_key(net.cni_version) < _version_key(CHECK_MIN_VERSION):
            raise CNIError(f"CNI network {net.name}: CHECK needs cniVersion >= {CHECK_MIN_VERSION} "
                           f"(config has {net.cni_version})")
        if net.disable_check:
            return
        cached = self.cache.load(net.name, rt.container_id, rt.ifname)
        if cached is None or cached.result is None:
            raise CNIError(f"CNI CHECK {net.name}/{rt.container_id}/{rt.ifname}: no cached ADD result")
        async with self._lock():
            for plugin in net.plugins:
                await self._exec(plugin, "CHECK", net, rt, cached.result)

    async def delete(self, net: NetworkConfigList, rt: RuntimeConf) -> None:
        """DEL in reverse order with the cached result as prevResult. Every plugin is tried; the
        cache entry goes only when all succeeded (or the entry is of an ADD that failed and
        could not be undone then), so a failed DEL can be retried."""
        rt.validate()
        async with self._lock():
            cached = self.cache.load(net.name, rt.container_id, rt.ifname)
            prev = cached.result if cached else None
            errors = await self._del_chain(net, rt, prev, skip_missing=False)
            if cached is not None and cached.add_failed:
                self.cache.delete(net.name, rt.container_id, rt.ifname)
            if errors:
                first = errors[0]
                if len(errors) > 1:
                    first.cleanup_errors = [str(e) for e in errors[1:]]
                raise first
            self.cache.delete(net.name, rt.container_id, rt.ifname)

    async def delete_cached(self, network: str, container_id: str, ifname: str = "eth0") -> bool:
        """DEL using only what the cache recorded (config, netns, args): the path for `delete`
        after a crashed shim. False when there is nothing cached."""
        cached = self.cache.load(network, container_id, ifname)
        if cached is None:
            return False
        rt = cached.rt
        if rt.netns and not os.path.exists(rt.netns):
            # The netns is gone: plugins accept an empty CNI_NETNS on DEL and release IPAM.
            rt = RuntimeConf(rt.container_id, "", rt.ifname, rt.args, rt.capability_args)
        await self.delete(cached.network, rt)
        return True

    async def _del_chain(self, net: NetworkConfigList, rt: RuntimeConf, prev: Mapping[str, Any] | None,
                         skip_missing: bool, plugins: Iterable[Mapping[str, Any]] | None = None) -> list[CNIError]:
        errors: list[CNIError] = []
        for plugin in reversed(list(net.plugins if plugins is None else plugins)):
            try:
                await self._exec(plugin, "DEL", net, rt, prev)
            except PluginNotFound as e:
                if not skip_missing:
                    errors.append(e)
            except CNIError as e:
                errors.append(e)
        return errors
