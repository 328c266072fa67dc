"""slotd's config: devices, slots, the model cache and service settings, from TOML.

One file may hold both services' sections. slotd reads `[slotd]` with its
arrays `[[slotd.devices]]`, `[[slotd.slots]]` and `[[slotd.models]]`; the
dispatcher reads `[dispatcher]`. Relative paths are relative to the file.
"""

from __future__ import annotations

import dataclasses
import pathlib
import string
from typing import Any

from slotroute.configfile import (
    ConfigError,
    Fields,
    check_sections,
    format_size,
    load_toml,
    parse_size,
)
from slotroute.ids import InvalidModelId, check_model_id, model_key
from slotroute.netaddr import parse_listen
from slotroute.opsconfig import (
    DISPATCHER_METRICS_LISTEN,
    SLOTD_METRICS_LISTEN,
    ServerOps,
    read_server_ops,
)

# Placeholders a slot command and its environment may use.
# {python} is the interpreter running slotd, for backends written in Python.
PLACEHOLDERS = frozenset({"port", "host", "model_id", "model_path", "slot", "device", "python"})
PROBE_KINDS = ("http", "tcp", "grpc")
DEVICE_KINDS = ("cpu", "nvidia", "amd", "other")
# Bind addresses that accept connections on every interface.
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::"})

# A model without a declared memory size is estimated from its file size.
ESTIMATE_RATIO = 1.2
ESTIMATE_EXTRA_BYTES = 256 * 2**20


@dataclasses.dataclass(frozen=True)
class ProbeSpec:
    """How slotd decides that a backend is ready."""

    kind: str = "http"
    path: str = "/health"
    # For HTTP probes: a 200 response counts as ready only if its body contains this text.
    body_contains: str = ""
    # For gRPC probes: the service name passed to grpc.health.v1.Health/Check.
    service: str = ""
    # Seconds between probes while starting. The default is short enough to
    # observe llama-server's 503 "Loading model" window, which lasts ~60 ms.
    interval: float = 0.01
    # Seconds between probes once READY, to notice a backend that stops responding.
    ready_interval: float = 2.0
    # Seconds one probe may take.
    timeout: float = 1.0
    # Consecutive failed probes while READY before the slot leaves READY.
    failure_threshold: int = 3


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    name: str
    kind: str
    # None means "auto": the total is read from the machine.
    memory_bytes: int | None
    # Which GPU of its kind the device is, counting from 0, for reading memory with "auto".
    index: int = 0


@dataclasses.dataclass(frozen=True)
class SlotSpec:
    name: str
    device: str
    capabilities: tuple[str, ...]
    default_for: tuple[str, ...] = ()
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    default_model: str = ""
    preload: bool = False
    # argv with placeholders; empty for external slots.
    command: tuple[str, ...] = ()
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    # Base URL of an endpoint that something else runs; only probed.
    external_url: str = ""
    host: str = "127.0.0.1"
    # Host written into the slot's endpoint URL; empty means `host`.
    advertise_host: str = ""
    probe: ProbeSpec = ProbeSpec()
    start_timeout: float = 120.0
    stop_grace: float = 10.0
    drain_timeout: float = 30.0
    # Seconds without a lease before the slot unloads; 0 means never.
    idle_timeout: float = 0.0
    # Seconds after a load during which the slot is not evicted.
    min_residency: float = 0.0
    priority: int = 0
    pinned: bool = False
    # Slots of one device whose non-empty groups differ never run at the same time.
    exclusive_group: str = ""
    max_restarts: int = 5
    restart_backoff: float = 1.0
    restart_backoff_max: float = 60.0
    max_queue: int = 8

    @property
    def external(self) -> bool:
        return bool(self.external_url)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    id: str
    # Path of the model file relative to the cache directory.
    path: str
    capability: str
    slots: tuple[str, ...]
    # Declared memory need in bytes; None to estimate it from the file size.
    memory_bytes: int | None = None
    # Extra argv appended to the slot command for this model.
    args: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return model_key(self.id)


