"""Stand-in model-serving backend for demos and tests.

This is not a model server. It is a small HTTP server, built on the standard library
only, that responds like the backends slotd supervises (llama.cpp llama-server,
whisper.cpp, Kokoro TTS, ComfyUI, embedding servers) with fixed, deterministic
results. Its switches reproduce the lifecycle cases a supervisor has to handle: slow
loading, a port that opens late, crashes, and processes that stop slowly or ignore
SIGTERM. slotd has no special knowledge of it and runs it like any other command.

Run it with ``python -m slotroute.standin --port PORT [switches]``:

  --host HOST            address to bind (default 127.0.0.1). An address with ":" is IPv6.
  --port PORT            TCP port to bind (required). Port 0 picks a free port.
  --model ID             model id returned by /v1/models and in responses (default "standin")
  --model-path PATH      exit 1 at once with "error: model file not found: PATH" unless
                         PATH exists, as llama-server does
  --capability CAP       chat, embed, rerank, stt, tts, image or vision (default chat). It
                         only appears in the /v1/models entry, and every endpoint is served.
  --load-delay SECONDS   time after binding during which /health returns 503 "Loading
                         model" and the inference endpoints return 503 (default 0)
  --bind-delay SECONDS   wait this long before binding the port at all (default 0)
  --crash-after SECONDS  exit with --exit-code this long after start (process start, not bind)
  --exit-code N          exit status for --crash-after (default 1)
  --ignore-sigterm       log SIGTERM to stderr and keep running
  --stop-delay SECONDS   on SIGTERM keep serving for this long, then exit 0
  --fail-health          never become ready: /health and the inference endpoints return 503

SIGTERM (without --ignore-sigterm or --stop-delay) and SIGINT make it exit 0 at once.
If the port cannot be bound, it prints "error: cannot bind HOST:PORT: REASON" and exits 1.
It writes only lifecycle lines to stderr (startup, bind delay, signals, crash and handler
errors) and no access log, because slotd keeps only the tail of stderr.

Endpoints, with JSON bodies unless noted. Errors use the llama-server shape
``{"error": {"code": ..., "message": ..., "type": ...}}``, and a known path requested
with the wrong method returns 405.

  GET  /                          200 text/plain "standin backend"
  GET  /health, /v1/health        503 while loading, then 200 {"status": "ok"}
  GET  /v1/models                 the one model, also while loading
  POST /v1/chat/completions       fixed reply naming the length of the last user message.
                                  "stream": true returns the same reply as server-sent events.
  POST /v1/completions            fixed completion per prompt, "stream" as for chat
  POST /v1/embeddings             8-dimension unit vector per input, from SHA-256 of the text
  POST /v1/rerank                 score per document: share of query words found in it
  POST /v1/audio/transcriptions   any body, returns {"text": "standin transcript (N bytes)"}
  POST /v1/audio/speech           20 ms of silence as a 24 kHz 16-bit mono WAV (audio/wav)
  POST /v1/images/generations     a 1x1 grey PNG as "b64_json", "n" times

All POST endpoints return 503 until the model is loaded. Token counts in "usage" are
whitespace-separated word counts, not tokenizer output.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import math
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
import zlib
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

# The module avoids importing dataclasses and typing at run time, because startup time
# matters to test suites that start many stand-ins.

CAPABILITIES = ("chat", "embed", "rerank", "stt", "tts", "image", "vision")
EMBEDDING_DIMENSIONS = 8
MAX_BODY_BYTES = 64 * 1024 * 1024
MAX_IMAGES_PER_REQUEST = 10
SPEECH_SAMPLE_RATE_HZ = 24_000
SPEECH_SAMPLE_COUNT = 480

# Error "type" strings that llama-server uses for these status codes.
ERROR_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    405: "invalid_request_error",
    411: "invalid_request_error",
    413: "invalid_request_error",
    500: "server_error",
    501: "not_supported_error",
    503: "unavailable_error",
}

JsonObject = dict[str, object]


# --------------------------------------------------------------------------- fixed media


def build_png_1x1() -> bytes:
    """Build a valid PNG file of one 8-bit grey pixel."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        checksum = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", checksum)

    # Width 1, height 1, bit depth 8, colour type 0 (greyscale), default methods.
    header = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    # One scanline: filter type 0, then the pixel value.
    pixels = zlib.compress(b"\x00\x80")
    signature = b"\x89PNG\r\n\x1a\n"
    return signature + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def build_silent_wav(sample_rate_hz: int, sample_count: int) -> bytes:
    """Build a PCM WAV file of 16-bit mono silence."""
    data = bytes(2 * sample_count)
    block_align = 2
    header = struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF",
        36 + len(data),
        b"WAVE",
        b"fmt ",
        16,  # size of the fmt chunk
        1,  # PCM
        1,  # channels
        sample_rate_hz,
        sample_rate_hz * block_align,  # bytes per second
        block_align,
        16,  # bits per sample
        b"data",
        len(data),
    )
    return header + data


