"""Log setup for the services: readable lines by default, JSON lines on request.

`configure()` installs one stderr handler with two filters, in this order:

- RepeatFilter passes at most `limit` identical lines (same logger, level,
  template and text) per `interval` seconds, then logs how many it dropped.
- RedactFilter replaces every registered secret and every `Bearer <value>`
  with `[REDACTED]` in the message, its exception text and extra fields.

Secrets are registered process-wide with `register_secret()`; the services do
it when they read a token, so handlers set up before that still redact it.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable

REDACTED = "[REDACTED]"

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "taskName",
}
_BEARER_RE = re.compile(r"(?i)\b(bearer)(\s+)[^\s'\",;]+")

_secrets: set[str] = set()
_secrets_lock = threading.Lock()


def _message(record: logging.LogRecord) -> str:
    """Return the record's text; a call with mismatched arguments falls back to the template."""
    try:
        return record.getMessage()
    except (TypeError, ValueError):
        return str(record.msg)


def register_secret(value: str) -> None:
    """Add a value that no log line may contain from now on."""
    if value:
        with _secrets_lock:
            _secrets.add(value)


def registered_secrets() -> tuple[str, ...]:
    with _secrets_lock:
        # Longest first, so a secret that contains another is replaced whole.
        return tuple(sorted(_secrets, key=len, reverse=True))


def redact(text: str, secrets: Iterable[str] | None = None) -> str:
    """Return `text` with secrets and bearer credentials replaced by [REDACTED]."""
    for secret in registered_secrets() if secrets is None else secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return _BEARER_RE.sub(lambda match: f"{match.group(1)}{match.group(2)}{REDACTED}", text)


class RedactFilter(logging.Filter):
    """Removes secrets from a record before any formatter formats it. Never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        secrets = registered_secrets()
        message = _message(record)
        cleaned = redact(message, secrets)
        if cleaned != message:
            record.msg = cleaned
            record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, secrets)
        if record.stack_info:
            record.stack_info = redact(record.stack_info, secrets)
        for key, value in list(vars(record).items()):
            if key not in _RECORD_ATTRIBUTES and isinstance(value, str):
                setattr(record, key, redact(value, secrets))
        return True


@dataclasses.dataclass
class _Window:
    started: float
    passed: int = 1
    suppressed: int = 0
    # A sample record of the repeated line, for the summary.
    record: logging.LogRecord | None = None


class RepeatFilter(logging.Filter):
    """Passes at most `limit` identical lines per `interval` seconds and counts the rest.

    Lines are identical when logger, level, template and rendered text match.
    The template alone is not enough: one template such as "slot=%s %s -> %s"
    covers every slot's transitions, and those are distinct events.

    When a window with dropped lines ends, the filter hands `emit` a summary
    record ("suppressed N repeats in the last S s: <line>") at the same level.
    NOTE: windows are checked only when a record arrives, so a summary appears
    with the next log line of any kind after the window ends, not on a timer.
    """

    def __init__(
        self,
        limit: int = 10,
        interval: float = 60.0,
        *,
        emit: Callable[[logging.LogRecord], object] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        super().__init__()
        if limit < 1:
            raise ValueError(f"invalid limit {limit}; must be at least 1")
        if interval <= 0:
            raise ValueError(f"invalid interval {interval}; must be positive")
        self.limit = limit
        self.interval = interval
        self.emit = emit
        self._clock = clock
        # Ordered by window start, so expired windows are always at the front.
        self._windows: collections.OrderedDict[tuple, _Window] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.suppressed_total = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "repeat_summary", False):
            return True
        now = self._clock()
        key = (record.name, record.levelno, str(record.msg), _message(record))
        with self._lock:
            summaries = self._expire(now)
            window = self._windows.get(key)
            if window is None:
                self._windows[key] = _Window(started=now)
                allowed = True
            elif window.passed < self.limit:
                window.passed += 1
                allowed = True
            else:
                window.suppressed += 1
                window.record = record
                self.suppressed_total += 1
                allowed = False
        for summary in summaries:
            self._send(summary)
        return allowed

    def flush(self) -> None:
        """Emit the summaries of all windows with dropped lines, ended or not."""
        with self._lock:
            summaries = [self._summary(window, self._clock())
                         for window in self._windows.values() if window.suppressed]
            self._windows.clear()
        for summary in summaries:
            self._send(summary)

    def _expire(self, now: float) -> list[logging.LogRecord]:
        summaries = []
        while self._windows:
            key, window = next(iter(self._windows.items()))
            if now - window.started < self.interval:
                break
            del self._windows[key]
            if window.suppressed:
                summaries.append(self._summary(window, now))
        return summaries

    @staticmethod
    def _summary(window: _Window, now: float) -> logging.LogRecord:
        sample = window.record
        assert sample is not None
        summary = logging.LogRecord(
            sample.name, sample.levelno, sample.pathname, sample.lineno,
            "suppressed %d repeats in the last %.0f s: %s",
            (window.suppressed, now - window.started, _message(sample)), None,
        )
        summary.repeat_summary = True
        return summary

    def _send(self, record: logging.LogRecord) -> None:
        if self.emit is not None:
            self.emit(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, extra fields, exception text."""

    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRIBUTES and key not in payload:
                payload[key] = value if isinstance(value, (str, int, float, bool, type(None))) \
                    else str(value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            payload["exception"] = record.exc_text
        if record.stack_info:
            payload["stack"] = record.stack_info
        return json.dumps(payload, ensure_ascii=False)


def protect_handler(handler: logging.Handler, *, repeat_limit: int = 10,
                    repeat_interval: float = 60.0) -> RepeatFilter:
    """Add the repeat and redaction filters to `handler`; return the repeat filter."""
    repeats = RepeatFilter(repeat_limit, repeat_interval, emit=handler.handle)
    handler.addFilter(repeats)
    handler.addFilter(RedactFilter())
    return repeats


def configure(level: str = "info", log_format: str = "text", *, repeat_limit: int = 10,
              repeat_interval: float = 60.0) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    protect_handler(handler, repeat_limit=repeat_limit, repeat_interval=repeat_interval)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # grpc's own asyncio layer logs every cancelled stream at debug; keep it quiet.
    logging.getLogger("grpc").setLevel(logging.WARNING)
    logging.getLogger("asyncio").setLevel(logging.WARNING)
