"""The `slotroute` command: run the services and talk to them.

Exit codes, for scripts:
  0  success
  1  unexpected error
  2  usage error
  3  invalid config file
  4  not found (NOT_FOUND): unknown model, slot or capability
  5  try again later (UNAVAILABLE, DEADLINE_EXCEEDED, ABORTED)
  6  refused as asked (FAILED_PRECONDITION, RESOURCE_EXHAUSTED, INVALID_ARGUMENT)
  7  not allowed (UNAUTHENTICATED, PERMISSION_DENIED)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Sequence

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 3
EXIT_NOT_FOUND = 4
EXIT_RETRY = 5
EXIT_REFUSED = 6
EXIT_DENIED = 7

_EXIT_FOR_CODE = {
    "NOT_FOUND": EXIT_NOT_FOUND,
    "UNAVAILABLE": EXIT_RETRY,
    "DEADLINE_EXCEEDED": EXIT_RETRY,
    "ABORTED": EXIT_RETRY,
    "FAILED_PRECONDITION": EXIT_REFUSED,
    "RESOURCE_EXHAUSTED": EXIT_REFUSED,
    "INVALID_ARGUMENT": EXIT_REFUSED,
    "UNAUTHENTICATED": EXIT_DENIED,
    "PERMISSION_DENIED": EXIT_DENIED,
}

DEFAULT_SLOTD = "127.0.0.1:50051"
DEFAULT_DISPATCHER = "127.0.0.1:50052"


def _setup_logging(level: str, log_format: str) -> None:
    from slotroute import logs

    logs.configure(level, log_format)


# -- server commands ----------------------------------------------------------------


def _load_configs(args, slotd: bool, dispatcher: bool):
    from slotroute.configfile import ConfigError
    from slotroute.dispatch.config import load_dispatcher_config
    from slotroute.slot.config import load_slotd_config

    try:
        slotd_config = load_slotd_config(args.config, listen=getattr(args, "slotd_listen", None) or (
            args.listen if slotd and not dispatcher else None)) if slotd else None
        if dispatcher:
            listen = getattr(args, "dispatcher_listen", None) or (args.listen if not slotd else None)
            sources = list(getattr(args, "slotd", None) or [])
            if slotd and not sources and slotd_config is not None:
                sources = [slotd_config.listen]
            dispatcher_config = load_dispatcher_config(args.config, listen=listen, sources=sources or None)
        else:
            dispatcher_config = None
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None
    return slotd_config, dispatcher_config


def _check_bind(address: str, allow_insecure: bool) -> None:
    from slotroute.netaddr import is_loopback, parse_listen

    host, _port = parse_listen(address)
    if not is_loopback(host) and not allow_insecure:
        print(
            f"error: refusing to serve plaintext on non-loopback address {address}; "
            "bind to 127.0.0.1, configure TLS, or pass --allow-insecure-bind",
            file=sys.stderr,
        )
        raise SystemExit(EXIT_CONFIG)


def cmd_slotd(args) -> int:
    from slotroute import rpc
    from slotroute.slot import app

    slotd_config, _ = _load_configs(args, slotd=True, dispatcher=False)
    _check_bind(slotd_config.listen, args.allow_insecure_bind)
    return asyncio.run(rpc.run_until_signal(lambda stop: app.serve(slotd_config, stop)))


def cmd_dispatcher(args) -> int:
    from slotroute import rpc
    from slotroute.dispatch import app

    _, dispatcher_config = _load_configs(args, slotd=False, dispatcher=True)
    _check_bind(dispatcher_config.listen, args.allow_insecure_bind)
    return asyncio.run(rpc.run_until_signal(lambda stop: app.serve(dispatcher_config, stop)))


def cmd_up(args) -> int:
    from slotroute import rpc
    from slotroute.dispatch import app as dispatch_app
    from slotroute.slot import app as slot_app

    slotd_config, dispatcher_config = _load_configs(args, slotd=True, dispatcher=True)
    _check_bind(slotd_config.listen, args.allow_insecure_bind)
    _check_bind(dispatcher_config.listen, args.allow_insecure_bind)

    async def both(stop: asyncio.Event) -> int:
        ready = asyncio.Event()
        slotd_task = asyncio.create_task(slot_app.serve(slotd_config, stop, ready))
        await ready.wait()
        try:
            await dispatch_app.serve(dispatcher_config, stop)
        finally:
            stop.set()
            await slotd_task
        return 0

    return asyncio.run(rpc.run_until_signal(both))


def cmd_check_config(args) -> int:
    from slotroute.configfile import ConfigError, load_toml
    from slotroute.dispatch.config import load_dispatcher_config
    from slotroute.slot.config import load_slotd_config

    try:
        document = load_toml(args.file if hasattr(args.file, "open") else __import__("pathlib").Path(args.file))
        summary = {}
        if "slotd" in document:
            config = load_slotd_config(args.file)
            summary["slotd"] = {
                "listen": config.listen,
                "devices": [device.name for device in config.devices],
                "slots": [slot.name for slot in config.slots],
                "models": [model.id for model in config.models],
            }
        if "dispatcher" in document:
            config = load_dispatcher_config(args.file)
            summary["dispatcher"] = {
                "listen": config.listen,
                "sources": list(config.sources),
                "registry": [entry.id for entry in config.entries],
            }
        if not summary:
            raise ConfigError(args.file, "file", None,
                              "neither a [slotd] nor a [dispatcher] section; add at least one")
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    if args.json:
        print(json.dumps({"valid": True, **summary}, indent=2))
    else:
        print(f"{args.file}: valid")
        for section, facts in summary.items():
            for key, value in facts.items():
                shown = ", ".join(value) if isinstance(value, list) else value
                print(f"  {section}.{key}: {shown}")
    return EXIT_OK


# -- client commands ----------------------------------------------------------------


def _metadata(args) -> tuple[tuple[str, str], ...]:
    token = os.environ.get("SLOTROUTE_TOKEN", "")
    token_file = getattr(args, "token_file", None)
    if token_file:
        with open(token_file, encoding="utf-8") as handle:
            token = handle.read().strip()
    return (("authorization", f"Bearer {token}"),) if token else ()


def _channel(address: str):
    import grpc

    from slotroute import rpc

    return grpc.aio.insecure_channel(address, options=rpc.CLIENT_OPTIONS)


def _print_rpc_error(error, as_json: bool) -> int:
    from slotroute import rpc

    info, retry_after = rpc.error_details(error)
    code = error.code().name
    if as_json:
        payload = {"error": {"code": code, "message": error.details()}}
        if info is not None:
            payload["error"].update(reason=info.reason, domain=info.domain, metadata=dict(info.metadata))
        if retry_after is not None:
            payload["error"]["retry_after_seconds"] = retry_after
        print(json.dumps(payload), file=sys.stderr)
    else:
        print(f"error: {code}: {error.details()}", file=sys.stderr)
        if info is not None:
            print(f"  reason: {info.reason} ({info.domain})", file=sys.stderr)
            for key, value in sorted(info.metadata.items()):
                if value:
                    print(f"  {key}: {value}", file=sys.stderr)
        if retry_after is not None:
            print(f"  retry after: {retry_after:.1f} s", file=sys.stderr)
    return _EXIT_FOR_CODE.get(code, EXIT_ERROR)


async def _progress(slotd: str, started: float, out, stop: asyncio.Event) -> None:
    """Print each slot state change seen on slotd's stream until `stop` is set."""
    import grpc

    from slotroute.slot.v1 import slot_pb2, slot_pb2_grpc

    async with _channel(slotd) as channel:
        stub = slot_pb2_grpc.SlotServiceStub(channel)
        call = stub.WatchSlots(slot_pb2.WatchSlotsRequest())
        last: dict[str, int] = {}
        try:
            async for event in call:
                if event.type != slot_pb2.EVENT_TYPE_SLOT:
                    continue
                slot = event.slot
                if event.snapshot:
                    last[slot.name] = slot.state
                    continue
                if last.get(slot.name) == slot.state:
                    continue
                last[slot.name] = slot.state
                state = slot_pb2.SlotState.Name(slot.state).removeprefix("SLOT_STATE_")
                print(f"  +{time.monotonic() - started:6.2f}s  {slot.name:<10} {state:<10} "
                      f"{slot.model_id or '-'}  {slot.message}", file=out, flush=True)
                if stop.is_set():
                    break
        except grpc.aio.AioRpcError:
            return
        finally:
            call.cancel()