@dataclasses.dataclass(frozen=True)
class SlotdConfig:
    path: pathlib.Path
    listen: str
    port_range: tuple[int, int]
    cache_dir: pathlib.Path
    devices: tuple[DeviceSpec, ...]
    slots: tuple[SlotSpec, ...]
    models: tuple[ModelSpec, ...]
    heartbeat_interval: float = 5.0
    history_size: int = 4096
    max_pending_events: int = 1024
    stderr_tail_lines: int = 20
    lease_ttl: float = 60.0
    lease_ttl_max: float = 3600.0
    shutdown_grace: float = 15.0
    # Seconds between two checks of the stall watchdog.
    watchdog_interval: float = 1.0
    # Seconds a load step may run past its own bound (start_timeout, stop_grace,
    # drain_timeout) before the watchdog reports slotd stalled.
    stall_margin: float = 5.0
    # Ports of other services in the same file, which the port range must avoid.
    reserved_ports: tuple[int, ...] = ()
    # What {host} expands to for slots without their own `host`.
    backend_host: str = "127.0.0.1"
    # Host written into endpoint URLs of slots without their own non-wildcard `host`.
    advertise_host: str = "127.0.0.1"
    # Keyword arguments given to load_slotd_config for the two hosts above, so a
    # config reload keeps command-line overrides.
    host_overrides: dict[str, str] = dataclasses.field(default_factory=dict)
    # Metrics endpoint, TLS, token and bind settings (see slotroute.opsconfig).
    ops: ServerOps = ServerOps()

    def slot(self, name: str) -> SlotSpec | None:
        return next((spec for spec in self.slots if spec.name == name), None)

    def model(self, model_id: str) -> ModelSpec | None:
        key = model_key(model_id)
        return next((spec for spec in self.models if spec.key == key), None)

    def model_file(self, model: ModelSpec) -> pathlib.Path:
        return self.cache_dir / model.path


def load_slotd_config(
    path: str | pathlib.Path,
    listen: str | None = None,
    *,
    backend_host: str | None = None,
    advertise_host: str | None = None,
) -> SlotdConfig:
    """Load and validate the `[slotd]` section of a TOML file.

    `listen`, `backend_host` and `advertise_host` override the configured
    values. Raises ConfigError naming the file, the entry and the field of the
    first problem found.
    """
    path = pathlib.Path(path)
    document = load_toml(path)
    check_sections(path, document)
    if "slotd" not in document:
        raise ConfigError(path, "[slotd]", None, "section missing; add a [slotd] table")
    section = Fields(path, "slotd", document["slotd"])

    configured_listen = section.string("listen", "127.0.0.1:50051")
    listen = listen or configured_listen
    try:
        _host, service_port = parse_listen(listen)
    except ValueError as error:
        raise section.error("listen", str(error)) from None

    reserved = {service_port} if service_port else set()
    other_ports = _other_service_ports(document)
    if service_port and service_port == other_ports.get("dispatcher listen"):
        raise section.error(
            "listen",
            f"port {service_port} is also [dispatcher] listen; give the two services different ports",
        )
    reserved.update(port for port in other_ports.values() if port)
    port_range = _port_range(section, reserved)

    cache_dir = (path.parent / section.string("cache_dir", "models")).resolve()
    devices = tuple(_device(entry) for entry in section.tables("devices", "name"))
    _check_unique(devices, "devices", "name", path)
    device_names = {device.name for device in devices}

    hosts = _hosts(section, backend_host, advertise_host)
    slots = tuple(_slot(entry, device_names, hosts) for entry in section.tables("slots", "name"))
    _check_unique(slots, "slots", "name", path)
    slot_names = [slot.name for slot in slots]

    models = tuple(
        _model(entry, cache_dir, slot_names) for entry in section.tables("models", "id")
    )
    _check_unique_models(models, path)

    config = SlotdConfig(
        path=path,
        listen=listen,
        port_range=port_range,
        cache_dir=cache_dir,
        devices=devices,
        slots=slots,
        models=models,
        heartbeat_interval=section.seconds("heartbeat_interval", 5.0, minimum=0.01),
        history_size=section.integer("history_size", 4096, minimum=1),
        max_pending_events=section.integer("max_pending_events", 1024, minimum=1),
        stderr_tail_lines=section.integer("stderr_tail_lines", 20, minimum=1),
        lease_ttl=section.seconds("lease_ttl", 60.0, minimum=0.01),
        lease_ttl_max=section.seconds("lease_ttl_max", 3600.0, minimum=0.01),
        shutdown_grace=section.seconds("shutdown_grace", 15.0, minimum=0.1),
        watchdog_interval=section.seconds("watchdog_interval", 1.0, minimum=0.01),
        stall_margin=section.seconds("stall_margin", 5.0, minimum=0.0),
        reserved_ports=tuple(sorted(reserved)),
        backend_host=hosts[0],
        advertise_host=hosts[1],
        host_overrides={key: value for key, value in
                        (("backend_host", backend_host), ("advertise_host", advertise_host)) if value},
        ops=read_server_ops(section, metrics_default=SLOTD_METRICS_LISTEN),
    )
    section.finish()
    _check_default_models(config, section)
    _check_model_fit(config)
    return config


