"""The `slotroute` CLI, run as a subprocess against a real `slotroute up` on free ports."""

from __future__ import annotations

import json
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest
from support import free_port, model, pid_alive, repo_root, slot, subprocess_env, write_config

from slotroute import cli

SLOTROUTE = [sys.executable, "-m", "slotroute"]
# Backend ports of this file, apart from the shared test range so that test
# runs in parallel do not race for the same ports.
PORTS = "46100-46199"
TARGET_KEYS = {"model", "endpoint_url", "slot", "source", "tier", "state", "revision", "cold_start"}


def run_cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SLOTROUTE, *args], capture_output=True, text=True, timeout=timeout,
                          env=subprocess_env(), cwd=repo_root())


def wait_healthy(address: str, process: subprocess.Popen, deadline: float = 30.0) -> None:
    """Poll `slotroute health` until it exits 0; fail early if the server exited."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode} before serving")
        if run_cli("health", "--quiet", "--address", address, "--timeout", "1").returncode == 0:
            return
        time.sleep(0.1)
    raise AssertionError(f"{address} did not report SERVING within {deadline} s")


def stop(process: subprocess.Popen, timeout: float = 15.0) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise


def start_up(config, slotd: str, dispatcher: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*SLOTROUTE, "--log-level", "warning", "up", "--config", str(config),
         "--slotd-listen", slotd, "--dispatcher-listen", dispatcher],
        env=subprocess_env(), cwd=repo_root(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True,
    )


def box_config(directory, **slotd):
    return write_config(
        directory,
        slots=[
            slot("agent", model="m-chat", preload=True),
            # A load long enough to show STARTING, WARMING and READY.
            slot("tts", "tts", model="kokoro", load_delay=0.3),
            slot("img", "image", model="sdxl"),
        ],
        models=[
            model("m-chat", ["agent"]),
            model("kokoro", ["tts"], capability="tts"),
            model("sdxl", ["img"], capability="image"),
        ],
        registry=[
            {"id": "m-chat", "aliases": ["chat-alias"], "slot": "agent"},
            {"id": "kokoro", "aliases": ["tts-1"], "capability": "tts"},
        ],
        slotd={"ports": PORTS, **slotd},
    )


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    """A running `slotroute up`; yields (slotd address, dispatcher address)."""
    config = box_config(tmp_path_factory.mktemp("box"))
    slotd, dispatcher = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    process = start_up(config, slotd, dispatcher)
    try:
        wait_healthy(dispatcher, process)
        yield slotd, dispatcher
    finally:
        stop(process)


def client(box, command: str, *args: str) -> subprocess.CompletedProcess[str]:
    slotd, dispatcher = box
    addresses = ["--slotd", slotd]
    if command in ("resolve", "route"):
        addresses += ["--dispatcher", dispatcher]
    if command == "routes":
        addresses = ["--dispatcher", dispatcher]
    return run_cli(command, *addresses, *args)


# -- resolve and route ------------------------------------------------------------


def test_resolve_prints_endpoint(box):
    result = client(box, "resolve", "m-chat")

    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+\n", result.stdout)
    assert "slot agent" in result.stderr


def test_resolve_unknown_model_exits_4(box):
    result = client(box, "resolve", "no-such-model")

    assert result.returncode == cli.EXIT_NOT_FOUND
    assert result.stdout == ""
    assert "NOT_FOUND" in result.stderr
    assert "NO_ROUTE" in result.stderr
    assert "no-such-model" in result.stderr


def test_resolve_json_keys(box):
    result = client(box, "resolve", "chat-alias", "--json")

    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert set(payload) == TARGET_KEYS
    assert payload["model"] == "m-chat"
    assert payload["slot"] == "agent"
    assert payload["tier"] == "REGISTRY"
    assert payload["state"] == "READY"
    assert payload["source"] == box[0]


def test_resolve_unknown_json_error(box):
    result = client(box, "resolve", "no-such-model", "--json")

    assert result.returncode == cli.EXIT_NOT_FOUND
    error = json.loads(result.stderr.strip().splitlines()[-1])["error"]
    assert error["code"] == "NOT_FOUND"
    assert error["reason"] == "NO_ROUTE"
    assert error["metadata"]["model"] == "no-such-model"


def test_resolve_cold_start_progress(box):
    assert client(box, "unload", "tts", "--quiet").returncode == 0

    result = client(box, "resolve", "kokoro")

    assert result.returncode == 0, result.stderr
    # Each progress line starts with the elapsed time: "+  0.12s  SLOT  STATE  MODEL  MESSAGE".
    progress = re.findall(r"^\s*\+\s*\d+\.\d\ds\s+(\S+)\s+(\S+)", result.stderr, re.MULTILINE)
    states = [state for name, state in progress if name == "tts"]
    assert states == ["STARTING", "WARMING", "READY"], result.stderr
    assert "(cold start)" in result.stderr


def test_resolve_quiet_prints_only_url(box):
    result = client(box, "resolve", "m-chat", "--quiet")

    assert result.returncode == 0
    assert result.stderr == ""
    assert result.stdout.startswith("http://")


def test_route_tts(box):
    result = client(box, "route", "tts")

    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+\n", result.stdout)
    assert "slot tts" in result.stderr


def test_route_unknown_capability_exits_4(box):
    result = client(box, "route", "telepathy")

    assert result.returncode == cli.EXIT_NOT_FOUND
    assert "NOT_FOUND" in result.stderr


def test_route_invalid_label_exits_2(box):
    result = client(box, "route", "chat", "--label", "size")

    assert result.returncode == cli.EXIT_USAGE
    assert "KEY=VALUE" in result.stderr


def test_routes_json(box):
    result = client(box, "routes", "--json")

    assert result.returncode == 0, result.stderr
    routes = {route["model"]: route for route in json.loads(result.stdout)["routes"]}
    assert routes["m-chat"]["aliases"] == ["chat-alias"]
    assert routes["m-chat"]["slot"] == "agent"
    assert routes["kokoro"]["capability"] == "tts"


def test_routes_table(box):
    result = client(box, "routes")

    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["MODEL", "TIER", "SLOT", "STATE", "CAPABILITY", "SOURCE", "ALIASES"]
    assert any(row.split()[0] == "m-chat" for row in rows)


# -- slots, load, unload, watch ------------------------------------------------------


def test_slots_json(box):
    result = client(box, "slots", "--json")

    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert set(payload) == {"epoch", "revision", "slots"}
    assert [entry["name"] for entry in payload["slots"]] == ["agent", "tts", "img"]
    agent = payload["slots"][0]
    assert agent["state"] == "SLOT_STATE_READY"
    assert agent["pid"] > 0


def test_slots_table(box):
    result = client(box, "slots")

    assert result.returncode == 0, result.stderr
    rows = result.stdout.splitlines()
    assert rows[0].split()[:3] == ["SLOT", "STATE", "MODEL"]
    assert [row.split()[0] for row in rows[1:]] == ["agent", "tts", "img"]
    assert "revision" in result.stderr


def test_load_and_unload(box):
    loaded = client(box, "load", "img", "--json")

    assert loaded.returncode == 0, loaded.stderr
    slot_state = json.loads(loaded.stdout)["slot"]
    assert slot_state["state"] == "SLOT_STATE_READY"
    assert slot_state["model_id"] == "sdxl"
    pid = slot_state["pid"]

    unloaded = client(box, "unload", "img")

    assert unloaded.returncode == 0, unloaded.stderr
    assert unloaded.stdout.strip() == "img: OFFLINE"
    assert not pid_alive(pid)


def test_load_unknown_slot_exits_4(box):
    result = client(box, "load", "no-such-slot")

    assert result.returncode == cli.EXIT_NOT_FOUND
    assert "NOT_FOUND" in result.stderr


class LineReader:
    """Reads a process's stdout lines on a thread, so reads can have a deadline."""

    def __init__(self, process: subprocess.Popen):
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.thread = threading.Thread(target=self._pump, args=(process.stdout,), daemon=True)
        self.thread.start()

    def _pump(self, stream) -> None:
        for line in stream:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def until(self, pattern: str, deadline: float = 15.0) -> list[str]:
        """Return the lines read up to the first one matching `pattern`."""
        read: list[str] = []
        end = time.monotonic() + deadline
        while True:
            try:
                line = self.lines.get(timeout=max(end - time.monotonic(), 0.001))
            except queue.Empty:
                break
            if line is None:
                break
            read.append(line)
            if re.search(pattern, line):
                return read
        raise AssertionError(f"no line matching {pattern!r}; read: {read}")


