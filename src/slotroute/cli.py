"""The `slotroute` command: run the services and talk to them.

Server commands: `slotd`, `dispatcher`, and `up` (both in one process).
Client commands: `resolve`, `route`, `routes`, `slots`, `watch`, `load`,
`unload`, `reload`, `health`, and `check-config` (no server needed).

Client commands print human-readable text by default and JSON with `--json`.
Results go to stdout; progress, details and errors go to stderr.

Exit codes, for scripts:
  0    success (`health`: the service reports SERVING)
  1    unexpected error, such as a listen address already in use
  2    usage error: invalid arguments
  3    invalid config file, a plaintext bind refused without --allow-insecure-bind,
       or a TLS certificate or token that cannot be read
  4    not found (NOT_FOUND): unknown model, slot, capability or health service name
  5    try again later (UNAVAILABLE, DEADLINE_EXCEEDED, ABORTED), including a server
       that cannot be reached and, for `health`, any status other than SERVING
  6    rejected (FAILED_PRECONDITION, RESOURCE_EXHAUSTED, INVALID_ARGUMENT)
  7    not allowed (UNAUTHENTICATED, PERMISSION_DENIED)
  130  interrupted by Ctrl+C while a client command waited
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import pathlib
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_NOT_FOUND = 4
EXIT_RETRY = 5
EXIT_REJECTED = 6
EXIT_DENIED = 7
EXIT_INTERRUPTED = 130

_EXIT_FOR_CODE = {
    "NOT_FOUND": EXIT_NOT_FOUND,
    "UNAVAILABLE": EXIT_RETRY,
    "DEADLINE_EXCEEDED": EXIT_RETRY,
    "ABORTED": EXIT_RETRY,
    "FAILED_PRECONDITION": EXIT_REJECTED,
    "RESOURCE_EXHAUSTED": EXIT_REJECTED,
    "INVALID_ARGUMENT": EXIT_REJECTED,
    "UNAUTHENTICATED": EXIT_DENIED,
    "PERMISSION_DENIED": EXIT_DENIED,
}

DEFAULT_SLOTD = "127.0.0.1:50051"
DEFAULT_DISPATCHER = "127.0.0.1:50052"

# After a call returns, seconds to wait for slotd's stream to show the final
# state of the slot, so the progress lines end with it.
_PROGRESS_SETTLE_SECONDS = 1.0
# Seconds to wait for slotd's snapshot before the call starts anyway.
_PROGRESS_SYNC_SECONDS = 2.0


def _setup_logging(level: str, log_format: str) -> None:
    from slotroute import logs

    logs.configure(level, log_format)


def _state_name(state: int) -> str:
    from slotroute.slot.v1 import slot_pb2

    return slot_pb2.SlotState.Name(state).removeprefix("SLOT_STATE_")


# -- server commands ----------------------------------------------------------------


def _load_slotd(args, listen: str | None):
    from slotroute.slot.config import load_slotd_config

    return load_slotd_config(
        args.config,
        listen=listen,
        backend_host=args.backend_host,
        advertise_host=args.advertise_host,
    )


def _loopback_for(listen: str) -> str:
    """Return an address that reaches a server listening on `listen` from this machine."""
    from slotroute.netaddr import format_address, parse_listen

    host, port = parse_listen(listen)
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return format_address(host, port)


def _check_security(config, section: str, allow_insecure: bool):
    """Apply --allow-insecure-bind and run the service's startup security checks.

    The services run the same checks when they start; running them here first
    exits 3 with the reason before anything starts. Returns the config to serve.
    """
    import dataclasses

    from slotroute import security

    if allow_insecure:
        config = dataclasses.replace(
            config, ops=dataclasses.replace(config.ops, allow_insecure_bind=True))
    try:
        if section == "slotd":
            security.slotd_security(config)
        else:
            security.dispatcher_security(config)
    except security.SecurityError as error:
        print(f"error: {section}: {error}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None
    return config


def _config_error(error) -> SystemExit:
    print(f"config error: {error}", file=sys.stderr)
    return SystemExit(EXIT_CONFIG)


def _serve(main: Callable[[asyncio.Event], Awaitable[int]]) -> int:
    """Run a server until SIGINT or SIGTERM; a failed bind exits 1 with the reason.

    A config problem found only at startup (such as a device memory set to
    "auto" that cannot be read) exits 3 like any other config error.
    """
    from slotroute import rpc
    from slotroute.configfile import ConfigError

    try:
        return asyncio.run(rpc.run_until_signal(main))
    except ConfigError as error:
        raise _config_error(error) from None
    except OSError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR


def cmd_slotd(args) -> int:
    from slotroute.configfile import ConfigError
    from slotroute.slot import app

    try:
        config = _load_slotd(args, args.listen)
    except ConfigError as error:
        raise _config_error(error) from None
    config = _check_security(config, "slotd", args.allow_insecure_bind)
    return _serve(lambda stop: app.serve(config, stop))


def cmd_dispatcher(args) -> int:
    from slotroute.configfile import ConfigError
    from slotroute.dispatch import app
    from slotroute.dispatch.config import load_dispatcher_config

    try:
        config = load_dispatcher_config(args.config, listen=args.listen, sources=args.slotd)
    except ConfigError as error:
        raise _config_error(error) from None
    config = _check_security(config, "dispatcher", args.allow_insecure_bind)
    return _serve(lambda stop: app.serve(config, stop))


def cmd_up(args) -> int:
    from slotroute.configfile import ConfigError
    from slotroute.dispatch import app as dispatch_app
    from slotroute.dispatch.config import load_dispatcher_config
    from slotroute.netaddr import parse_listen
    from slotroute.slot import app as slot_app

    try:
        slotd_config = _load_slotd(args, args.slotd_listen)
        # The dispatcher subscribes to the slotd of this process, whatever [dispatcher] slotd lists.
        dispatcher_config = load_dispatcher_config(
            args.config, listen=args.dispatcher_listen, sources=[_loopback_for(slotd_config.listen)])
    except ConfigError as error:
        raise _config_error(error) from None
    if parse_listen(slotd_config.listen)[1] == 0:
        print("error: `up` needs a fixed slotd port for the dispatcher to subscribe to; "
              "set [slotd] listen or --slotd-listen to HOST:PORT with a port other than 0",
              file=sys.stderr)
        return EXIT_USAGE
    slotd_config = _check_security(slotd_config, "slotd", args.allow_insecure_bind)
    dispatcher_config = _check_security(dispatcher_config, "dispatcher", args.allow_insecure_bind)

    async def both(stop: asyncio.Event) -> int:
        ready = asyncio.Event()
        slotd_task = asyncio.create_task(slot_app.serve(slotd_config, stop, ready))
        ready_wait = asyncio.create_task(ready.wait())
        await asyncio.wait({slotd_task, ready_wait}, return_when=asyncio.FIRST_COMPLETED)
        if slotd_task.done():
            ready_wait.cancel()
            # slotd failed to start (for example, its port is taken): raise its error.
            return slotd_task.result()
        try:
            await dispatch_app.serve(dispatcher_config, stop)
        finally:
            stop.set()
            await slotd_task
        return EXIT_OK

    return _serve(both)


def cmd_check_config(args) -> int:
    from slotroute.configfile import ConfigError, check_sections, load_toml
    from slotroute.dispatch.config import load_dispatcher_config
    from slotroute.slot.config import load_slotd_config

    path = pathlib.Path(args.file)
    summary: dict[str, dict[str, Any]] = {}
    try:
        document = load_toml(path)
        check_sections(path, document)
        if "slotd" in document:
            slotd = load_slotd_config(path)
            summary["slotd"] = {
                "listen": slotd.listen,
                "ports": f"{slotd.port_range[0]}-{slotd.port_range[1]}",
                "backend_host": slotd.backend_host,
                "advertise_host": slotd.advertise_host,
                "devices": [device.name for device in slotd.devices],
                "slots": [slot.name for slot in slotd.slots],
                "models": [model.id for model in slotd.models],
            }
        if "dispatcher" in document:
            dispatcher = load_dispatcher_config(path)
            summary["dispatcher"] = {
                "listen": dispatcher.listen,
                "sources": list(dispatcher.sources),
                "registry": [entry.id for entry in dispatcher.entries],
            }
        if not summary:
            raise ConfigError(path, "file", None,
                              "neither a [slotd] nor a [dispatcher] section; add at least one")
    except ConfigError as error:
        if args.json:
            print(json.dumps({"valid": False, "error": {
                "file": error.path, "entry": error.entry, "field": error.field,
                "problem": error.problem}}))
        print(f"config error: {error}", file=sys.stderr)
        return EXIT_CONFIG

    if args.json:
        print(json.dumps({"valid": True, **summary}, indent=2))
        return EXIT_OK
    print(f"{path}: valid")
    for section, facts in summary.items():
        for key, value in facts.items():
            shown = ", ".join(value) if isinstance(value, list) else value
            print(f"  {section}.{key}: {shown}")
    return EXIT_OK


# -- client plumbing ----------------------------------------------------------------


def _metadata(args) -> tuple[tuple[str, str], ...]:
    token = os.environ.get("SLOTROUTE_TOKEN", "").strip()
    source = "$SLOTROUTE_TOKEN"
    token_file = getattr(args, "token_file", None)
    if token_file:
        source = token_file
        try:
            with open(token_file, encoding="utf-8") as handle:
                token = handle.read().strip()
        except (OSError, UnicodeDecodeError) as error:
            print(f"error: cannot read token file {token_file}: {error}", file=sys.stderr)
            raise SystemExit(EXIT_USAGE) from None
    # A header value must be one line of printable ASCII; anything else would
    # fail deep inside gRPC with a traceback.
    if token and not (token.isascii() and token.isprintable()):
        print(f"error: the token from {source} is not one line of printable ASCII; "
              "put only the token in it", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)
    return (("authorization", f"Bearer {token}"),) if token else ()


# Channel credentials of client commands, from --ca-file, --cert-file and --key-file;
# None means plaintext. main() sets them before it runs the command.
_client_credentials = None


def _set_client_tls(args) -> None:
    """Build TLS channel credentials when a client command has any TLS file option."""
    global _client_credentials
    files = {name: getattr(args, name, None) for name in ("ca_file", "cert_file", "key_file")}
    if not any(files.values()):
        _client_credentials = None
        return
    if bool(files["cert_file"]) != bool(files["key_file"]):
        print("error: pass --cert-file and --key-file together", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)
    import grpc

    contents = {}
    for name, path in files.items():
        if not path:
            contents[name] = None
            continue
        try:
            contents[name] = pathlib.Path(path).read_bytes()
        except OSError as error:
            print(f"error: cannot read --{name.replace('_', '-')} {path}: {error.strerror}",
                  file=sys.stderr)
            raise SystemExit(EXIT_USAGE) from None
    _client_credentials = grpc.ssl_channel_credentials(
        root_certificates=contents["ca_file"], private_key=contents["key_file"],
        certificate_chain=contents["cert_file"])


def _channel(address: str):
    import grpc

    from slotroute import rpc

    if _client_credentials is not None:
        return grpc.aio.secure_channel(address, _client_credentials, options=rpc.CLIENT_OPTIONS)
    return grpc.aio.insecure_channel(address, options=rpc.CLIENT_OPTIONS)


def _print_rpc_error(error, as_json: bool, address: str = "") -> int:
    """Print a failed call's status, ErrorInfo and RetryInfo; return the exit code."""
    from slotroute import rpc

    info, retry_after = rpc.error_details(error)
    code = error.code().name
    # gRPC reports UNAVAILABLE without ErrorInfo when no server accepts the
    # connection. The UNAVAILABLE errors of the services carry ErrorInfo.
    unreachable = code == "UNAVAILABLE" and info is None and address
    if as_json:
        payload: dict[str, Any] = {"code": code, "message": error.details()}
        if info is not None:
            payload.update(reason=info.reason, domain=info.domain, metadata=dict(info.metadata))
        if retry_after is not None:
            payload["retry_after_seconds"] = retry_after
        if unreachable:
            payload["address"] = address
        print(json.dumps({"error": payload}), file=sys.stderr)
        return _EXIT_FOR_CODE.get(code, EXIT_ERROR)

    print(f"error: {code}: {error.details()}", file=sys.stderr)
    if info is not None:
        print(f"  reason: {info.reason} ({info.domain})", file=sys.stderr)
        for key, value in sorted(info.metadata.items()):
            if value:
                print(f"  {key}: {value}", file=sys.stderr)
    if retry_after is not None:
        print(f"  retry after: {retry_after:.1f} s", file=sys.stderr)
    if unreachable:
        print(f"  no server responded at {address}; start it (`slotroute up`) or pass the "
              "right address", file=sys.stderr)
    return _EXIT_FOR_CODE.get(code, EXIT_ERROR)