async def _with_progress(args, call):
    """Run `call()` while printing slotd's state changes to stderr (unless --quiet or --json)."""
    if args.json or args.quiet or not args.slotd:
        return await call()
    stop = asyncio.Event()
    watcher = asyncio.create_task(_progress(args.slotd, time.monotonic(), sys.stderr, stop))
    try:
        return await call()
    finally:
        stop.set()
        await asyncio.sleep(0.05)
        watcher.cancel()
        try:
            await watcher
        except asyncio.CancelledError:
            pass


def _target_dict(target) -> dict:
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


def cmd_resolve(args) -> int:
    import grpc

    from slotroute.client import DispatcherClient

    async def run() -> int:
        async with DispatcherClient(args.dispatcher, metadata=_metadata(args)) as client:
            try:
                target = await _with_progress(args, lambda: client.resolve(
                    args.model, timeout=args.timeout, no_wait=args.no_wait,
                    no_cold_start=args.no_cold_start))
            except grpc.aio.AioRpcError as error:
                return _print_rpc_error(error, args.json)
        if args.json:
            print(json.dumps(_target_dict(target)))
        else:
            print(target.endpoint_url)
            if not args.quiet:
                print(f"  model {target.model}  slot {target.slot}  tier {target.tier}  "
                      f"state {target.state}  source {target.source}", file=sys.stderr)
        return EXIT_OK

    return asyncio.run(run())