PNG_1X1 = build_png_1x1()
PNG_1X1_BASE64 = base64.b64encode(PNG_1X1).decode("ascii")
SILENT_WAV = build_silent_wav(SPEECH_SAMPLE_RATE_HZ, SPEECH_SAMPLE_COUNT)


# --------------------------------------------------------------------------- responses


class HttpError(Exception):
    """Error that the request handler sends as a JSON error response."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        close_connection: bool = False,
        allow: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.close_connection = close_connection
        self.allow = allow  # value of the Allow header on a 405 response


def error_payload(status: int, message: str) -> JsonObject:
    error_type = ERROR_TYPES.get(status, "server_error")
    return {"error": {"code": status, "message": message, "type": error_type}}


class Reply:
    """HTTP response: status, body and Content-Type."""

    __slots__ = ("status", "body", "content_type")

    def __init__(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.status = status
        self.body = body
        self.content_type = content_type

    @classmethod
    def json(cls, payload: object, status: int = 200) -> Reply:
        body = json.dumps(payload, separators=(",", ":")).encode("utf-8")
        return cls(status, body)


def count_words(text: str) -> int:
    return len(text.split())


def short_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def require_object(payload: object) -> JsonObject:
    if not isinstance(payload, dict):
        raise HttpError(400, f"JSON body must be an object, got {type(payload).__name__}")
    return payload


def server_sent_events(chunks: list[JsonObject]) -> Reply:
    """Encode completion chunks as one server-sent event stream ending in [DONE]."""
    events = [f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n" for chunk in chunks]
    events.append("data: [DONE]\n\n")
    return Reply(200, "".join(events).encode("utf-8"), "text/event-stream")


def message_text(content: object, index: int) -> str:
    """Return the text of a chat message's content, which is a string, a list of parts or null."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise HttpError(
                        400, f"messages[{index}] has a text part without a string 'text'"
                    )
                texts.append(text)
        return "".join(texts)
    raise HttpError(400, f"messages[{index}].content must be a string, a list of parts or null")


def chat_completion(payload: JsonObject, model: str) -> Reply:
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        raise HttpError(400, "'messages' must be a non-empty list")

    prompt_words = 0
    last_user_text = ""
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise HttpError(400, f"messages[{index}] must be an object with a string 'role'")
        text = message_text(message.get("content"), index)
        prompt_words += count_words(text)
        if message["role"] == "user":
            last_user_text = text

    reply_text = f"standin reply: your last message had {len(last_user_text)} characters."
    completion_id = f"chatcmpl-standin-{short_digest(last_user_text)}"
    created = int(time.time())

    if payload.get("stream") is True:
        base = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
        }
        deltas = [
            ({"role": "assistant", "content": ""}, None),
            ({"content": reply_text}, None),
            ({}, "stop"),
        ]
        chunks = [
            {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            for delta, finish in deltas
        ]
        return server_sent_events(chunks)

    completion_words = count_words(reply_text)
    return Reply.json(
        {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": reply_text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt_words,
                "completion_tokens": completion_words,
                "total_tokens": prompt_words + completion_words,
            },
        }
    )