class _Progress:
    """Prints slot state changes from slotd's WatchSlots stream while a call runs."""

    def __init__(self, address: str, metadata: tuple[tuple[str, str], ...], out):
        self.address = address
        self.metadata = metadata
        self.out = out
        self.started = time.monotonic()
        self.synced = asyncio.Event()
        self.states: dict[str, int] = {}
        self._changed = asyncio.Event()

    async def run(self) -> None:
        import grpc

        from slotroute.slot.v1 import slot_pb2, slot_pb2_grpc

        async with _channel(self.address) as channel:
            stub = slot_pb2_grpc.SlotServiceStub(channel)
            call = stub.WatchSlots(slot_pb2.WatchSlotsRequest(), metadata=self.metadata or None)
            try:
                async for event in call:
                    if event.type == slot_pb2.EVENT_TYPE_SYNCED:
                        self.synced.set()
                    if event.type != slot_pb2.EVENT_TYPE_SLOT:
                        continue
                    self._apply(event.slot, event.snapshot)
            except grpc.aio.AioRpcError:
                # Progress is optional: without slotd's stream the call still runs.
                return
            finally:
                self.synced.set()
                call.cancel()

    def _apply(self, slot, snapshot: bool) -> None:
        previous = self.states.get(slot.name)
        self.states[slot.name] = slot.state
        self._changed.set()
        self._changed = asyncio.Event()
        if snapshot or previous == slot.state:
            return
        elapsed = time.monotonic() - self.started
        print(f"  +{elapsed:6.2f}s  {slot.name:<10} {_state_name(slot.state):<10} "
              f"{slot.model_id or '-'}  {slot.message}", file=self.out, flush=True)

    async def settle(self, slot: str, state: int) -> None:
        """Wait briefly until the stream shows `slot` in `state`."""
        if slot not in self.states:
            return
        try:
            async with asyncio.timeout(_PROGRESS_SETTLE_SECONDS):
                while self.states.get(slot) != state:
                    await self._changed.wait()
        except TimeoutError:
            pass


