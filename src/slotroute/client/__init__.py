"""Python clients for internal services: resolve models, route capabilities, follow slots.

    async with DispatcherClient("127.0.0.1:50052") as client:
        target = await client.resolve("kokoro", timeout=30)
        print(target.endpoint_url)

    async with SlotCache("127.0.0.1:50051") as cache:
        await cache.wait_synced(timeout=5)
        url = cache.endpoint_for("kokoro")   # a local lookup; None if not READY

DispatcherClient failures raise grpc.aio.AioRpcError; `slotroute.rpc.error_details(error)`
extracts its google.rpc ErrorInfo and RetryInfo.
"""

from slotroute.client.cache import SlotCache
from slotroute.client.dispatcher import DispatcherClient, Target

__all__ = ["DispatcherClient", "SlotCache", "Target"]
