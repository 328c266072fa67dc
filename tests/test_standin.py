"""Tests for the stand-in backend, run as real subprocesses on free loopback ports."""

from __future__ import annotations

import base64
import http.client
import io
import json
import math
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
import wave
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
# Upper bound for waits on a process or a port. Each wait ends as soon as its event occurs.
DEADLINE_SECONDS = 10.0
POLL_INTERVAL_SECONDS = 0.01


class Standin:
    """A running stand-in subprocess and the port passed to its --port."""

    def __init__(self, process: subprocess.Popen[bytes], port: int) -> None:
        self.process = process
        self.port = port

    def stderr_after_exit(self, timeout: float = DEADLINE_SECONDS) -> str:
        """Wait for the process to exit and return everything it wrote to stderr."""
        _, stderr = self.process.communicate(timeout=timeout)
        return stderr.decode("utf-8", "replace")


def find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """Send one request on a new connection and return its status, headers and body."""
    connection = http.client.HTTPConnection(HOST, port, timeout=DEADLINE_SECONDS)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def post_json(port: int, path: str, payload: object) -> tuple[int, dict[str, str], bytes]:
    body = json.dumps(payload).encode("utf-8")
    return request(port, "POST", path, body, {"Content-Type": "application/json"})


def wait_for_health(port: int, expected_status: int) -> tuple[int, bytes]:
    """Poll /health until it returns expected_status, and fail the test at the deadline.

    Returns the first status seen and the body of the expected response.
    """
    deadline = time.monotonic() + DEADLINE_SECONDS
    first_status = None
    while time.monotonic() < deadline:
        try:
            status, _, body = request(port, "GET", "/health")
        except ConnectionRefusedError:
            time.sleep(POLL_INTERVAL_SECONDS)
            continue
        if first_status is None:
            first_status = status
        if status == expected_status:
            return first_status, body
        time.sleep(POLL_INTERVAL_SECONDS)
    pytest.fail(
        f"/health on port {port} did not return {expected_status} within {DEADLINE_SECONDS} s"
    )


def read_stderr_line(process: subprocess.Popen[bytes]) -> str:
    """Read stderr up to the first newline, unbuffered, and fail at the deadline."""
    assert process.stderr is not None
    descriptor = process.stderr.fileno()
    deadline = time.monotonic() + DEADLINE_SECONDS
    output = b""
    while b"\n" not in output:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            pytest.fail(f"no stderr line within {DEADLINE_SECONDS} s, got {output!r}")
        readable, _, _ = select.select([descriptor], [], [], remaining)
        if readable:
            data = os.read(descriptor, 4096)
            if not data:
                pytest.fail(f"stderr closed before a full line, got {output!r}")
            output += data
    return output.decode("utf-8", "replace")


def assert_alive_for(process: subprocess.Popen[bytes], seconds: float) -> None:
    with pytest.raises(subprocess.TimeoutExpired):
        process.wait(timeout=seconds)


class StandinLauncher:
    """Starts stand-in subprocesses and kills the ones still running on close()."""

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen[bytes]] = []
        self.env = dict(os.environ)
        python_path = [str(REPO_ROOT / "src"), self.env.get("PYTHONPATH", "")]
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, python_path))

    def start(self, *arguments: str, port: int | None = None) -> Standin:
        port = find_free_port() if port is None else port
        command = [sys.executable, "-m", "slotroute.standin", "--port", str(port), *arguments]
        process = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.processes.append(process)
        return Standin(process, port)

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.communicate(timeout=DEADLINE_SECONDS)


StandinFactory = Callable[..., Standin]


@pytest.fixture
def start_standin() -> Iterator[StandinFactory]:
    launcher = StandinLauncher()
    yield launcher.start
    launcher.close()


@pytest.fixture(scope="module")
def ready_port() -> Iterator[int]:
    """Port of one ready stand-in shared by the endpoint tests of this module."""
    launcher = StandinLauncher()
    standin = launcher.start("--model", "shared-model", "--capability", "chat")
    wait_for_health(standin.port, 200)
    yield standin.port
    launcher.close()