async def _with_progress(args, call: Callable[[], Awaitable[Any]],
                         final: Callable[[Any], tuple[str, int]]):
    """Run `call()` while printing slotd's state changes to stderr.

    Progress is off with --json or --quiet. `final(result)` names the slot and
    the state the call ended at; the lines continue until the stream shows it.
    """
    if args.json or args.quiet or not args.slotd:
        return await call()
    progress = _Progress(args.slotd, _metadata(args), sys.stderr)
    watcher = asyncio.create_task(progress.run())
    # Subscribe before the call, so that its first state change is not part
    # of the snapshot.
    try:
        async with asyncio.timeout(_PROGRESS_SYNC_SECONDS):
            await progress.synced.wait()
    except TimeoutError:
        pass
    try:
        result = await call()
        await progress.settle(*final(result))
        return result
    finally:
        watcher.cancel()
        try:
            await watcher
        except asyncio.CancelledError:
            pass


def _target_dict(target) -> dict[str, Any]:
    return {
        "model": target.model,
        "endpoint_url": target.endpoint_url,
        "slot": target.slot,
        "source": target.source,
        "tier": target.tier,
        "state": target.state,
        "revision": target.revision,
        "cold_start": target.cold_start,
        **({"lease_id": target.lease_id} if target.lease_id else {}),
    }