def text_list(payload: JsonObject, field: str) -> list[str]:
    """Return a field that may be one string or a non-empty list of strings as a list."""
    value = payload.get(field)
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(item, str) for item in value):
        return value
    raise HttpError(400, f"'{field}' must be a string or a non-empty list of strings")


def text_completion(payload: JsonObject, model: str) -> Reply:
    prompts = text_list(payload, "prompt")
    texts = [f"standin completion of a {len(prompt)}-character prompt." for prompt in prompts]
    completion_id = f"cmpl-standin-{short_digest(''.join(prompts))}"
    created = int(time.time())

    if payload.get("stream") is True:
        base = {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": model,
        }
        chunks = []
        for index, text in enumerate(texts):
            chunks.append(
                {**base, "choices": [{"index": index, "text": text, "finish_reason": None}]}
            )
            chunks.append(
                {**base, "choices": [{"index": index, "text": "", "finish_reason": "stop"}]}
            )
        return server_sent_events(chunks)

    prompt_words = sum(count_words(prompt) for prompt in prompts)
    completion_words = sum(count_words(text) for text in texts)
    choices = [
        {"index": index, "text": text, "logprobs": None, "finish_reason": "stop"}
        for index, text in enumerate(texts)
    ]
    return Reply.json(
        {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_words,
                "completion_tokens": completion_words,
                "total_tokens": prompt_words + completion_words,
            },
        }
    )


def embed_text(text: str) -> list[float]:
    """Map text to a deterministic unit vector of EMBEDDING_DIMENSIONS floats.

    Each component comes from two bytes of the SHA-256 digest, scaled to [-1, 1].
    """
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    raw = [
        int.from_bytes(digest[2 * i : 2 * i + 2], "big") / 32767.5 - 1.0
        for i in range(EMBEDDING_DIMENSIONS)
    ]
    norm = math.sqrt(sum(component * component for component in raw))
    if norm == 0.0:
        return raw
    return [component / norm for component in raw]


def embeddings(payload: JsonObject, model: str) -> Reply:
    inputs = text_list(payload, "input")
    encoding_format = payload.get("encoding_format", "float")
    if encoding_format not in ("float", "base64"):
        raise HttpError(
            400, f"'encoding_format' must be 'float' or 'base64', got {encoding_format!r}"
        )

    data = []
    for index, text in enumerate(inputs):
        vector = embed_text(text)
        # The OpenAI Python client requests base64 by default: little-endian float32 values.
        if encoding_format == "base64":
            packed = struct.pack(f"<{len(vector)}f", *vector)
            embedding: object = base64.b64encode(packed).decode("ascii")
        else:
            embedding = vector
        data.append({"object": "embedding", "index": index, "embedding": embedding})

    words = sum(count_words(text) for text in inputs)
    return Reply.json(
        {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": words, "total_tokens": words},
        }
    )


def rerank_score(query: str, document: str) -> float:
    """Return the share of distinct lowercase query words that occur in the document."""
    query_words = set(query.lower().split())
    if not query_words:
        return 0.0
    document_words = set(document.lower().split())
    return len(query_words & document_words) / len(query_words)