# --------------------------------------------------------------------------- health and models


def test_health_loading_then_ok(start_standin: StandinFactory) -> None:
    standin = start_standin("--load-delay", "0.3")

    first_status, body = wait_for_health(standin.port, 200)

    assert first_status == 503
    assert json.loads(body) == {"status": "ok"}
    status, _, v1_body = request(standin.port, "GET", "/v1/health")
    assert status == 200
    assert json.loads(v1_body) == {"status": "ok"}


def test_health_body_while_loading(start_standin: StandinFactory) -> None:
    standin = start_standin("--load-delay", "30")

    first_status, body = wait_for_health(standin.port, 503)

    assert first_status == 503
    assert json.loads(body) == {
        "error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}
    }


def test_chat_returns_503_while_loading(start_standin: StandinFactory) -> None:
    standin = start_standin("--load-delay", "30")
    wait_for_health(standin.port, 503)

    status, headers, body = post_json(
        standin.port, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}
    )

    assert status == 503
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body)["error"]["message"] == "Loading model"


def test_models_lists_model_id(start_standin: StandinFactory) -> None:
    standin = start_standin("--model", "qwen-test", "--capability", "embed")
    wait_for_health(standin.port, 200)

    status, headers, body = request(standin.port, "GET", "/v1/models")

    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body) == {
        "object": "list",
        "data": [
            {"id": "qwen-test", "object": "model", "owned_by": "standin", "capability": "embed"}
        ],
    }


def test_fail_health_never_ready(start_standin: StandinFactory) -> None:
    standin = start_standin("--fail-health")
    wait_for_health(standin.port, 503)

    chat_status, _, _ = post_json(
        standin.port, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}
    )
    health_status, _, body = request(standin.port, "GET", "/health")

    assert chat_status == 503
    assert health_status == 503
    assert json.loads(body)["error"]["type"] == "unavailable_error"


# --------------------------------------------------------------------------- endpoints


def test_root_returns_plain_text(ready_port: int) -> None:
    status, headers, body = request(ready_port, "GET", "/")

    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    assert body == b"standin backend\n"


def test_chat_completion_shape(ready_port: int) -> None:
    payload = {
        "model": "ignored",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello"},
        ],
    }

    status, headers, body = post_json(ready_port, "/v1/chat/completions", payload)
    _, _, repeated_body = post_json(ready_port, "/v1/chat/completions", payload)

    assert status == 200
    assert headers["Content-Type"] == "application/json"
    completion = json.loads(body)
    assert completion["object"] == "chat.completion"
    assert completion["model"] == "shared-model"
    message = completion["choices"][0]["message"]
    assert message["role"] == "assistant"
    assert "5 characters" in message["content"]
    assert completion["choices"][0]["finish_reason"] == "stop"
    assert completion["usage"]["total_tokens"] > 0
    assert json.loads(repeated_body)["choices"] == completion["choices"]


def test_chat_counts_text_parts(ready_port: int) -> None:
    content = [
        {"type": "text", "text": "abc"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "text", "text": "de"},
    ]

    status, _, body = post_json(
        ready_port, "/v1/chat/completions", {"messages": [{"role": "user", "content": content}]}
    )

    assert status == 200
    assert "5 characters" in json.loads(body)["choices"][0]["message"]["content"]


def test_chat_stream_ends_with_done(ready_port: int) -> None:
    payload = {"stream": True, "messages": [{"role": "user", "content": "hello"}]}

    status, headers, body = post_json(ready_port, "/v1/chat/completions", payload)

    assert status == 200
    assert headers["Content-Type"] == "text/event-stream"
    events = [line.removeprefix("data: ") for line in body.decode().split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    text = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks)
    assert "5 characters" in text
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_completion_shape(ready_port: int) -> None:
    status, _, body = post_json(ready_port, "/v1/completions", {"prompt": ["one", "three"]})

    assert status == 200
    completion = json.loads(body)
    assert completion["object"] == "text_completion"
    assert completion["model"] == "shared-model"
    assert [choice["index"] for choice in completion["choices"]] == [0, 1]
    assert "3-character" in completion["choices"][0]["text"]
    assert "5-character" in completion["choices"][1]["text"]