def _target_final(target) -> tuple[str, int]:
    from slotroute.slot.v1 import slot_pb2

    return target.slot, slot_pb2.SlotState.Value(f"SLOT_STATE_{target.state}")


def _run_client(coroutine) -> int:
    """Run a client command; Ctrl+C cancels it in an orderly way and returns 130.

    SIGINT cancels the command's task from a loop signal handler instead of
    raising KeyboardInterrupt at an arbitrary point, which could leave a gRPC
    channel half closed and the process hanging at exit.
    """

    async def main() -> int:
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(coroutine)
        interrupted = False

        def on_interrupt() -> None:
            nonlocal interrupted
            interrupted = True
            task.cancel()

        # Signal handlers exist only in the main thread (tests also call main() from others).
        handled = threading.current_thread() is threading.main_thread()
        if handled:
            loop.add_signal_handler(signal.SIGINT, on_interrupt)
        try:
            return await task
        except asyncio.CancelledError:
            if interrupted:
                return EXIT_INTERRUPTED
            raise
        finally:
            if handled:
                loop.remove_signal_handler(signal.SIGINT)

    try:
        return asyncio.run(main())
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


# -- client commands ----------------------------------------------------------------


def cmd_resolve(args) -> int:
    import grpc

    from slotroute.client import DispatcherClient

    async def run() -> int:
        async with DispatcherClient(args.dispatcher, metadata=_metadata(args),
                                    credentials=_client_credentials) as client:
            try:
                target = await _with_progress(args, lambda: client.resolve(
                    args.model, timeout=args.timeout, no_wait=args.no_wait,
                    no_cold_start=args.no_cold_start), _target_final)
            except grpc.aio.AioRpcError as error:
                return _print_rpc_error(error, args.json, args.dispatcher)
        if args.json:
            print(json.dumps(_target_dict(target)))
            return EXIT_OK
        print(target.endpoint_url)
        if not args.quiet:
            print(f"  model {target.model}  slot {target.slot}  tier {target.tier}  "
                  f"state {target.state}  source {target.source}"
                  + ("  (cold start)" if target.cold_start else ""), file=sys.stderr)
        return EXIT_OK

    return _run_client(run())