def _other_service_ports(document: dict[str, Any]) -> dict[str, int]:
    """Ports of the file's other listeners (dispatcher, metrics), which backends must avoid.

    Unset values take their defaults; a value that does not parse is left to
    the section that owns it to report.
    """
    listeners = {
        "dispatcher listen": ("dispatcher", "listen", "127.0.0.1:50052" if "dispatcher" in document else ""),
        "dispatcher metrics_listen": ("dispatcher", "metrics_listen",
                                      DISPATCHER_METRICS_LISTEN if "dispatcher" in document else ""),
        "slotd metrics_listen": ("slotd", "metrics_listen", SLOTD_METRICS_LISTEN),
    }
    ports: dict[str, int] = {}
    for label, (section, field, default) in listeners.items():
        table = document.get(section)
        value = table.get(field, default) if isinstance(table, dict) else ""
        if not isinstance(value, str) or not value:
            continue
        try:
            ports[label] = parse_listen(value)[1]
        except ValueError:
            continue
    return ports


def _port_range(section: Fields, reserved: set[int]) -> tuple[int, int]:
    text = section.string("ports", "41000-41999")
    try:
        low_text, high_text = text.split("-")
        low, high = int(low_text), int(high_text)
    except ValueError:
        raise section.error("ports", f"invalid port range {text!r}; use 'LOW-HIGH' such as '41000-41999'") from None
    if not (1024 <= low <= high <= 65535):
        raise section.error("ports", f"invalid port range {text!r}; use ports from 1024 to 65535, low first")
    overlap = sorted(port for port in reserved if low <= port <= high)
    if overlap:
        raise section.error(
            "ports",
            f"port range {text} contains the service port {overlap[0]}; "
            "move the range or the service's listen address",
        )
    return low, high


def _device(entry: Fields) -> DeviceSpec:
    name = _name(entry, "name")
    kind = entry.string("kind", "cpu", choices=DEVICE_KINDS)
    raw_memory = entry._get("memory", "auto", (int, str), "a size such as '24GiB' or 'auto'")
    if raw_memory == "auto":
        memory: int | None = None
    else:
        try:
            memory = parse_size(str(raw_memory))
        except ValueError as error:
            raise entry.error("memory", f"{error}, or 'auto'") from None
    device = DeviceSpec(
        name=name,
        kind=kind,
        memory_bytes=memory,
        index=entry.integer("index", 0, minimum=0),
    )
    entry.finish()
    return device


def _hosts(section: Fields, backend_override: str | None,
           advertise_override: str | None) -> tuple[str, str]:
    """Read `backend_host` and `advertise_host`; a wildcard bind advertises 127.0.0.1."""
    # Both fields are read even when overridden, so finish() does not report them unknown.
    configured_backend = section.string("backend_host", "127.0.0.1")
    configured_advertise = section.string("advertise_host", "")
    backend = backend_override or configured_backend
    _check_host(section, "backend_host", backend)
    advertise = advertise_override or configured_advertise
    if not advertise:
        advertise = "127.0.0.1" if backend in WILDCARD_HOSTS else backend
    _check_host(section, "advertise_host", advertise)
    if advertise in WILDCARD_HOSTS:
        raise section.error("advertise_host", f"invalid host {advertise!r}: clients cannot connect "
                            "to a wildcard address; give the address they should use")
    return backend, advertise


def _check_host(entry: Fields, field: str, host: str) -> None:
    if not host or any(char.isspace() or char in "[]/@" for char in host):
        raise entry.error(field, f"invalid host {host!r}; give an IP address or a host name "
                          "without port or brackets, such as 127.0.0.1 or ::1")