def cmd_route(args) -> int:
    import grpc

    from slotroute.client import DispatcherClient

    labels = {}
    for item in args.label or ():
        key, separator, value = item.partition("=")
        if not separator:
            print(f"error: invalid --label {item!r}; use KEY=VALUE", file=sys.stderr)
            return 2
        labels[key] = value

    async def run() -> int:
        async with DispatcherClient(args.dispatcher, metadata=_metadata(args)) as client:
            try:
                target = await _with_progress(args, lambda: client.route(
                    args.capability, labels, timeout=args.timeout, no_wait=args.no_wait,
                    no_cold_start=args.no_cold_start))
            except grpc.aio.AioRpcError as error:
                return _print_rpc_error(error, args.json)
        if args.json:
            print(json.dumps(_target_dict(target)))
        else:
            print(target.endpoint_url)
            if not args.quiet:
                print(f"  slot {target.slot}  model {target.model or '-'}  state {target.state}  "
                      f"source {target.source}", file=sys.stderr)
        return EXIT_OK

    return asyncio.run(run())


def _slot_dict(slot) -> dict:
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
                return _print_rpc_error(error, args.json)
        if args.json:
            print(json.dumps({"epoch": answer.epoch, "revision": answer.revision,
                              "slots": [_slot_dict(slot) for slot in answer.slots]}, indent=2))
            return EXIT_OK
        rows = [("SLOT", "STATE", "MODEL", "ENDPOINT", "PID", "GEN", "CAPABILITIES", "MESSAGE")]
        for slot in answer.slots:
            rows.append((
                slot.name,
                slot_pb2.SlotState.Name(slot.state).removeprefix("SLOT_STATE_"),
                slot.model_id or "-",
                slot.endpoint_url or "-",
                str(slot.pid or "-"),
                str(slot.generation),
                ",".join(slot.capabilities),
                slot.message[:60],
            ))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
        for row in rows:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
        print(f"revision {answer.revision}, epoch {answer.epoch}", file=sys.stderr)
        return EXIT_OK

    return asyncio.run(run())


