"""The Python client for internal services: resolve models and route capabilities.

    async with DispatcherClient("127.0.0.1:50052") as client:
        target = await client.resolve("kokoro", timeout=30)
        print(target.endpoint_url)

Failures raise grpc.aio.AioRpcError; `slotroute.rpc.error_details(error)`
extracts its google.rpc ErrorInfo and RetryInfo.
"""

from slotroute.client.dispatcher import DispatcherClient, Target

__all__ = ["DispatcherClient", "Target"]
