"""Logging for the serving container: one JSON object per line, the way Cloud Logging parses it.

Vertex AI sends a container's stdout/stderr to Cloud Logging, which reads a JSON line's
``severity`` and ``message`` as the entry's severity and summary and ``httpRequest`` as the
request (status, latency, sizes: shown and filterable like a load balancer's logs); any other
field lands in ``jsonPayload``. ``--log-format text`` gives plain lines for a terminal.

Records are formatted and written by a background thread (QueueHandler/QueueListener), so a
slow or blocked stderr pipe never stalls the event loop; the queue is bounded and drops (and
counts) records rather than growing without limit.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import queue
import sys
import time
from datetime import UTC, datetime

# Fields a record may carry in ``extra={"fields": {...}}``; merged into the JSON entry.
FIELDS_ATTR = "fields"
QUEUE_SIZE = 10_000


class CloudLoggingFormatter(logging.Formatter):
    """``{"severity", "message", "time", "logger", ...fields}``; tracebacks go in ``message``
    (Error Reporting picks stack traces up from there)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        entry = {
            "severity": record.levelname,  # DEBUG/INFO/WARNING/ERROR/CRITICAL are Cloud Logging names
            "message": message,
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="microseconds"),
            "logger": record.name,
        }
        fields = getattr(record, FIELDS_ATTR, None)
        if isinstance(fields, dict):
            entry.update(fields)
        return json.dumps(entry, default=str, ensure_ascii=False)


class _DroppingQueueHandler(logging.handlers.QueueHandler):
    dropped = 0

    def enqueue(self, record):
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            type(self).dropped += 1

    def prepare(self, record):
        # Format in the listener thread, not here (QueueHandler.prepare formats eagerly).
        return record


class LogSetup:
    """Installed logging; ``close()`` flushes what is queued (call it before the process exits)."""

    def __init__(self, level: str = "INFO", fmt: str = "json", stream=None):
        stream = stream or sys.stderr
        if fmt == "json":
            formatter: logging.Formatter = CloudLoggingFormatter()
        elif fmt == "text":
            formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        else:
            raise ValueError(f"log format must be json or text, got {fmt!r}")
        out = logging.StreamHandler(stream)
        out.setFormatter(formatter)
        self._queue: queue.Queue = queue.Queue(QUEUE_SIZE)
        self.handler = _DroppingQueueHandler(self._queue)
        self.listener = logging.handlers.QueueListener(self._queue, out, respect_handler_level=False)
        root = logging.getLogger()
        for h in list(root.handlers):
            root.removeHandler(h)
        root.addHandler(self.handler)
        root.setLevel(level.upper())
        # uvicorn's own loggers propagate to ours; its access log is replaced by the request log.
        for name in ("uvicorn", "uvicorn.error"):
            logging.getLogger(name).handlers.clear()
            logging.getLogger(name).propagate = True
        logging.getLogger("uvicorn.access").disabled = True
        self.listener.start()

    def close(self) -> None:
        self.listener.stop()  # drains the queue
        if _DroppingQueueHandler.dropped:
            print(
                json.dumps({"severity": "WARNING", "message": f"{_DroppingQueueHandler.dropped} log records "
                            "dropped: the log queue was full", "time": time.time()}),
                file=sys.stderr,
            )