def rerank(payload: JsonObject, model: str) -> Reply:
    query = payload.get("query")
    if not isinstance(query, str):
        raise HttpError(400, "'query' must be a string")

    documents = payload.get("documents")
    if not isinstance(documents, list) or not documents:
        raise HttpError(400, "'documents' must be a non-empty list")
    texts = []
    for index, document in enumerate(documents):
        if isinstance(document, dict):
            document = document.get("text")
        if not isinstance(document, str):
            raise HttpError(
                400, f"documents[{index}] must be a string or an object with a string 'text'"
            )
        texts.append(document)

    top_n = payload.get("top_n", len(texts))
    if not isinstance(top_n, int) or isinstance(top_n, bool) or top_n < 1:
        raise HttpError(400, f"'top_n' must be a positive integer, got {top_n!r}")

    scored = [(rerank_score(query, text), index) for index, text in enumerate(texts)]
    # Highest score first, ties in document order.
    scored.sort(key=lambda item: (-item[0], item[1]))
    results = []
    for score, index in scored[:top_n]:
        result: JsonObject = {"index": index, "relevance_score": score}
        if payload.get("return_documents") is True:
            result["document"] = {"text": texts[index]}
        results.append(result)

    words = count_words(query) + sum(count_words(text) for text in texts)
    return Reply.json(
        {
            "model": model,
            "object": "list",
            "results": results,
            "usage": {"prompt_tokens": words, "total_tokens": words},
        }
    )


def transcription(body: bytes) -> Reply:
    # NOTE: the body is not parsed, so "response_format" and other form fields are ignored.
    return Reply.json({"text": f"standin transcript ({len(body)} bytes)"})


def speech(payload: JsonObject) -> Reply:
    if not isinstance(payload.get("input"), str):
        raise HttpError(400, "'input' must be a string")
    # NOTE: "response_format" is ignored, so the response is WAV even when mp3 is requested.
    return Reply(200, SILENT_WAV, "audio/wav")


def image_generation(payload: JsonObject) -> Reply:
    if not isinstance(payload.get("prompt"), str):
        raise HttpError(400, "'prompt' must be a string")
    count = payload.get("n", 1)
    if (
        not isinstance(count, int)
        or isinstance(count, bool)
        or not 1 <= count <= MAX_IMAGES_PER_REQUEST
    ):
        raise HttpError(
            400, f"'n' must be an integer from 1 to {MAX_IMAGES_PER_REQUEST}, got {count!r}"
        )
    # NOTE: "response_format": "url" is ignored, so images always come back as b64_json.
    images = [{"b64_json": PNG_1X1_BASE64} for _ in range(count)]
    return Reply.json({"created": int(time.time()), "data": images})


# --------------------------------------------------------------------------- HTTP server


class BackendState:
    """Model identity and readiness, read by the request handler threads."""

    def __init__(self, model: str, capability: str, fail_health: bool, ready_at: float) -> None:
        self.model = model
        self.capability = capability
        self.fail_health = fail_health
        self.ready_at = ready_at  # time.monotonic() value at which loading ends

    def is_ready(self) -> bool:
        return not self.fail_health and time.monotonic() >= self.ready_at

    def unavailable_message(self) -> str:
        if self.fail_health:
            return "Health check failing on purpose (--fail-health)"
        return "Loading model"


# POST routes: handler taking (JSON body, model id), or (raw body) for transcriptions.
JSON_ROUTES: dict[str, Callable[[JsonObject, str], Reply]] = {
    "/v1/chat/completions": chat_completion,
    "/v1/completions": text_completion,
    "/v1/embeddings": embeddings,
    "/v1/rerank": rerank,
    "/v1/audio/speech": lambda payload, _model: speech(payload),
    "/v1/images/generations": lambda payload, _model: image_generation(payload),
}
RAW_ROUTES: dict[str, Callable[[bytes], Reply]] = {
    "/v1/audio/transcriptions": transcription,
}
GET_PATHS = frozenset({"/", "/health", "/v1/health", "/v1/models"})