def cmd_watch(args) -> int:
    import grpc

    from slotroute.slot.v1 import slot_pb2, slot_pb2_grpc

    async def run() -> int:
        async with _channel(args.slotd) as channel:
            stub = slot_pb2_grpc.SlotServiceStub(channel)
            call = stub.WatchSlots(slot_pb2.WatchSlotsRequest(), metadata=_metadata(args) or None)
            started = time.monotonic()
            try:
                async for event in call:
                    kind = slot_pb2.EventType.Name(event.type).removeprefix("EVENT_TYPE_")
                    if args.json:
                        from google.protobuf import json_format
                        print(json.dumps(json_format.MessageToDict(
                            event, preserving_proto_field_name=True)), flush=True)
                        continue
                    stamp = f"+{time.monotonic() - started:7.2f}s  r{event.revision:<6}"
                    if event.type == slot_pb2.EVENT_TYPE_SLOT:
                        slot = event.slot
                        state = slot_pb2.SlotState.Name(slot.state).removeprefix("SLOT_STATE_")
                        print(f"{stamp} {slot.name:<10} {state:<10} {slot.model_id or '-':<24} "
                              f"{slot.message}", flush=True)
                    elif event.type == slot_pb2.EVENT_TYPE_HEARTBEAT and not args.heartbeats:
                        continue
                    elif event.type == slot_pb2.EVENT_TYPE_CATALOG:
                        print(f"{stamp} catalog: {len(event.catalog)} models", flush=True)
                    else:
                        print(f"{stamp} {kind} {event.slot.name}", flush=True)
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.CANCELLED:
                    return EXIT_OK
                return _print_rpc_error(error, args.json)
        return EXIT_OK

    try:
        return asyncio.run(run())
    except KeyboardInterrupt:
        return EXIT_OK


def cmd_load(args) -> int:
    import grpc

    from slotroute.slot.v1 import slot_pb2, slot_pb2_grpc

    async def run() -> int:
        async with _channel(args.slotd) as channel:
            stub = slot_pb2_grpc.SlotServiceStub(channel)
            request = slot_pb2.LoadModelRequest(slot=args.slot, model_id=args.model, wait=not args.no_wait)
            try:
                answer = await _with_progress(args, lambda: stub.LoadModel(
                    request, timeout=args.timeout, metadata=_metadata(args) or None))
            except grpc.aio.AioRpcError as error:
                return _print_rpc_error(error, args.json)
        if args.json:
            print(json.dumps({"slot": _slot_dict(answer.slot), "joined": answer.joined,
                              "evicted": list(answer.evicted)}))
        else:
            state = slot_pb2.SlotState.Name(answer.slot.state).removeprefix("SLOT_STATE_")
            print(f"{answer.slot.name}: {state} {answer.slot.model_id} {answer.slot.endpoint_url}"
                  + (" (joined a load in progress)" if answer.joined else "")
                  + (f" (evicted {', '.join(answer.evicted)})" if answer.evicted else ""))
        return EXIT_OK

    return asyncio.run(run())


def cmd_unload(args) -> int:
    import grpc

    from slotroute.slot.v1 import slot_pb2, slot_pb2_grpc

    async def run() -> int:
        async with _channel(args.slotd) as channel:
            stub = slot_pb2_grpc.SlotServiceStub(channel)
            request = slot_pb2.UnloadModelRequest(slot=args.slot, force=args.force, wait=True)
            try:
                answer = await _with_progress(args, lambda: stub.UnloadModel(
                    request, timeout=args.timeout, metadata=_metadata(args) or None))
            except grpc.aio.AioRpcError as error:
                return _print_rpc_error(error, args.json)
        if args.json:
            print(json.dumps({"slot": _slot_dict(answer.slot)}))
        else:
            state = slot_pb2.SlotState.Name(answer.slot.state).removeprefix("SLOT_STATE_")
            print(f"{answer.slot.name}: {state}")
        return EXIT_OK

    return asyncio.run(run())


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
                return _print_rpc_error(error, args.json)
        result = {field: list(getattr(answer, field))
                  for field in ("added", "removed", "restarted", "unchanged")}
        if args.json:
            print(json.dumps(result))
        else:
            for field, names in result.items():
                print(f"{field}: {', '.join(names) or '-'}")
        return EXIT_OK

    return asyncio.run(run())


