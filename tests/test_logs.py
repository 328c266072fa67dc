"""Log output: JSON lines, repeat limiting, redaction, and a real `slotroute up` process."""

import asyncio
import json
import logging
import pathlib
import signal
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import free_port, model, slot, subprocess_env, write_config

from slotroute import logs, security
from slotroute.dispatch.v1 import transport_pb2, transport_pb2_grpc
from slotroute.slot.v1 import slot_pb2, slot_pb2_grpc

TOKEN = "log-test-token-5f1c2a9e7b3d4c6a"


def _record(message: str, *args, level: int = logging.INFO, name: str = "slotroute.test",
            **extra) -> logging.LogRecord:
    record = logging.LogRecord(name, level, __file__, 1, message, args or None, None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- formatter ----------------------------------------------------------------------------


def test_json_line_fields():
    formatter = logs.JsonFormatter()
    record = _record("slot=%s READY", "a", slot="a", revision=7)
    try:
        raise ValueError("boom")
    except ValueError:
        record.exc_info = sys.exc_info()

    payload = json.loads(formatter.format(record))

    assert payload["level"] == "info"
    assert payload["logger"] == "slotroute.test"
    assert payload["message"] == "slot=a READY"
    assert payload["slot"] == "a"
    assert payload["revision"] == 7
    assert "ValueError: boom" in payload["exception"]
    assert payload["time"].endswith("Z")


# -- repeat filter ------------------------------------------------------------------------


def test_repeats_limited_then_summarized():
    clock = FakeClock()
    summaries = []
    repeats = logs.RepeatFilter(limit=3, interval=10.0, emit=summaries.append, clock=clock)

    passed = [repeats.filter(_record("source=%s watch failed", "x")) for _ in range(5)]
    other = repeats.filter(_record("source=%s watch failed", "y"))
    clock.now += 10.0
    after = repeats.filter(_record("source=%s watch failed", "x"))

    assert passed == [True, True, True, False, False]
    assert other is True
    assert after is True
    assert repeats.suppressed_total == 2
    assert len(summaries) == 1
    assert summaries[0].getMessage() == "suppressed 2 repeats in the last 10 s: source=x watch failed"
    assert summaries[0].levelno == logging.INFO
    assert summaries[0].name == "slotroute.test"


def test_repeats_keyed_by_level_and_logger():
    repeats = logs.RepeatFilter(limit=1, interval=60.0, clock=FakeClock())

    first = repeats.filter(_record("same"))
    as_warning = repeats.filter(_record("same", level=logging.WARNING))
    other_logger = repeats.filter(_record("same", name="slotroute.other"))
    again = repeats.filter(_record("same"))

    assert (first, as_warning, other_logger, again) == (True, True, True, False)


def test_repeats_flush_emits_open_windows():
    summaries = []
    repeats = logs.RepeatFilter(limit=1, interval=60.0, emit=summaries.append, clock=FakeClock())
    for _ in range(4):
        repeats.filter(_record("again"))

    repeats.flush()

    assert [summary.getMessage() for summary in summaries] == \
        ["suppressed 3 repeats in the last 0 s: again"]


def test_repeat_summary_through_handler(capsys):
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logs.JsonFormatter())
    repeats = logs.protect_handler(handler, repeat_limit=2, repeat_interval=60.0)
    repeats._clock = clock = FakeClock()
    logger = logging.getLogger("slotroute.test.repeats")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        for _ in range(5):
            logger.warning("backend on port %d refused", 41000)
        clock.now += 61.0
        logger.warning("unrelated line")
    finally:
        logger.removeHandler(handler)
        logger.propagate = True

    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [line["message"] for line in lines] == [
        "backend on port 41000 refused",
        "backend on port 41000 refused",
        "suppressed 3 repeats in the last 61 s: backend on port 41000 refused",
        "unrelated line",
    ]
    assert lines[2]["repeat_summary"] is True
    assert lines[2]["level"] == "warning"


# -- redaction ----------------------------------------------------------------------------


def test_redact_registered_secret_everywhere():
    secret = "redact-me-0123456789abcdef"
    logs.register_secret(secret)
    redactor = logs.RedactFilter()
    record = _record("request with %s failed", secret, header=f"Bearer {secret}")
    try:
        raise RuntimeError(f"token {secret} rejected")
    except RuntimeError:
        record.exc_info = sys.exc_info()

    assert redactor.filter(record) is True
    line = logs.JsonFormatter().format(record)

    assert secret not in line
    payload = json.loads(line)
    assert payload["message"] == "request with [REDACTED] failed"
    assert payload["header"] == "Bearer [REDACTED]"
    assert "token [REDACTED] rejected" in payload["exception"]