def test_embeddings_deterministic_unit_vectors(ready_port: int) -> None:
    status, _, body = post_json(ready_port, "/v1/embeddings", {"input": ["alpha", "beta", "alpha"]})
    _, _, single_body = post_json(ready_port, "/v1/embeddings", {"input": "alpha"})

    assert status == 200
    result = json.loads(body)
    assert result["object"] == "list"
    assert result["model"] == "shared-model"
    vectors = [item["embedding"] for item in result["data"]]
    assert [item["index"] for item in result["data"]] == [0, 1, 2]
    assert all(len(vector) == 8 for vector in vectors)
    assert math.isclose(math.fsum(x * x for x in vectors[0]), 1.0)
    assert vectors[0] == vectors[2]
    assert vectors[0] != vectors[1]
    assert json.loads(single_body)["data"][0]["embedding"] == vectors[0]


def test_embeddings_base64_format(ready_port: int) -> None:
    _, _, float_body = post_json(ready_port, "/v1/embeddings", {"input": "alpha"})
    status, _, body = post_json(
        ready_port, "/v1/embeddings", {"input": "alpha", "encoding_format": "base64"}
    )

    assert status == 200
    packed = base64.b64decode(json.loads(body)["data"][0]["embedding"])
    decoded = struct.unpack("<8f", packed)
    expected = json.loads(float_body)["data"][0]["embedding"]
    assert all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(decoded, expected, strict=True))


def test_rerank_orders_by_overlap(ready_port: int) -> None:
    payload = {
        "query": "red apple",
        "documents": ["green apple", "a red apple pie", "blue car"],
        "top_n": 2,
    }

    status, _, body = post_json(ready_port, "/v1/rerank", payload)

    assert status == 200
    result = json.loads(body)
    assert result["model"] == "shared-model"
    assert [item["index"] for item in result["results"]] == [1, 0]
    assert result["results"][0]["relevance_score"] == 1.0
    assert result["results"][1]["relevance_score"] == 0.5


def test_transcription_counts_body_bytes(ready_port: int) -> None:
    boundary = "standinboundary"
    body = (
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\n"
        "RIFFxxxx\r\n"
        f"--{boundary}--\r\n"
    ).encode()
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}

    status, _, response_body = request(
        ready_port, "POST", "/v1/audio/transcriptions", body, headers
    )

    assert status == 200
    assert json.loads(response_body) == {"text": f"standin transcript ({len(body)} bytes)"}


def test_transcription_accepts_chunked_body(ready_port: int) -> None:
    # http.client sends an iterable body with Transfer-Encoding: chunked.
    chunks = iter([b"abc", b"defgh"])

    status, _, body = request(ready_port, "POST", "/v1/audio/transcriptions", chunks)

    assert status == 200
    assert json.loads(body) == {"text": "standin transcript (8 bytes)"}


def test_speech_returns_valid_wav(ready_port: int) -> None:
    status, headers, body = post_json(
        ready_port, "/v1/audio/speech", {"input": "hi", "voice": "af"}
    )

    assert status == 200
    assert headers["Content-Type"] == "audio/wav"
    assert body.startswith(b"RIFF")
    with wave.open(io.BytesIO(body)) as audio:
        assert audio.getnchannels() == 1
        assert audio.getsampwidth() == 2
        assert audio.getframerate() == 24000
        assert audio.getnframes() == 480


