"""Running slotd: config, manager, gRPC server, health, signals and shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal

from slotroute import metrics, rpc, security
from slotroute.slot.config import SlotdConfig, load_slotd_config
from slotroute.slot.manager import SlotManager
from slotroute.slot.service import SERVICE_NAME, SlotService, describe_change
from slotroute.slot.v1 import slot_pb2_grpc as _slot_pb2_grpc

logger = logging.getLogger("slotroute.slot")


class Slotd:
    """One running slotd. `start()` binds and serves; `stop()` shuts down gracefully."""

    def __init__(self, config: SlotdConfig):
        self.config = config
        # Raises SecurityError, before anything binds, on a plaintext non-loopback listen
        # address or an unreadable certificate or token.
        self.security = security.slotd_security(config)
        self.manager = SlotManager(config)
        self.manager.watchdog.on_change = self._stall_changed
        self.manager.table.add_listener(describe_change)
        self.metrics = metrics.SlotdMetrics(lambda: self.manager)
        self.manager.table.add_listener(self.metrics.on_change)
        self.servicer = SlotService(
            self.manager, heartbeat_interval=config.heartbeat_interval, reload=self.reload
        )
        self.service = rpc.Service(
            config.listen,
            [SERVICE_NAME],
            lambda server: _slot_pb2_grpc.add_SlotServiceServicer_to_server(self.servicer, server),
            interceptors=self.security.interceptors,
            credentials=self.security.credentials,
        )
        self._stopped = False

    @property
    def address(self) -> str:
        return self.service.address

    async def start(self) -> None:
        self.metrics.serve(self.config.ops.metrics_listen)
        logger.info("slotd transport: %s; metrics: %s", self.security.summary, self.metrics.url or "off")
        await self.manager.start()
        await self.service.start()
        await self.service.set_serving(True)
        logger.info("slotd listening on %s epoch=%s slots=%d config=%s",
                    self.address, self.manager.log.epoch, len(self.config.slots), self.config.path)

    async def _stall_changed(self, stalled: bool) -> None:
        # Health is NOT_SERVING while a load step is stuck; after stop() began it stays so.
        if not self._stopped:
            await self.service.set_serving(not stalled)

    async def reload(self) -> dict[str, list[str]]:
        """Reread the config file and apply the difference; raise ValueError if invalid."""
        new_config = load_slotd_config(self.config.path, listen=self.config.listen,
                                       **self.config.host_overrides)
        result = await self.manager.reload(new_config)
        if new_config.ops != self.config.ops:
            logger.warning("slotd config reload: metrics, TLS, token and bind settings changed "
                           "but apply only after a restart; the running ones stay")
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
        await self.metrics.close()
        logger.info("slotd stopped")


async def _reload_on_hangup(slotd: Slotd) -> None:
    try:
        await slotd.reload()
    except ValueError as error:
        logger.error("config reload rejected, the running config stays: %s", error)
    except Exception:
        logger.exception("config reload failed")


async def serve(config: SlotdConfig, stop: asyncio.Event, ready: asyncio.Event | None = None) -> int:
    """Run slotd until `stop` is set; SIGHUP reloads the config."""
    slotd = Slotd(config)
    loop = asyncio.get_running_loop()
    # The loop keeps only weak references to tasks, so the running reloads are held here.
    reloads: set[asyncio.Task[None]] = set()

    def on_hangup() -> None:
        task = asyncio.create_task(_reload_on_hangup(slotd))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    try:
        # Inside the try: a start that fails after preloads began still stops their backends.
        await slotd.start()
        loop.add_signal_handler(signal.SIGHUP, on_hangup)
        if ready is not None:
            ready.set()
        await stop.wait()
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        await slotd.stop()
    return 0
