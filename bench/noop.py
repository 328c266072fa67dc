"""The no-op baseline server: TransportService.Resolve returning a constant response.

It is built like the dispatcher's server: `slotroute.rpc.Service` (the same
server options, health and reflection services) with a unary handler for
/slotroute.dispatch.v1.TransportService/Resolve that deserializes a
ResolveRequest and serializes a ResolveResponse, as the generated code
registers it. The handler does no work: it returns one prebuilt response,
normally the bytes of a real dispatcher response, so both servers send equal
payloads.

Run: python bench/noop.py --listen 127.0.0.1:PORT [--response-hex HEX] [--uvloop]
"""

from __future__ import annotations

import argparse
import asyncio

import grpc
from common import use_uvloop

from slotroute import rpc
from slotroute.dispatch.service import TRANSPORT_SERVICE
from slotroute.dispatch.v1 import route_pb2, transport_pb2


def build_handlers(response: transport_pb2.ResolveResponse) -> dict[str, grpc.RpcMethodHandler]:
    async def resolve(request: transport_pb2.ResolveRequest, context) -> transport_pb2.ResolveResponse:
        return response

    return {
        "Resolve": grpc.unary_unary_rpc_method_handler(
            resolve,
            request_deserializer=transport_pb2.ResolveRequest.FromString,
            response_serializer=transport_pb2.ResolveResponse.SerializeToString,
        ),
    }


def register(server: grpc.aio.Server, response: transport_pb2.ResolveResponse) -> None:
    handlers = build_handlers(response)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(TRANSPORT_SERVICE, handlers),))
    server.add_registered_method_handlers(TRANSPORT_SERVICE, handlers)


def default_response() -> transport_pb2.ResolveResponse:
    """Return a response shaped like a REGISTRY response, for runs without --response-hex."""
    return transport_pb2.ResolveResponse(
        model="bench-chat",
        tier=route_pb2.TIER_REGISTRY,
        target=route_pb2.Target(source="127.0.0.1:50051", slot="chat",
                                endpoint_url="http://127.0.0.1:45000", state=4, revision=1,
                                model_id="bench-chat"),
    )


async def serve(listen: str, response: transport_pb2.ResolveResponse) -> None:
    service = rpc.Service(listen, [TRANSPORT_SERVICE], lambda server: register(server, response))
    await service.start()
    await service.set_serving(True)

    async def run(stop: asyncio.Event) -> int:
        await stop.wait()
        return 0

    try:
        await rpc.run_until_signal(run)
    finally:
        await service.stop(grace=0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT to serve on")
    parser.add_argument("--response-hex", default="",
                        help="serialized ResolveResponse to return, as hex (default: a fixed REGISTRY response)")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop's event loop")
    args = parser.parse_args()

    if args.response_hex:
        response = transport_pb2.ResolveResponse.FromString(bytes.fromhex(args.response_hex))
    else:
        response = default_response()
    use_uvloop(args.uvloop)
    asyncio.run(serve(args.listen, response))


if __name__ == "__main__":
    main()