def test_image_generation_returns_png(ready_port: int) -> None:
    status, _, body = post_json(ready_port, "/v1/images/generations", {"prompt": "a cat", "n": 2})

    assert status == 200
    result = json.loads(body)
    assert isinstance(result["created"], int)
    assert len(result["data"]) == 2
    png = base64.b64decode(result["data"][0]["b64_json"])
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    position = 8
    chunk_kinds = []
    while position < len(png):
        (length,) = struct.unpack(">I", png[position : position + 4])
        kind = png[position + 4 : position + 8]
        data = png[position + 8 : position + 8 + length]
        (checksum,) = struct.unpack(">I", png[position + 8 + length : position + 12 + length])
        assert checksum == zlib.crc32(kind + data), f"bad CRC in {kind!r} chunk"
        if kind == b"IHDR":
            assert struct.unpack(">II", data[:8]) == (1, 1)
        chunk_kinds.append(kind)
        position += 12 + length
    assert chunk_kinds == [b"IHDR", b"IDAT", b"IEND"]


# --------------------------------------------------------------------------- request errors


def test_bad_json_returns_400(ready_port: int) -> None:
    status, headers, body = request(
        ready_port, "POST", "/v1/embeddings", b"{not json", {"Content-Type": "application/json"}
    )

    assert status == 400
    assert headers["Content-Type"] == "application/json"
    error = json.loads(body)["error"]
    assert error["code"] == 400
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith("invalid JSON body")


@pytest.mark.parametrize(
    ("path", "payload", "message_part"),
    [
        ("/v1/embeddings", [1, 2], "must be an object"),
        ("/v1/embeddings", {"input": 7}, "'input'"),
        ("/v1/chat/completions", {"messages": []}, "'messages'"),
        ("/v1/completions", {}, "'prompt'"),
        ("/v1/rerank", {"query": "q", "documents": []}, "'documents'"),
        ("/v1/audio/speech", {"voice": "af"}, "'input'"),
        ("/v1/images/generations", {"prompt": "x", "n": 0}, "'n'"),
    ],
)
def test_invalid_payload_returns_400(
    ready_port: int, path: str, payload: object, message_part: str
) -> None:
    status, _, body = post_json(ready_port, path, payload)

    assert status == 400
    assert message_part in json.loads(body)["error"]["message"]


def test_unknown_path_returns_404(ready_port: int) -> None:
    get_status, _, get_body = request(ready_port, "GET", "/v1/unknown")
    post_status, _, post_body = post_json(ready_port, "/v1/unknown", {})

    assert get_status == 404
    assert json.loads(get_body)["error"]["type"] == "not_found_error"
    assert post_status == 404
    assert json.loads(post_body)["error"]["code"] == 404


def test_wrong_method_returns_405(ready_port: int) -> None:
    get_status, get_headers, _ = request(ready_port, "GET", "/v1/chat/completions")
    post_status, post_headers, _ = post_json(ready_port, "/health", {})

    assert get_status == 405
    assert get_headers["Allow"] == "POST"
    assert post_status == 405
    assert post_headers["Allow"] == "GET"


def test_invalid_content_length_closes(ready_port: int) -> None:
    raw_request = b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: ten\r\n\r\n"
    with socket.create_connection((HOST, ready_port), timeout=DEADLINE_SECONDS) as connection:
        connection.sendall(raw_request)
        response = b""
        while chunk := connection.recv(4096):
            response += chunk

    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert b"Connection: close" in head
    assert "invalid Content-Length" in json.loads(body)["error"]["message"]


def test_keep_alive_survives_errors(ready_port: int) -> None:
    connection = http.client.HTTPConnection(HOST, ready_port, timeout=DEADLINE_SECONDS)
    try:
        statuses = []
        for method, path, body in [
            ("POST", "/v1/unknown", b'{"a": 1}'),
            ("POST", "/v1/embeddings", b"{broken"),
            ("GET", "/health", None),
        ]:
            connection.request(method, path, body=body)
            response = connection.getresponse()
            response.read()
            statuses.append(response.status)
    finally:
        connection.close()

    assert statuses == [404, 400, 200]


# --------------------------------------------------------------------------- lifecycle


def test_crash_after_exits_with_code(start_standin: StandinFactory) -> None:
    standin = start_standin("--crash-after", "0.2", "--exit-code", "3")

    stderr = standin.stderr_after_exit()

    assert standin.process.returncode == 3
    assert "standin: crashing on purpose after 0.2 s" in stderr