def test_watch_prints_changes(box):
    process = subprocess.Popen([*SLOTROUTE, "watch", "--slotd", box[0]], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        reader = LineReader(process)
        snapshot = reader.until(r"\bsynced\b")
        assert any(re.search(r"\bagent\s+READY\b", line) for line in snapshot)
        assert any("catalog: 3 models" in line for line in snapshot)

        assert client(box, "load", "img", "--quiet").returncode == 0
        changes = reader.until(r"\bimg\s+READY\b")
        assert any(re.search(r"\bimg\s+STARTING\b", line) for line in changes)
    finally:
        returncode = stop(process)
        client(box, "unload", "img", "--quiet")

    assert returncode == 0, process.stderr.read()


# -- health -----------------------------------------------------------------------------


def test_health_serving(box):
    result = run_cli("health", "--address", box[1])

    assert result.returncode == 0
    assert result.stdout.strip() == f"{box[1]}: SERVING"


def test_health_named_service(box):
    result = run_cli("health", "--address", box[0], "--service", "slotroute.slot.v1.SlotService")

    assert result.returncode == 0, result.stderr


def test_health_unknown_service_exits_4(box):
    result = run_cli("health", "--address", box[0], "--service", "no.such.Service")

    assert result.returncode == cli.EXIT_NOT_FOUND
    assert "SERVICE_UNKNOWN" in result.stderr


def test_health_unreachable_exits_5():
    result = run_cli("health", "--address", f"127.0.0.1:{free_port()}", "--timeout", "2")

    assert result.returncode == cli.EXIT_RETRY
    assert "UNREACHABLE" in result.stderr


def test_health_json(box):
    result = run_cli("health", "--address", box[1], "--json")

    assert json.loads(result.stdout) == {"address": box[1], "service": "", "status": "SERVING"}


def test_unreachable_dispatcher_names_address():
    address = f"127.0.0.1:{free_port()}"
    result = run_cli("resolve", "m-chat", "--dispatcher", address, "--quiet", "--timeout", "2")

    assert result.returncode == cli.EXIT_RETRY
    assert "UNAVAILABLE" in result.stderr
    assert f"no server responded at {address}" in result.stderr


# -- check-config --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["box.toml", "real-box.toml"])
def test_check_config_examples_valid(name):
    result = run_cli("check-config", f"examples/{name}")

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"examples/{name}: valid")


