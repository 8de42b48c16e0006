"""The log: one line per record on stderr, one JSON object per line in production.

Imported by gunicorn.conf.py too, before anything else, so that gunicorn's and uvicorn's own
lines are JSON like the app's: it must import nothing that reads the environment at import
(prometheus_client does).
"""

import json
import logging
from datetime import UTC, datetime

# One encoder for every line: json.dumps() with any option builds a new encoder per call.
JSON_LINE = json.JSONEncoder(ensure_ascii=False, default=str)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the record's `fields`.

    `fields` is a dict a call passes as `extra={"fields": {...}}` (the access line's method,
    path, status, ...), so that a log pipeline filters on them without parsing the message.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return JSON_LINE.encode(entry)


def log_formatter(environment: str) -> logging.Formatter:
    """JSON in production, for a log pipeline; a line a person reads in development."""
    if environment == "production":
        return JsonFormatter()
    return logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")


def configure_logging(environment: str, level: str) -> None:
    """Send the service's own log ("users" and below) to stderr, one line per record."""
    handler = logging.StreamHandler()
    handler.setFormatter(log_formatter(environment))
    root = logging.getLogger("users")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