# -- argument parsing -----------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slotroute",
        description="Slot supervisor (slotd) and model dispatcher for a local AI box.",
        epilog="Exit codes: 0 ok, 1 error, 2 usage, 3 config, 4 not found, 5 retry later, "
               "6 refused, 7 not allowed.",
    )
    parser.add_argument("--log-level", default=os.environ.get("SLOTROUTE_LOG_LEVEL", "info"),
                        choices=["debug", "info", "warning", "error"], help="log level (default: info)")
    parser.add_argument("--log-format", default=os.environ.get("SLOTROUTE_LOG_FORMAT", "text"),
                        choices=["text", "json"], help="log line format (default: text)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def server(name: str, help_text: str, handler) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--config", required=True, help="TOML config file")
        sub.add_argument("--allow-insecure-bind", action="store_true",
                         help="allow plaintext gRPC on a non-loopback address")
        sub.set_defaults(handler=handler)
        return sub

    sub = server("slotd", "run the slot service", cmd_slotd)
    sub.add_argument("--listen", help="HOST:PORT to serve on (default: [slotd] listen)")
    sub = server("dispatcher", "run the dispatcher", cmd_dispatcher)
    sub.add_argument("--listen", help="HOST:PORT to serve on (default: [dispatcher] listen)")
    sub.add_argument("--slotd", action="append", metavar="ADDR",
                     help="slotd address to subscribe to; repeat for several (default: [dispatcher] slotd)")
    sub = server("up", "run slotd and the dispatcher together in one process", cmd_up)
    sub.add_argument("--slotd-listen", help="HOST:PORT for slotd (default: [slotd] listen)")
    sub.add_argument("--dispatcher-listen", help="HOST:PORT for the dispatcher (default: [dispatcher] listen)")

    sub = commands.add_parser("check-config", help="validate a config file and exit")
    sub.add_argument("file", help="TOML config file")
    sub.add_argument("--json", action="store_true", help="print the summary as JSON")
    sub.set_defaults(handler=cmd_check_config)

    def client(name: str, help_text: str, handler, *, dispatcher: bool) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--slotd", default=os.environ.get("SLOTROUTE_SLOTD", DEFAULT_SLOTD),
                         help=f"slotd address (default: $SLOTROUTE_SLOTD or {DEFAULT_SLOTD})")
        if dispatcher:
            sub.add_argument("--dispatcher",
                             default=os.environ.get("SLOTROUTE_DISPATCHER", DEFAULT_DISPATCHER),
                             help=f"dispatcher address (default: $SLOTROUTE_DISPATCHER or {DEFAULT_DISPATCHER})")
        sub.add_argument("--json", action="store_true", help="print JSON for scripts")
        sub.add_argument("--quiet", "-q", action="store_true", help="print only the result")
        sub.add_argument("--timeout", type=float, default=120.0, help="deadline in seconds (default: 120)")
        sub.add_argument("--token-file", help="file holding the bearer token (default: $SLOTROUTE_TOKEN)")
        sub.set_defaults(handler=handler)
        return sub

    sub = client("resolve", "print the endpoint URL for a model id", cmd_resolve, dispatcher=True)
    sub.add_argument("model", help="model id or alias")
    sub.add_argument("--no-wait", action="store_true", help="fail with UNAVAILABLE instead of waiting for a load")
    sub.add_argument("--no-cold-start", action="store_true", help="never start a backend")
    sub = client("route", "print the endpoint URL of the best slot for a capability", cmd_route,
                 dispatcher=True)
    sub.add_argument("capability", help="chat, embed, rerank, stt, tts, image, vision, ...")
    sub.add_argument("--label", action="append", metavar="KEY=VALUE", help="required slot label; repeatable")
    sub.add_argument("--no-wait", action="store_true", help="fail with UNAVAILABLE instead of waiting for a load")
    sub.add_argument("--no-cold-start", action="store_true", help="never start a backend")
    client("slots", "list slots as a table", cmd_slots, dispatcher=False)
    sub = client("watch", "stream slot state changes", cmd_watch, dispatcher=False)
    sub.add_argument("--heartbeats", action="store_true", help="also print heartbeats")
    sub = client("load", "load a model into a slot", cmd_load, dispatcher=False)
    sub.add_argument("slot")
    sub.add_argument("model", nargs="?", default="", help="catalog model id (default: the slot's default model)")
    sub.add_argument("--no-wait", action="store_true", help="return once the load is accepted")
    sub = client("unload", "stop a slot's backend", cmd_unload, dispatcher=False)
    sub.add_argument("slot")
    sub.add_argument("--force", action="store_true", help="do not wait for leases to drain")
    client("reload", "make slotd reread its config file", cmd_reload, dispatcher=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.log_level, args.log_format)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