def _slot(entry: Fields, device_names: set[str], hosts: tuple[str, str]) -> SlotSpec:
    name = _name(entry, "name")
    device = entry.string("device")
    if device not in device_names:
        known = ", ".join(sorted(device_names)) or "none declared"
        raise entry.error("device", f"unknown device {device!r}; known devices: {known}")

    capabilities = entry.string_list("capabilities")
    if not capabilities:
        raise entry.error("capabilities", "empty; list what the slot does, such as ['chat']")
    for index, capability in enumerate(capabilities):
        _check_capability(entry, f"capabilities[{index}]", capability)
    default_for = entry.string_list("default_for", ())
    for index, capability in enumerate(default_for):
        if capability not in capabilities:
            raise entry.error(
                f"default_for[{index}]",
                f"capability {capability!r} is not in this slot's capabilities {list(capabilities)}",
            )

    command = entry.string_list("command", ())
    external_url = entry.string("external_url", "")
    if bool(command) == bool(external_url):
        raise entry.error(
            "command",
            "set exactly one of 'command' (slotd runs the backend) and "
            "'external_url' (something else runs it)",
        )
    for index, argument in enumerate(command):
        _check_placeholders(entry, f"command[{index}]", argument)
    env = entry.string_map("env", {})
    for key, value in env.items():
        _check_placeholders(entry, f"env.{key}", value)
    if external_url and not external_url.startswith(("http://", "https://")):
        raise entry.error("external_url", f"invalid URL {external_url!r}; use http://HOST:PORT")

    probe = _probe(entry.table_of("probe"))
    backoff = entry.seconds("restart_backoff", 1.0, minimum=0.0)
    backend_host, configured_advertise = hosts
    host = entry.string("host", "")
    if host:
        _check_host(entry, "host", host)
    # A slot's own host is advertised unless it is a wildcard bind address.
    advertise_host = host if host and host not in WILDCARD_HOSTS else configured_advertise
    host = host or backend_host
    spec = SlotSpec(
        name=name,
        device=device,
        capabilities=capabilities,
        default_for=default_for,
        labels=entry.string_map("labels", {}),
        default_model=entry.string("default_model", ""),
        preload=entry.boolean("preload", False),
        command=command,
        env=env,
        external_url=external_url.rstrip("/"),
        host=host,
        advertise_host=advertise_host,
        probe=probe,
        start_timeout=entry.seconds("start_timeout", 120.0, minimum=0.01),
        stop_grace=entry.seconds("stop_grace", 10.0, minimum=0.0),
        drain_timeout=entry.seconds("drain_timeout", 30.0, minimum=0.0),
        idle_timeout=entry.seconds("idle_timeout", 0.0, minimum=0.0),
        min_residency=entry.seconds("min_residency", 0.0, minimum=0.0),
        priority=entry.integer("priority", 0),
        pinned=entry.boolean("pinned", False),
        exclusive_group=entry.string("exclusive_group", ""),
        max_restarts=entry.integer("max_restarts", 5, minimum=0),
        restart_backoff=backoff,
        restart_backoff_max=entry.seconds("restart_backoff_max", max(60.0, backoff), minimum=0.0),
        max_queue=entry.integer("max_queue", 8, minimum=0),
    )
    entry.finish()
    if spec.preload and not spec.default_model and not spec.external:
        raise entry.error("preload", "preload needs a 'default_model' to start")
    return spec


def _probe(entry: Fields | None) -> ProbeSpec:
    if entry is None:
        return ProbeSpec()
    probe = ProbeSpec(
        kind=entry.string("kind", "http", choices=PROBE_KINDS),
        path=entry.string("path", "/health"),
        body_contains=entry.string("body_contains", ""),
        service=entry.string("service", ""),
        interval=entry.seconds("interval", 0.01, minimum=0.001),
        ready_interval=entry.seconds("ready_interval", 2.0, minimum=0.01),
        timeout=entry.seconds("timeout", 1.0, minimum=0.001),
        failure_threshold=entry.integer("failure_threshold", 3, minimum=1),
    )
    if not probe.path.startswith("/"):
        raise entry.error("path", f"invalid path {probe.path!r}; it must start with '/'")
    entry.finish()
    return probe


def _model(entry: Fields, cache_dir: pathlib.Path, slot_names: list[str]) -> ModelSpec:
    raw_id = entry.string("id")
    try:
        model_id = check_model_id(raw_id)
    except InvalidModelId as error:
        raise entry.error("id", str(error)) from None

    relative = entry.string("path")
    candidate = pathlib.PurePath(relative)
    if candidate.is_absolute() or ".." in candidate.parts or not relative.strip():
        raise entry.error(
            "path",
            f"model path {relative!r} leaves the cache directory {cache_dir}; "
            "give a path relative to the cache, without '..'",
        )
    resolved = (cache_dir / relative).resolve()
    if not resolved.is_relative_to(cache_dir):
        raise entry.error(
            "path",
            f"model path {relative!r} resolves to {resolved}, outside the cache directory "
            f"{cache_dir}; a symbolic link may point out of it",
        )

    capability = entry.string("capability")
    _check_capability(entry, "capability", capability)
    slots = entry.string_list("slots")
    if not slots:
        raise entry.error("slots", "empty; list the slots allowed to host this model")
    for index, slot in enumerate(slots):
        if slot not in slot_names:
            known = ", ".join(slot_names) or "none declared"
            raise entry.error(f"slots[{index}]", f"unknown slot {slot!r}; known slots: {known}")
    spec = ModelSpec(
        id=model_id,
        path=relative,
        capability=capability,
        slots=slots,
        memory_bytes=entry.size("memory", None),
        args=entry.string_list("args", ()),
    )
    for index, argument in enumerate(spec.args):
        _check_placeholders(entry, f"args[{index}]", argument)
    entry.finish()
    return spec