def test_check_config_bad_file_exits_3(tmp_path):
    bad = write_config(tmp_path, slots=[slot("agent", device="gpu9")])

    result = run_cli("check-config", str(bad))

    assert result.returncode == cli.EXIT_CONFIG
    assert str(bad) in result.stderr
    assert "[[slotd.slots]] name = 'agent'" in result.stderr
    assert "field 'device'" in result.stderr
    assert "unknown device 'gpu9'" in result.stderr


def test_check_config_json_error(tmp_path):
    bad = write_config(tmp_path, slots=[slot("agent", start_timeout="soon")])

    result = run_cli("check-config", str(bad), "--json")

    assert result.returncode == cli.EXIT_CONFIG
    payload = json.loads(result.stdout)
    assert payload["valid"] is False
    assert payload["error"]["file"] == str(bad)
    assert payload["error"]["entry"] == "[[slotd.slots]] name = 'agent'"
    assert payload["error"]["field"] == "start_timeout"


def test_check_config_missing_file_exits_3(tmp_path):
    result = run_cli("check-config", str(tmp_path / "absent.toml"))

    assert result.returncode == cli.EXIT_CONFIG
    assert "file not found" in result.stderr


def test_check_config_wildcard_backend_host(tmp_path):
    config = box_config(tmp_path, backend_host="0.0.0.0")

    result = run_cli("check-config", str(config), "--json")

    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)["slotd"]
    assert summary["backend_host"] == "0.0.0.0"
    assert summary["advertise_host"] == "127.0.0.1"


