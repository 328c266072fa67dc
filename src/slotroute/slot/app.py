"""Running slotd: config, manager, gRPC server, health, signals and shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal

from slotroute import rpc
from slotroute.slot.config import SlotdConfig, load_slotd_config
from slotroute.slot.manager import SlotManager
from slotroute.slot.service import SERVICE_NAME, SlotService, describe_change
from slotroute.slot.v1 import slot_pb2_grpc as _slot_pb2_grpc

logger = logging.getLogger("slotroute.slot")


class Slotd:
    """One running slotd. `start()` binds and serves; `stop()` shuts down gracefully."""

    def __init__(self, config: SlotdConfig):
        self.config = config
        self.manager = SlotManager(config)
        self.manager.table.add_listener(describe_change)
        self.servicer = SlotService(
            self.manager, heartbeat_interval=config.heartbeat_interval, reload=self.reload
        )
        self.service = rpc.Service(
            config.listen,
            [SERVICE_NAME],
            lambda server: _slot_pb2_grpc.add_SlotServiceServicer_to_server(self.servicer, server),
        )
        self._stopped = False

    @property
    def address(self) -> str:
        return self.service.address

    async def start(self) -> None:
        await self.manager.start()
        await self.service.start()
        await self.service.set_serving(True)
        logger.info("slotd listening on %s epoch=%s slots=%d config=%s",
                    self.address, self.manager.log.epoch, len(self.config.slots), self.config.path)

    async def reload(self) -> dict[str, list[str]]:
        """Reread the config file and apply the difference; raise ValueError if invalid."""
        new_config = load_slotd_config(self.config.path, listen=self.config.listen)
        result = await self.manager.reload(new_config)
        self.config = new_config
        logger.info("slotd config reloaded from %s: %s", self.config.path, result)
        return result

    async def stop(self) -> None:
        """Health NOT_SERVING, streams ended, backends stopped, server closed."""
        if self._stopped:
            return
        self._stopped = True
        logger.info("slotd stopping: ending streams and stopping backends")
        await self.service.set_serving(False)
        self.servicer.close_streams()
        try:
            async with asyncio.timeout(self.config.shutdown_grace):
                await self.manager.shutdown()
        except TimeoutError:
            logger.warning("slotd backends did not stop within %.1f s; killing them",
                           self.config.shutdown_grace)
            await self.manager.kill_all()
        await self.service.stop(grace=1.0)
        logger.info("slotd stopped")


async def serve(config: SlotdConfig, stop: asyncio.Event, ready: asyncio.Event | None = None) -> int:
    """Run slotd until `stop` is set; SIGHUP reloads the config."""
    slotd = Slotd(config)
    loop = asyncio.get_running_loop()
    await slotd.start()

    def on_hangup() -> None:
        async def reload() -> None:
            try:
                await slotd.reload()
            except ValueError as error:
                logger.error("config reload rejected, the running config stays: %s", error)
        asyncio.ensure_future(reload())

    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        await slotd.stop()
    return 0