def test_sigterm_exits_zero(start_standin: StandinFactory) -> None:
    standin = start_standin()
    wait_for_health(standin.port, 200)
    # An idle keep-alive connection keeps a handler thread blocked in a read.
    idle_connection = http.client.HTTPConnection(HOST, standin.port, timeout=DEADLINE_SECONDS)
    idle_connection.request("GET", "/v1/models")
    idle_connection.getresponse().read()

    try:
        standin.process.send_signal(signal.SIGTERM)
        returncode = standin.process.wait(timeout=2)
    finally:
        idle_connection.close()
    stderr = standin.stderr_after_exit()

    assert returncode == 0
    assert "received SIGTERM, exiting" in stderr
    assert "Traceback" not in stderr


def test_sigint_exits_zero(start_standin: StandinFactory) -> None:
    standin = start_standin()
    wait_for_health(standin.port, 200)

    standin.process.send_signal(signal.SIGINT)

    assert standin.process.wait(timeout=2) == 0


def test_ignore_sigterm_needs_sigkill(start_standin: StandinFactory) -> None:
    standin = start_standin("--ignore-sigterm")
    wait_for_health(standin.port, 200)

    standin.process.send_signal(signal.SIGTERM)
    assert_alive_for(standin.process, 0.3)
    status, _, _ = request(standin.port, "GET", "/health")
    standin.process.send_signal(signal.SIGKILL)
    stderr = standin.stderr_after_exit()

    assert status == 200
    assert standin.process.returncode == -signal.SIGKILL
    assert "received SIGTERM, ignoring it" in stderr


def test_stop_delay_serves_then_exits(start_standin: StandinFactory) -> None:
    standin = start_standin("--stop-delay", "0.3")
    wait_for_health(standin.port, 200)

    standin.process.send_signal(signal.SIGTERM)
    assert_alive_for(standin.process, 0.1)
    status, _, _ = request(standin.port, "GET", "/health")
    stderr = standin.stderr_after_exit(timeout=2)

    assert status == 200
    assert standin.process.returncode == 0
    assert "exiting in 0.3 s" in stderr


def test_sigterm_during_bind_delay(start_standin: StandinFactory) -> None:
    standin = start_standin("--bind-delay", "30")
    waiting_line = read_stderr_line(standin.process)

    standin.process.send_signal(signal.SIGTERM)

    assert "waiting 30.0 s before binding" in waiting_line
    assert standin.process.wait(timeout=2) == 0


def test_busy_port_exits_one(start_standin: StandinFactory) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind((HOST, 0))
        holder.listen()
        busy_port = holder.getsockname()[1]
        standin = start_standin(port=busy_port)

        stderr = standin.stderr_after_exit()

    assert standin.process.returncode == 1
    assert f"error: cannot bind 127.0.0.1:{busy_port}: " in stderr


def test_missing_model_path_exits_one(start_standin: StandinFactory, tmp_path: Path) -> None:
    missing = tmp_path / "missing.gguf"
    standin = start_standin("--model-path", str(missing))

    stderr = standin.stderr_after_exit()

    assert standin.process.returncode == 1
    assert f"error: model file not found: {missing}" in stderr


def test_existing_model_path_serves(start_standin: StandinFactory, tmp_path: Path) -> None:
    model_file = tmp_path / "model.gguf"
    model_file.write_bytes(b"GGUF")
    standin = start_standin("--model-path", str(model_file))

    _, body = wait_for_health(standin.port, 200)

    assert json.loads(body) == {"status": "ok"}


def test_bind_delay_opens_port_late(start_standin: StandinFactory) -> None:
    standin = start_standin("--bind-delay", "0.3")

    with pytest.raises(ConnectionRefusedError):
        request(standin.port, "GET", "/health")
    wait_for_health(standin.port, 200)
    standin.process.send_signal(signal.SIGTERM)
    stderr = standin.stderr_after_exit()

    assert (
        f"standin: serving standin on http://127.0.0.1:{standin.port} (load delay 0.0 s)" in stderr
    )