def _check_default_models(config: SlotdConfig, section: Fields) -> None:
    for slot in config.slots:
        if not slot.default_model:
            continue
        model = config.model(slot.default_model)
        entry = f"[[slotd.slots]] name = {slot.name!r}"
        if model is None:
            known = ", ".join(spec.id for spec in config.models) or "none declared"
            raise ConfigError(
                config.path, entry, "default_model",
                f"unknown model {slot.default_model!r}; catalog models: {known}",
            )
        if slot.name not in model.slots:
            raise ConfigError(
                config.path, entry, "default_model",
                f"model {model.id!r} does not list slot {slot.name!r} in its 'slots'",
            )


def _check_model_fit(config: SlotdConfig) -> None:
    """Each catalog model must do work its slots offer and fit a device that can host it."""
    slots = {slot.name: slot for slot in config.slots}
    devices = {device.name: device for device in config.devices}
    for model in config.models:
        entry = f"[[slotd.models]] id = {model.id!r}"
        for name in model.slots:
            if model.capability not in slots[name].capabilities:
                raise ConfigError(
                    config.path, entry, "capability",
                    f"capability {model.capability!r} is not offered by slot {name!r} "
                    f"({', '.join(slots[name].capabilities)}); add it to the slot or remove the slot",
                )
        if model.memory_bytes is None:
            continue
        sizes = [devices[slots[name].device].memory_bytes for name in model.slots]
        if all(size is not None and model.memory_bytes > size for size in sizes):
            largest = max(size for size in sizes if size is not None)
            raise ConfigError(
                config.path, entry, "memory",
                f"model needs {format_size(model.memory_bytes)} but the largest device of its slots "
                f"has {format_size(largest)}; it could never load",
            )


def _name(entry: Fields, field: str) -> str:
    name = entry.string(field)
    if not name or not all(char.isalnum() or char in "-_." for char in name):
        raise entry.error(field, f"invalid name {name!r}; use letters, digits, '-', '_' and '.'")
    return name


def _check_capability(entry: Fields, field: str, capability: str) -> None:
    if not capability or not all(char.isalnum() or char in "-_" for char in capability) \
            or capability != capability.lower():
        raise entry.error(
            field,
            f"invalid capability {capability!r}; use lower-case letters, digits, '-' and '_' "
            "such as 'chat', 'embed', 'stt', 'tts' or 'image'",
        )


def _check_placeholders(entry: Fields, field: str, text: str) -> None:
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as error:
        raise entry.error(field, f"invalid placeholder syntax in {text!r}: {error}; write '{{{{' for a literal brace") from None
    for _literal, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in PLACEHOLDERS or spec or conversion:
            known = ", ".join("{" + placeholder + "}" for placeholder in sorted(PLACEHOLDERS))
            raise entry.error(field, f"unknown placeholder {{{name}}} in {text!r}; known: {known}")


def _check_unique(items: tuple[Any, ...], array: str, field: str, path: pathlib.Path) -> None:
    seen: set[str] = set()
    for item in items:
        value = getattr(item, field)
        if value in seen:
            raise ConfigError(
                path, f"[[slotd.{array}]] {field} = {value!r}", field,
                f"duplicate {field} {value!r}; each entry needs its own {field}",
            )
        seen.add(value)


def _check_unique_models(models: tuple[ModelSpec, ...], path: pathlib.Path) -> None:
    seen: dict[str, str] = {}
    for model in models:
        if model.key in seen:
            raise ConfigError(
                path, f"[[slotd.models]] id = {model.id!r}", "id",
                f"duplicate model id {model.id!r} (matches {seen[model.key]!r}: ids ignore "
                "case and surrounding whitespace); rename one",
            )
        seen[model.key] = model.id


def estimate_memory(model: ModelSpec, file_bytes: int) -> int:
    """Return the memory a model needs: declared, or estimated from its file size."""
    if model.memory_bytes is not None:
        return model.memory_bytes
    return int(file_bytes * ESTIMATE_RATIO) + ESTIMATE_EXTRA_BYTES