def cmd_route(args) -> int:
    import grpc

    from slotroute.client import DispatcherClient

    labels = {}
    for item in args.label or ():
        key, separator, value = item.partition("=")
        if not separator or not key:
            print(f"error: invalid --label {item!r}; use KEY=VALUE", file=sys.stderr)
            return EXIT_USAGE
        labels[key] = value

    async def run() -> int:
        async with DispatcherClient(args.dispatcher, metadata=_metadata(args),
                                    credentials=_client_credentials) as client:
            try:
                target = await _with_progress(args, lambda: client.route(
                    args.capability, labels, timeout=args.timeout, no_wait=args.no_wait,
                    no_cold_start=args.no_cold_start), _target_final)
            except grpc.aio.AioRpcError as error:
                return _print_rpc_error(error, args.json, args.dispatcher)
        if args.json:
            print(json.dumps({"capability": args.capability, **_target_dict(target)}))
            return EXIT_OK
        print(target.endpoint_url)
        if not args.quiet:
            print(f"  slot {target.slot}  model {target.model or '-'}  state {target.state}  "
                  f"source {target.source}" + ("  (cold start)" if target.cold_start else ""),
                  file=sys.stderr)
        return EXIT_OK

    return _run_client(run())


def _print_table(rows: list[tuple[str, ...]]) -> None:
    """Print rows in aligned columns; the last column is not padded."""
    widths = [max(len(row[index]) for row in rows) for index in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[-1]]).rstrip())


def cmd_routes(args) -> int:
    import grpc

    from slotroute.dispatch.v1 import route_pb2, transport_pb2, transport_pb2_grpc

    async def run() -> int:
        async with _channel(args.dispatcher) as channel:
            stub = transport_pb2_grpc.TransportServiceStub(channel)
            try:
                answer = await stub.ListRoutes(
                    transport_pb2.ListRoutesRequest(include_prefetch=args.prefetch),
                    timeout=args.timeout, metadata=_metadata(args) or None)
            except grpc.aio.AioRpcError as error:
                return _print_rpc_error(error, args.json, args.dispatcher)
        routes = [{
            "model": entry.model,
            "aliases": list(entry.aliases),
            "tier": route_pb2.Tier.Name(entry.tier).removeprefix("TIER_"),
            "slot": entry.slot,
            "state": _state_name(entry.state),
            "capability": entry.capability,
            "source": entry.source,
        } for entry in answer.routes]
        if args.json:
            print(json.dumps({"routes": routes}, indent=2))
            return EXIT_OK
        rows = [("MODEL", "TIER", "SLOT", "STATE", "CAPABILITY", "SOURCE", "ALIASES")]
        for route in routes:
            rows.append((route["model"], route["tier"], route["slot"] or "-", route["state"],
                         route["capability"] or "-", route["source"] or "-",
                         ",".join(route["aliases"]) or "-"))
        _print_table(rows)
        return EXIT_OK

    return _run_client(run())


def _slot_dict(slot) -> dict[str, Any]:
    from google.protobuf import json_format

    return json_format.MessageToDict(slot, preserving_proto_field_name=True)


def cmd_slots(args) -> int:
    import grpc

    from slotroute.slot.v1 import slot_pb2, slot_pb2_grpc

    async def run() -> int:
        async with _channel(args.slotd) as channel:
            stub = slot_pb2_grpc.SlotServiceStub(channel)
            try:
                answer = await stub.ListSlots(slot_pb2.ListSlotsRequest(), timeout=args.timeout,
                                              metadata=_metadata(args) or None)
            except grpc.aio.AioRpcError as error:
                return _print_rpc_error(error, args.json, args.slotd)
        if args.json:
            print(json.dumps({"epoch": answer.epoch, "revision": answer.revision,
                              "slots": [_slot_dict(slot) for slot in answer.slots]}, indent=2))
            return EXIT_OK
        rows = [("SLOT", "STATE", "MODEL", "ENDPOINT", "PID", "GEN", "CAPABILITIES", "MESSAGE")]
        for slot in answer.slots:
            rows.append((
                slot.name,
                _state_name(slot.state),
                slot.model_id or "-",
                slot.endpoint_url or "-",
                str(slot.pid or "-"),
                str(slot.generation),
                ",".join(slot.capabilities),
                slot.message[:60],
            ))
        _print_table(rows)
        if not args.quiet:
            print(f"revision {answer.revision}, epoch {answer.epoch}", file=sys.stderr)
        return EXIT_OK

    return _run_client(run())