def test_check_config_wildcard_advertise_host(tmp_path):
    config = box_config(tmp_path, advertise_host="::")

    result = run_cli("check-config", str(config))

    assert result.returncode == cli.EXIT_CONFIG
    assert "field 'advertise_host'" in result.stderr


# -- server commands -----------------------------------------------------------------


def test_plaintext_non_loopback_refused(tmp_path):
    config = box_config(tmp_path)

    result = run_cli("slotd", "--config", str(config), "--listen", f"0.0.0.0:{free_port()}")

    assert result.returncode == cli.EXIT_CONFIG
    assert "--allow-insecure-bind" in result.stderr


def test_slotd_port_in_use_exits_1(tmp_path):
    config = box_config(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"

        result = run_cli("slotd", "--config", str(config), "--listen", address)

    assert result.returncode == cli.EXIT_ERROR
    assert f"cannot listen on {address}" in result.stderr


def test_slotd_advertise_host_in_endpoint(tmp_path):
    config = box_config(tmp_path)
    address = f"127.0.0.1:{free_port()}"
    process = subprocess.Popen(
        [*SLOTROUTE, "--log-level", "warning", "slotd", "--config", str(config), "--listen", address,
         "--backend-host", "127.0.0.1", "--advertise-host", "localhost"],
        env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_healthy(address, process)
        result = run_cli("load", "agent", "--slotd", address, "--json")
        assert result.returncode == 0, result.stderr
        loaded = json.loads(result.stdout)["slot"]
        argv = psutil.Process(loaded["pid"]).cmdline()
    finally:
        assert stop(process) == 0, process.stderr.read()

    assert loaded["endpoint_url"] == f"http://localhost:{loaded['port']}"
    assert argv[argv.index("--host") + 1] == "127.0.0.1"


def test_up_sigint_stops_backends(tmp_path):
    config = box_config(tmp_path)
    slotd, dispatcher = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    process = start_up(config, slotd, dispatcher)
    try:
        wait_healthy(dispatcher, process)
        assert run_cli("load", "tts", "--slotd", slotd, "--quiet").returncode == 0
        listing = json.loads(run_cli("slots", "--slotd", slotd, "--json").stdout)
        pids = [entry["pid"] for entry in listing["slots"] if entry.get("pid")]
        assert len(pids) == 2
    finally:
        started = time.monotonic()
        returncode = stop(process)
        elapsed = time.monotonic() - started

    assert returncode == 0, process.stderr.read()
    assert elapsed < 10
    assert [pid for pid in pids if pid_alive(pid)] == []


def test_up_slotd_port_zero_rejected(tmp_path):
    config = box_config(tmp_path)

    result = run_cli("up", "--config", str(config), "--slotd-listen", "127.0.0.1:0",
                     "--dispatcher-listen", f"127.0.0.1:{free_port()}")

    assert result.returncode == cli.EXIT_USAGE
    assert "port other than 0" in result.stderr


def test_up_dispatcher_reaches_wildcard_slotd():
    assert cli._loopback_for("0.0.0.0:50051") == "127.0.0.1:50051"
    assert cli._loopback_for("[::]:50051") == "[::1]:50051"
    assert cli._loopback_for("192.0.2.7:50051") == "192.0.2.7:50051"


# -- the exit code table ---------------------------------------------------------------


def test_exit_codes_documented():
    documented = {int(code) for code in re.findall(r"^\s+(\d+)\s{2,}", cli.__doc__, re.MULTILINE)}
    constants = {value for name, value in vars(cli).items() if name.startswith("EXIT_")}

    assert documented == constants
    assert set(cli._EXIT_FOR_CODE.values()) <= constants


def test_main_module_runs_cli():
    result = subprocess.run([*SLOTROUTE, "--help"], capture_output=True, text=True,
                            env=subprocess_env(), timeout=30)

    assert result.returncode == 0
    for command in ("slotd", "dispatcher", "up", "resolve", "route", "routes", "slots", "watch",
                    "load", "unload", "reload", "health", "check-config"):
        assert command in result.stdout

