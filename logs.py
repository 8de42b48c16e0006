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


ACCESS_LOG = logging.getLogger("users.access")


def log_access(method: str, path: str, status: int, seconds: float, request_id: str, trace_id: int = 0) -> None:
    """Log a request's line; its figures are fields of their own too, for a log pipeline that filters on them."""
    milliseconds = round(seconds * 1000, 1)
    if not path.isprintable():  # a decoded %0A would start a forged line in a plain-text log
        path = path.encode("unicode_escape").decode("ascii")
    line = f"{method} {path} {status} {milliseconds}ms {request_id}"
    fields: dict[str, object] = {"method": method, "path": path, "status": status, "duration_ms": milliseconds}
    fields["request_id"] = request_id
    if trace_id:
        fields["trace_id"] = f"{trace_id:032x}"  # how logs and traces join up
        line += f" trace_id={fields['trace_id']}"
    # A scrape every few seconds would drown the requests' lines.
    (ACCESS_LOG.debug if path == "/metrics" else ACCESS_LOG.info)(line, extra={"fields": fields})


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