def test_redact_bearer_pattern():
    cases = {
        "authorization: Bearer abc.def-ghi": "authorization: Bearer [REDACTED]",
        "('authorization', 'bearer xyz')": "('authorization', 'bearer [REDACTED]')",
        "no credentials here": "no credentials here",
    }
    for text, expected in cases.items():
        assert logs.redact(text, ()) == expected


# -- a real process -----------------------------------------------------------------------


async def _wait_serving(address: str, seconds: float = 30.0) -> None:
    """Poll the dispatcher's health until SERVING; the process needs a moment to start."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                answer = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0,
                                          wait_for_ready=True)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if loop.time() > deadline:
                raise AssertionError(f"dispatcher at {address} not SERVING after {seconds} s")
            await asyncio.sleep(0.05)


def _start_up(config: pathlib.Path, stderr_path: pathlib.Path) -> subprocess.Popen:
    """Start `slotroute up` with JSON debug logs to a file, so a full pipe never blocks it."""
    env = {**subprocess_env(), "SLOTROUTE_TOKEN": TOKEN}
    with open(stderr_path, "wb") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "slotroute", "--log-format", "json", "--log-level", "debug",
             "up", "--config", str(config)],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
        )


async def test_up_json_logs_without_token(tmp_path):
    slotd_port, dispatcher_port = free_port(), free_port()
    box = write_config(
        tmp_path,
        slots=[slot("a", model="m1")],
        models=[model("m1", ["a"])],
        slotd={"listen": f"127.0.0.1:{slotd_port}", "ports": "45300-45399",
               "token_env": "SLOTROUTE_TOKEN", "protect": "all"},
        dispatcher={"listen": f"127.0.0.1:{dispatcher_port}", "slotd_token_env": "SLOTROUTE_TOKEN"},
        registry=[{"id": "m1", "slot": "a"}],
    )
    stderr_path = tmp_path / "stderr.log"
    process = _start_up(box, stderr_path)
    try:
        dispatcher = f"127.0.0.1:{dispatcher_port}"
        await _wait_serving(dispatcher)
        async with grpc.aio.insecure_channel(dispatcher) as channel:
            transport = transport_pb2_grpc.TransportServiceStub(channel)
            answer = await transport.Resolve(transport_pb2.ResolveRequest(model="m1"), timeout=20)
            # An unknown model named like the token: its decision line must not show it.
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await transport.Resolve(transport_pb2.ResolveRequest(model=TOKEN), timeout=5)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{slotd_port}") as channel:
            stub = slot_pb2_grpc.SlotServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as wrong:
                await stub.ListSlots(slot_pb2.ListSlotsRequest(), timeout=5,
                                     metadata=security.bearer_metadata("wrong-" + TOKEN))
        process.send_signal(signal.SIGTERM)
        exit_code = await asyncio.to_thread(process.wait, 30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert answer.cold_start
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert wrong.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert exit_code == 0

    text = stderr_path.read_text()
    assert TOKEN not in text
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    messages = [line["message"] for line in lines]
    assert any("[REDACTED]" in message for message in messages)
    assert any(message.startswith("slot=a ") and "-> READY" in message for message in messages)
    ready = [line for line in lines if line.get("slot") == "a" and line.get("state") == "READY"]
    assert ready, "no slot change line with JSON fields slot and state"
    assert ready[0]["model"] == "m1"
    assert isinstance(ready[0]["revision"], int)
    assert ready[0]["reason"] == "probe"
    rejections = [line for line in lines if line["logger"] == "slotroute.security"]
    assert rejections, "no log line for the rejected token"
    assert rejections[0]["level"] == "warning"
    assert {"time", "level", "logger", "message"} <= set(lines[0])


def test_configure_installs_filters():
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        logs.configure("info", "json")
        handler = root.handlers[0]
        kinds = [type(item) for item in handler.filters]
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    assert kinds == [logs.RepeatFilter, logs.RedactFilter]
    assert isinstance(handler.formatter, logs.JsonFormatter)