def _watch_line(event, started: float, heartbeats: bool) -> str | None:
    """Format one WatchSlots event as a line, or None to skip it."""
    from slotroute.slot.v1 import slot_pb2

    stamp = f"+{time.monotonic() - started:7.2f}s  r{event.revision:<6}"
    if event.type == slot_pb2.EVENT_TYPE_SLOT:
        slot = event.slot
        # pid and leases tell apart events that change only those fields.
        details = f"pid {slot.pid or '-'}, leases {slot.in_flight}"
        return (f"{stamp} {slot.name:<10} {_state_name(slot.state):<10} "
                f"{slot.model_id or '-':<24} {slot.message}  ({details})").rstrip()
    if event.type == slot_pb2.EVENT_TYPE_HEARTBEAT:
        return f"{stamp} heartbeat" if heartbeats else None
    if event.type == slot_pb2.EVENT_TYPE_CATALOG:
        return f"{stamp} catalog: {len(event.catalog)} models"
    if event.type == slot_pb2.EVENT_TYPE_SYNCED:
        return f"{stamp} synced"
    if event.type == slot_pb2.EVENT_TYPE_SLOT_REMOVED:
        return f"{stamp} {event.slot.name:<10} removed"
    return f"{stamp} {slot_pb2.EventType.Name(event.type)}"


def cmd_watch(args) -> int:
    import grpc
    from google.protobuf import json_format

    from slotroute.slot.v1 import slot_pb2, slot_pb2_grpc

    async def run() -> int:
        async with _channel(args.slotd) as channel:
            stub = slot_pb2_grpc.SlotServiceStub(channel)
            call = stub.WatchSlots(slot_pb2.WatchSlotsRequest(), timeout=args.timeout,
                                   metadata=_metadata(args) or None)
            started = time.monotonic()
            try:
                async for event in call:
                    if args.json:
                        if event.type == slot_pb2.EVENT_TYPE_HEARTBEAT and not args.heartbeats:
                            continue
                        print(json.dumps(json_format.MessageToDict(
                            event, preserving_proto_field_name=True)), flush=True)
                        continue
                    line = _watch_line(event, started, args.heartbeats)
                    if line is not None:
                        print(line, flush=True)
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.CANCELLED:
                    return EXIT_OK
                if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED and args.timeout:
                    return EXIT_OK  # --timeout ended the watch, as asked.
                return _print_rpc_error(error, args.json, args.slotd)
        # slotd ends the stream when it shuts down.
        print("stream ended by slotd", file=sys.stderr)
        return EXIT_RETRY

    # Ctrl+C is the normal way to stop watching.
    result = _run_client(run())
    return EXIT_OK if result == EXIT_INTERRUPTED else result


def cmd_load(args) -> int:
    import grpc

    from slotroute.slot.v1 import slot_pb2, slot_pb2_grpc

    async def run() -> int:
        async with _channel(args.slotd) as channel:
            stub = slot_pb2_grpc.SlotServiceStub(channel)
            request = slot_pb2.LoadModelRequest(slot=args.slot, model_id=args.model,
                                                wait=not args.no_wait)
            try:
                answer = await _with_progress(
                    args,
                    lambda: stub.LoadModel(request, timeout=args.timeout,
                                           metadata=_metadata(args) or None),
                    lambda answer: (answer.slot.name, answer.slot.state))
            except grpc.aio.AioRpcError as error:
                return _print_rpc_error(error, args.json, args.slotd)
        if args.json:
            print(json.dumps({"slot": _slot_dict(answer.slot), "joined": answer.joined,
                              "evicted": list(answer.evicted)}))
            return EXIT_OK
        slot = answer.slot
        line = f"{slot.name}: {_state_name(slot.state)} {slot.model_id} {slot.endpoint_url}"
        if answer.joined:
            line += " (already loaded or loading; joined it)"
        if answer.evicted:
            line += f" (evicted {', '.join(answer.evicted)})"
        print(line)
        return EXIT_OK

    return _run_client(run())


def cmd_unload(args) -> int:
    import grpc

    from slotroute.slot.v1 import slot_pb2, slot_pb2_grpc

    async def run() -> int:
        async with _channel(args.slotd) as channel:
            stub = slot_pb2_grpc.SlotServiceStub(channel)
            request = slot_pb2.UnloadModelRequest(slot=args.slot, force=args.force, wait=True)
            try:
                answer = await _with_progress(
                    args,
                    lambda: stub.UnloadModel(request, timeout=args.timeout,
                                             metadata=_metadata(args) or None),
                    lambda answer: (answer.slot.name, answer.slot.state))
            except grpc.aio.AioRpcError as error:
                return _print_rpc_error(error, args.json, args.slotd)
        if args.json:
            print(json.dumps({"slot": _slot_dict(answer.slot)}))
        else:
            print(f"{answer.slot.name}: {_state_name(answer.slot.state)}")
        return EXIT_OK

    return _run_client(run())


