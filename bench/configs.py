"""Config files for the benchmark box: one slotd with stand-in backends and a dispatcher.

Slots and the models they run:
  chat  "bench-chat", preloaded, bound by the registry (the tier 1 REGISTRY path)
  pass  "bench-pass", preloaded, not in the registry (the tier 2 PASSTHROUGH path)
  cold  "bench-cold" bound by the registry, or "bench-prefetch" from the catalog
        only (tier 3 PREFETCH); not preloaded, for cold starts

The registry holds "bench-chat", "bench-cold" and filler entries "scale-NNNNNN",
each with one alias, bound to the capability "chat".
"""

from __future__ import annotations

import importlib.util
import pathlib
from typing import Any

import tomli_w
from common import free_port

# Backend ports of the benchmark box, outside the tests' range 43000-43999.
BACKEND_PORTS = "45000-45499"
# Load delay of the stand-in on the cold slot, in seconds.
COLD_LOAD_DELAY = 0.1
REGISTRY_MODELS = ("bench-chat", "bench-cold")


def standin_command(capability: str, load_delay: float) -> list[str]:
    return [
        "{python}", "-m", "slotroute.standin", "--host", "{host}", "--port", "{port}",
        "--model", "{model_id}", "--model-path", "{model_path}", "--capability", capability,
        "--load-delay", str(load_delay),
    ]


def _slot(name: str, capability: str, model: str, *, preload: bool, load_delay: float,
          probe: dict[str, Any] | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": name,
        "device": "dev0",
        "capabilities": [capability],
        "default_model": model,
        "preload": preload,
        "command": standin_command(capability, load_delay),
        "start_timeout": 30.0,
        "stop_grace": 2.0,
    }
    if probe:
        entry["probe"] = probe
    return entry


def filler_ids(count: int) -> list[str]:
    return [f"scale-{number:06d}" for number in range(count)]


def write_box(
    directory: pathlib.Path,
    *,
    slotd_listen: str,
    dispatcher_listen: str,
    registry_size: int = 10,
    heartbeat_interval: float = 5.0,
    ready_interval: float | None = None,
    name: str = "box.toml",
) -> pathlib.Path:
    """Write the box config (and its model files) and return its path.

    `registry_size` counts every registry entry, the two bench models included.
    `ready_interval` overrides the probe interval of READY slots, in seconds.
    """
    cache = directory / "models"
    cache.mkdir(parents=True, exist_ok=True)
    models = [
        ("bench-chat", "chat", ["chat"]),
        ("bench-pass", "embed", ["pass"]),
        ("bench-cold", "rerank", ["cold"]),
        ("bench-prefetch", "rerank", ["cold"]),
    ]
    for model_id, _capability, _slots in models:
        (cache / f"{model_id}.bin").write_text(f"benchmark model {model_id}\n")

    probe = {"ready_interval": ready_interval} if ready_interval is not None else None
    registry: list[dict[str, Any]] = [
        {"id": "bench-chat", "slot": "chat"},
        {"id": "bench-cold", "slot": "cold"},
    ]
    registry.extend({"id": model_id, "aliases": [f"{model_id}-alias"], "capability": "chat"}
                    for model_id in filler_ids(max(registry_size - len(registry), 0)))
    document = {
        "slotd": {
            "listen": slotd_listen,
            "ports": BACKEND_PORTS,
            "cache_dir": "models",
            "heartbeat_interval": heartbeat_interval,
            "devices": [{"name": "dev0", "memory": "64GiB"}],
            "slots": [
                _slot("chat", "chat", "bench-chat", preload=True, load_delay=0.0, probe=probe),
                _slot("pass", "embed", "bench-pass", preload=True, load_delay=0.0, probe=probe),
                _slot("cold", "rerank", "bench-cold", preload=False, load_delay=COLD_LOAD_DELAY),
            ],
            "models": [
                {"id": model_id, "path": f"{model_id}.bin", "capability": capability,
                 "slots": slots, "memory": "1GiB"}
                for model_id, capability, slots in models
            ],
        },
        "dispatcher": {
            "listen": dispatcher_listen,
            "slotd": [slotd_listen],
            "reconnect_backoff": 0.05,
            "reconnect_backoff_max": 0.5,
            "models": registry,
        },
    }
    if metrics_supported():
        # Each service serves metrics as by default, but on its own free port, so that
        # several dispatchers of one run do not collide on the default port.
        document["slotd"]["metrics_listen"] = f"127.0.0.1:{free_port()}"
        document["dispatcher"]["metrics_listen"] = f"127.0.0.1:{free_port()}"
    path = directory / name
    path.write_text(tomli_w.dumps(document))
    return path


def metrics_supported() -> bool:
    """Return whether this slotroute has the metrics endpoint and its `metrics_listen` setting."""
    return importlib.util.find_spec("slotroute.opsconfig") is not None