class StandinRequestHandler(BaseHTTPRequestHandler):
    """Request handler for the stand-in endpoints, run in one thread per connection."""

    protocol_version = "HTTP/1.1"
    server_version = "standin"
    # Seconds an idle keep-alive connection keeps its thread before it is closed.
    timeout = 60
    server: StandinHTTPServer

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: object) -> None:
        # No access log: slotd keeps only the tail of stderr.
        return

    def do_GET(self) -> None:
        self.respond(self.route_get)

    def do_POST(self) -> None:
        self.respond(self.route_post)

    def respond(self, route: Callable[[], Reply]) -> None:
        try:
            reply = route()
        except HttpError as error:
            if error.close_connection:
                self.close_connection = True
            reply = Reply.json(error_payload(error.status, error.message), error.status)
            self.send_reply(reply, allow=error.allow)
            return
        except Exception as error:  # A bug in an endpoint must not drop the connection.
            log(f"internal error on {self.command} {self.path}: {error!r}")
            reply = Reply.json(error_payload(500, f"internal error: {error}"), 500)
        self.send_reply(reply)

    def send_reply(self, reply: Reply, allow: str | None = None) -> None:
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        if allow is not None:
            self.send_header("Allow", allow)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(reply.body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Send protocol errors found by BaseHTTPRequestHandler (bad request line, 501) as JSON."""
        self.close_connection = True
        text = message or self.responses.get(code, ("Error",))[0]
        self.send_reply(Reply.json(error_payload(code, text), code))

    def route_get(self) -> Reply:
        path = urlsplit(self.path).path
        state = self.server.state
        if path == "/":
            return Reply(200, b"standin backend\n", "text/plain; charset=utf-8")
        if path in ("/health", "/v1/health"):
            if not state.is_ready():
                return Reply.json(error_payload(503, state.unavailable_message()), 503)
            return Reply.json({"status": "ok"})
        if path == "/v1/models":
            entry = {
                "id": state.model,
                "object": "model",
                "owned_by": "standin",
                "capability": state.capability,
            }
            return Reply.json({"object": "list", "data": [entry]})
        if path in JSON_ROUTES or path in RAW_ROUTES:
            raise HttpError(405, f"method GET not allowed on {path}, use POST", allow="POST")
        raise HttpError(404, f"path not found: {path}")

    def route_post(self) -> Reply:
        # Read the body before any error response, so the keep-alive connection stays in sync.
        body = self.read_body()
        path = urlsplit(self.path).path
        state = self.server.state
        if path in GET_PATHS:
            raise HttpError(405, f"method POST not allowed on {path}, use GET", allow="GET")
        if path not in JSON_ROUTES and path not in RAW_ROUTES:
            raise HttpError(404, f"path not found: {path}")
        if not state.is_ready():
            raise HttpError(503, state.unavailable_message())

        if path in RAW_ROUTES:
            return RAW_ROUTES[path](body)
        if not body:
            raise HttpError(400, "invalid JSON body: the body is empty")
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise HttpError(400, f"invalid JSON body: {error}") from None
        return JSON_ROUTES[path](require_object(payload), state.model)

    def read_body(self) -> bytes:
        transfer_encoding = self.headers.get("Transfer-Encoding", "")
        if "chunked" in transfer_encoding.lower():
            return self.read_chunked_body()

        length_header = self.headers.get("Content-Length")
        if length_header is None:
            return b""
        invalid_length = HttpError(
            400, f"invalid Content-Length header: {length_header!r}", close_connection=True
        )
        try:
            length = int(length_header)
        except ValueError:
            raise invalid_length from None
        if length < 0:
            raise invalid_length
        if length > MAX_BODY_BYTES:
            message = f"request body of {length} bytes exceeds the maximum of {MAX_BODY_BYTES}"
            raise HttpError(413, message, close_connection=True)

        body = self.rfile.read(length)
        if len(body) < length:
            message = f"request body ended after {len(body)} of {length} bytes"
            raise HttpError(400, message, close_connection=True)
        return body

    def read_chunked_body(self) -> bytes:
        chunks = []
        total = 0
        while True:
            size_line = self.rfile.readline(1024)
            size_text = size_line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                message = f"invalid chunk size line: {size_line!r}"
                raise HttpError(400, message, close_connection=True) from None
            if size == 0:
                break
            total += size
            if total > MAX_BODY_BYTES:
                message = f"request body exceeds the maximum of {MAX_BODY_BYTES} bytes"
                raise HttpError(413, message, close_connection=True)
            chunk = self.rfile.read(size)
            if len(chunk) < size:
                raise HttpError(400, "request body ended inside a chunk", close_connection=True)
            chunks.append(chunk)
            self.rfile.readline(1024)  # CRLF after the chunk data

        # Skip trailer fields up to the blank line that ends the message.
        while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
            pass
        return b"".join(chunks)


class StandinHTTPServer(ThreadingHTTPServer):
    """Threading HTTP server that carries the backend state and stays quiet on client errors."""

    daemon_threads = True
    allow_reuse_address = True  # lets a restart bind while old connections are in TIME_WAIT
    allow_reuse_port = False  # a second process on the same port must fail to bind
    request_queue_size = 128  # listen backlog, for bursts of concurrent health probes

    def __init__(self, address: tuple[str, int], state: BackendState) -> None:
        self.state = state
        super().__init__(address, StandinRequestHandler)

    def handle_error(self, request: object, client_address: object) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            return
        log(f"error while handling a request from {client_address}: {error!r}")


class StandinHTTPServerIPv6(StandinHTTPServer):
    address_family = socket.AF_INET6


# --------------------------------------------------------------------------- lifecycle


def non_negative_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"seconds must be a finite number >= 0, got {text!r}")
    return value


def int_in_range(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid integer: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}, got {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m slotroute.standin",
        description="Stand-in model-serving backend for demos and tests. It returns fixed, "
        "deterministic results in the shape of llama-server and OpenAI-style APIs.",
    )

    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: %(default)s)"
    )
    parser.add_argument(
        "--port",
        required=True,
        type=int_in_range(0, 65535),
        help="TCP port to bind, or 0 to pick a free port",
    )
    parser.add_argument(
        "--model", default="standin", help="model id to serve (default: %(default)s)"
    )
    parser.add_argument(
        "--model-path",
        metavar="PATH",
        help="path of a model file that must exist, otherwise exit 1 at once",
    )
    parser.add_argument(
        "--capability",
        choices=CAPABILITIES,
        default="chat",
        help="capability listed in the /v1/models entry (default: %(default)s)",
    )

    parser.add_argument(
        "--load-delay",
        type=non_negative_seconds,
        default=0.0,
        metavar="SECONDS",
        help="seconds after binding during which /health returns 503 (default: 0)",
    )
    parser.add_argument(
        "--bind-delay",
        type=non_negative_seconds,
        default=0.0,
        metavar="SECONDS",
        help="seconds to wait before binding the port (default: 0)",
    )

    parser.add_argument(
        "--crash-after",
        type=non_negative_seconds,
        metavar="SECONDS",
        help="exit with --exit-code this many seconds after process start",
    )
    parser.add_argument(
        "--exit-code",
        type=int_in_range(0, 255),
        default=1,
        metavar="N",
        help="exit status for --crash-after (default: %(default)s)",
    )

    stop_group = parser.add_mutually_exclusive_group()
    stop_group.add_argument(
        "--ignore-sigterm", action="store_true", help="log SIGTERM and keep running"
    )
    stop_group.add_argument(
        "--stop-delay",
        type=non_negative_seconds,
        default=0.0,
        metavar="SECONDS",
        help="on SIGTERM keep serving this many seconds, then exit 0 (default: 0)",
    )

    parser.add_argument(
        "--fail-health",
        action="store_true",
        help="never become ready, so /health and the inference endpoints always return 503",
    )
    return parser


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def log(message: str) -> None:
    print(f"standin: {message}", file=sys.stderr, flush=True)


def crash(crash_after: float, exit_code: int) -> None:
    """Exit at once with exit_code through os._exit, skipping Python cleanup as a crash would."""
    sys.stderr.flush()
    os.write(2, f"standin: crashing on purpose after {crash_after} s\n".encode())
    os._exit(exit_code)


def start_server(options: argparse.Namespace) -> StandinHTTPServer | None:
    """Bind the port and start serving in a daemon thread.

    Prints the error and returns None if binding fails.
    """
    state = BackendState(
        model=options.model,
        capability=options.capability,
        fail_health=options.fail_health,
        ready_at=time.monotonic() + options.load_delay,
    )
    server_class = StandinHTTPServerIPv6 if ":" in options.host else StandinHTTPServer
    try:
        server = server_class((options.host, options.port), state)
    except OSError as error:
        reason = error.strerror or str(error)
        address = format_address(options.host, options.port)
        print(f"error: cannot bind {address}: {reason}", file=sys.stderr)
        return None

    # The kernel queues connections from the bind on, and this thread starts accepting them.
    thread = threading.Thread(target=server.serve_forever, name="standin-http", daemon=True)
    thread.start()
    port = server.server_address[1]
    url = f"http://{format_address(options.host, port)}"
    log(f"serving {options.model} on {url} (load delay {options.load_delay} s)")
    return server


def install_signal_wakeup() -> tuple[socket.socket, socket.socket]:
    """Route SIGTERM and SIGINT to a socket that the main loop waits on.

    The Python-level handlers do nothing. signal.set_wakeup_fd makes the C-level handler
    write each signal number as one byte to the write end, so the main loop can react
    without code running inside a signal handler. Returns (read end, write end), and the
    caller must keep both open.
    """
    reader, writer = socket.socketpair()
    reader.setblocking(False)
    writer.setblocking(False)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda _signum, _frame: None)
    signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    return reader, writer


def wait_for_signals(reader: socket.socket, timeout: float | None) -> bytes:
    """Wait up to timeout seconds (None: forever) and return the signal numbers received."""
    readable, _, _ = select.select([reader], [], [], timeout)
    if not readable:
        return b""
    try:
        return reader.recv(256)
    except BlockingIOError:
        return b""


def run(options: argparse.Namespace) -> int:
    """Run the stand-in until a signal or --crash-after ends it, and return the exit status."""
    started_at = time.monotonic()
    if options.model_path is not None and not os.path.exists(options.model_path):
        print(f"error: model file not found: {options.model_path}", file=sys.stderr)
        return 1

    signal_reader, _signal_writer = install_signal_wakeup()
    crash_at = None if options.crash_after is None else started_at + options.crash_after
    bind_at = started_at + options.bind_delay
    exit_at: float | None = None  # set by SIGTERM with --stop-delay
    server: StandinHTTPServer | None = None
    if options.bind_delay > 0:
        log(f"waiting {options.bind_delay} s before binding (--bind-delay)")

    while True:
        now = time.monotonic()
        if crash_at is not None and now >= crash_at:
            crash(options.crash_after, options.exit_code)
        if exit_at is not None and now >= exit_at:
            log("stop delay over, exiting")
            return 0
        if server is None and now >= bind_at:
            server = start_server(options)
            if server is None:
                return 1

        deadlines = [deadline for deadline in (crash_at, exit_at) if deadline is not None]
        if server is None:
            deadlines.append(bind_at)
        timeout = max(0.0, min(deadlines) - now) if deadlines else None

        for signum in wait_for_signals(signal_reader, timeout):
            if signum == signal.SIGINT:
                log("received SIGINT, exiting")
                return 0
            if signum != signal.SIGTERM:
                continue
            if options.ignore_sigterm:
                log("received SIGTERM, ignoring it (--ignore-sigterm)")
            elif options.stop_delay > 0:
                if exit_at is None:
                    exit_at = time.monotonic() + options.stop_delay
                    log(f"received SIGTERM, exiting in {options.stop_delay} s (--stop-delay)")
            else:
                log("received SIGTERM, exiting")
                return 0


def main(argv: list[str] | None = None) -> int:
    options = build_parser().parse_args(argv)
    return run(options)
