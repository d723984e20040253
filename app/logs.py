"""The in-memory log the web UI's console shows (/internal/logs, /internal/logs/raw, WS `logs`).

A logging handler on the root logger keeps the last entries as `{"t": iso time, "m": text}`; listeners
registered with `on_flush` (the server, for clients that subscribed) get each new batch.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections import deque
from collections.abc import Callable
from datetime import datetime

MAX_ENTRIES = 300


class LogBuffer(logging.Handler):
    def __init__(self, capacity: int = MAX_ENTRIES):
        super().__init__(level=logging.DEBUG)
        self.entries: deque[dict] = deque(maxlen=capacity)
        # key -> listener; a new server replaces the previous one's listener under the same key.
        self.listeners: dict[str, Callable[[list[dict]], None]] = {}
        self._lock_entries = threading.Lock()
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:  # a bad format string in someone's log call must not break logging
            self.handleError(record)
            return
        entry = {"t": datetime.fromtimestamp(record.created).isoformat(), "m": text + "\n"}
        with self._lock_entries:
            self.entries.append(entry)
            listeners = list(self.listeners.values())
        for listener in listeners:
            try:
                listener([entry])
            except Exception:  # a failing listener must not recurse into logging
                continue

    def get_logs(self) -> list[dict]:
        with self._lock_entries:
            return list(self.entries)

    def on_flush(self, listener: Callable[[list[dict]], None], key: str | None = None) -> None:
        with self._lock_entries:
            self.listeners[key or repr(listener)] = listener


_buffer: LogBuffer | None = None


def setup_log_buffer() -> LogBuffer:
    """Attach (once) the buffer to the root logger and return it."""
    global _buffer
    root = logging.getLogger()
    if _buffer is None:
        _buffer = LogBuffer()
    if _buffer not in root.handlers:
        # main.setup_logging() may have replaced the root handlers (basicConfig(force=True)); re-attach.
        root.addHandler(_buffer)
    return _buffer


def get_logs() -> list[dict]:
    return setup_log_buffer().get_logs()


def terminal_size() -> dict:
    size = shutil.get_terminal_size(fallback=(80, 24))
    return {"cols": size.columns, "rows": size.lines}