def cmd_reload(args) -> int:
    import grpc

    from slotroute.slot.v1 import slot_pb2, slot_pb2_grpc

    async def run() -> int:
        async with _channel(args.slotd) as channel:
            stub = slot_pb2_grpc.SlotServiceStub(channel)
            try:
                answer = await stub.ReloadConfig(slot_pb2.ReloadConfigRequest(), timeout=args.timeout,
                                                 metadata=_metadata(args) or None)
            except grpc.aio.AioRpcError as error:
                return _print_rpc_error(error, args.json, args.slotd)
        result = {field: list(getattr(answer, field))
                  for field in ("added", "removed", "restarted", "unchanged")}
        if args.json:
            print(json.dumps(result))
        else:
            for field, names in result.items():
                print(f"{field}: {', '.join(names) or '-'}")
        return EXIT_OK

    return _run_client(run())


def cmd_health(args) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async def run() -> int:
        shown = f"{args.address} service {args.service!r}" if args.service else args.address
        async with _channel(args.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                answer = await stub.Check(health_pb2.HealthCheckRequest(service=args.service),
                                          timeout=args.timeout, metadata=_metadata(args) or None)
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.NOT_FOUND:
                    status, code = "SERVICE_UNKNOWN", EXIT_NOT_FOUND
                    detail = f"unknown health service name {args.service!r}"
                else:
                    status, code = "UNREACHABLE", EXIT_RETRY
                    detail = f"{error.code().name}: {error.details()}"
            else:
                status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
                code = EXIT_OK if answer.status == health_pb2.HealthCheckResponse.SERVING else EXIT_RETRY
                detail = ""
        if args.json:
            payload = {"address": args.address, "service": args.service, "status": status}
            if detail:
                payload["detail"] = detail
            print(json.dumps(payload))
        elif code == EXIT_OK:
            if not args.quiet:
                print(f"{shown}: {status}")
        else:
            print(f"{shown}: {status}" + (f": {detail}" if detail else ""), file=sys.stderr)
        return code

    return _run_client(run())


# -- argument parsing -----------------------------------------------------------------


def _positive_seconds(text: str) -> float:
    """Parse a --timeout value: a finite number of seconds above zero."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"invalid timeout {text!r}; use a number of seconds above 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slotroute",
        description="Slot supervisor (slotd) and model dispatcher for a local AI box.",
        epilog="Exit codes: 0 ok, 1 error, 2 usage, 3 config, 4 not found, 5 retry later, "
               "6 rejected, 7 not allowed, 130 interrupted.",
    )
    parser.add_argument("--log-level", default=os.environ.get("SLOTROUTE_LOG_LEVEL", "info"),
                        choices=["debug", "info", "warning", "error"], help="log level (default: info)")
    parser.add_argument("--log-format", default=os.environ.get("SLOTROUTE_LOG_FORMAT", "text"),
                        choices=["text", "json"], help="log line format (default: text)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_server_commands(commands)

    sub = commands.add_parser("check-config", help="validate a config file and exit",
                              description="Validate a config file; exit 3 if it is invalid.")
    sub.add_argument("file", help="TOML config file")
    sub.add_argument("--json", action="store_true", help="print the summary or the error as JSON")
    sub.set_defaults(handler=cmd_check_config)

    _add_client_commands(commands)
    return parser


def _add_server_commands(commands) -> None:
    def server(name: str, help_text: str, handler) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--config", required=True, help="TOML config file")
        sub.add_argument("--allow-insecure-bind", action="store_true",
                         help="allow plaintext gRPC on a non-loopback address")
        sub.set_defaults(handler=handler)
        return sub

    def backend_hosts(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--backend-host", metavar="HOST",
                         help="address backends bind, what {host} expands to "
                              "(default: [slotd] backend_host or 127.0.0.1)")
        sub.add_argument("--advertise-host", metavar="HOST",
                         help="host written into endpoint URLs (default: [slotd] advertise_host, "
                              "else the backend host, or 127.0.0.1 for 0.0.0.0 and ::)")

    sub = server("slotd", "run the slot service", cmd_slotd)
    sub.add_argument("--listen", metavar="HOST:PORT", help="address to serve on (default: [slotd] listen)")
    backend_hosts(sub)

    sub = server("dispatcher", "run the dispatcher", cmd_dispatcher)
    sub.add_argument("--listen", metavar="HOST:PORT",
                     help="address to serve on (default: [dispatcher] listen)")
    sub.add_argument("--slotd", action="append", metavar="ADDR",
                     help="slotd address to subscribe to; repeat for several (default: [dispatcher] slotd)")

    sub = server("up", "run slotd and the dispatcher together in one process", cmd_up)
    sub.add_argument("--slotd-listen", metavar="HOST:PORT", help="address for slotd (default: [slotd] listen)")
    sub.add_argument("--dispatcher-listen", metavar="HOST:PORT",
                     help="address for the dispatcher (default: [dispatcher] listen)")
    backend_hosts(sub)


def _add_client_commands(commands) -> None:
    slotd_help = f"slotd address (default: $SLOTROUTE_SLOTD or {DEFAULT_SLOTD})"
    dispatcher_help = f"dispatcher address (default: $SLOTROUTE_DISPATCHER or {DEFAULT_DISPATCHER})"

    def client(name: str, help_text: str, handler, *, slotd: bool = True, dispatcher: bool = False,
               timeout: float | None = 120.0) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if slotd:
            shown_help = (slotd_help + "; progress lines come from it") if dispatcher else slotd_help
            sub.add_argument("--slotd", default=os.environ.get("SLOTROUTE_SLOTD", DEFAULT_SLOTD),
                             metavar="ADDR", help=shown_help)
        if dispatcher:
            sub.add_argument("--dispatcher", metavar="ADDR",
                             default=os.environ.get("SLOTROUTE_DISPATCHER", DEFAULT_DISPATCHER),
                             help=dispatcher_help)
        sub.add_argument("--json", action="store_true", help="print JSON for scripts")
        sub.add_argument("--quiet", "-q", action="store_true",
                         help="print only the result: no progress or details")
        shown = f"{timeout:g}" if timeout is not None else "none"
        sub.add_argument("--timeout", type=_positive_seconds, default=timeout, metavar="SECONDS",
                         help=f"deadline of the call in seconds (default: {shown})")
        sub.add_argument("--token-file", metavar="FILE",
                         help="file containing the bearer token (default: $SLOTROUTE_TOKEN)")
        sub.add_argument("--ca-file", metavar="FILE", default=os.environ.get("SLOTROUTE_CA_FILE"),
                         help="PEM CA certificate that signs the server's certificate; any TLS "
                              "option turns TLS on (default: $SLOTROUTE_CA_FILE)")
        sub.add_argument("--cert-file", metavar="FILE", default=os.environ.get("SLOTROUTE_CERT_FILE"),
                         help="PEM client certificate, for servers that require mutual TLS "
                              "(default: $SLOTROUTE_CERT_FILE)")
        sub.add_argument("--key-file", metavar="FILE", default=os.environ.get("SLOTROUTE_KEY_FILE"),
                         help="PEM key of --cert-file (default: $SLOTROUTE_KEY_FILE)")
        sub.set_defaults(handler=handler)
        return sub

    def wait_flags(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--no-wait", action="store_true",
                         help="fail with UNAVAILABLE instead of waiting for a load")
        sub.add_argument("--no-cold-start", action="store_true", help="never start a backend")

    sub = client("resolve", "print the endpoint URL for a model id", cmd_resolve, dispatcher=True)
    sub.add_argument("model", help="model id or alias")
    wait_flags(sub)

    sub = client("route", "print the endpoint URL of the best slot for a capability", cmd_route,
                 dispatcher=True)
    sub.add_argument("capability", help="chat, embed, rerank, stt, tts, image, vision, ...")
    sub.add_argument("--label", action="append", metavar="KEY=VALUE",
                     help="label the slot must carry; repeatable")
    wait_flags(sub)

    sub = client("routes", "list the model ids that resolve now, as a table", cmd_routes,
                 slotd=False, dispatcher=True, timeout=10.0)
    sub.add_argument("--prefetch", action="store_true",
                     help="also list catalog models that need a cold start")

    client("slots", "list slots as a table", cmd_slots, timeout=10.0)

    sub = client("watch", "stream slot state changes until Ctrl+C or --timeout", cmd_watch,
                 timeout=None)
    sub.add_argument("--heartbeats", action="store_true", help="also print heartbeats")

    sub = client("load", "load a model into a slot", cmd_load)
    sub.add_argument("slot")
    sub.add_argument("model", nargs="?", default="",
                     help="catalog model id (default: the slot's default model)")
    sub.add_argument("--no-wait", action="store_true", help="return once the load is accepted")

    sub = client("unload", "stop a slot's backend", cmd_unload)
    sub.add_argument("slot")
    sub.add_argument("--force", action="store_true", help="do not wait for leases to drain")

    client("reload", "make slotd reread its config file", cmd_reload, timeout=60.0)

    sub = client("health", "check a service through grpc.health.v1; exit 0 when SERVING",
                 cmd_health, slotd=False, timeout=5.0)
    sub.add_argument("--address", metavar="ADDR",
                     default=os.environ.get("SLOTROUTE_DISPATCHER", DEFAULT_DISPATCHER),
                     help=f"server to check (default: $SLOTROUTE_DISPATCHER or {DEFAULT_DISPATCHER})")
    sub.add_argument("--service", default="", metavar="NAME",
                     help="service name, such as slotroute.slot.v1.SlotService "
                          "(default: the whole server)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.log_level, args.log_format)
    _set_client_tls(args)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader of stdout went away (`slotroute slots | head`): not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
