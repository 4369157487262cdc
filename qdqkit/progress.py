"""Progress display for long runs: which step is running and for how long, on stderr.

On a terminal a status line is redrawn every half second while a step runs; elsewhere (logs, CI) each step
prints one line when it starts and is left alone after that, so captured output stays readable.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO


class Progress:
    """Callable with a message (``ctx.say``); ``close()`` ends the display. ``enabled=False`` prints nothing."""

    def __init__(self, stream: TextIO | None = None, *, enabled: bool = True, live: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.live = self.stream.isatty() if live is None else live
        self._message = ""
        self._since = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self.enabled and self.live:
            self._thread = threading.Thread(target=self._tick, name="qdqkit-progress", daemon=True)
            self._thread.start()

    def __call__(self, message: str) -> None:
        if not self.enabled:
            return
        with self._lock:
            self._message, self._since = message, time.monotonic()
            if not self.live:
                self.stream.write(f"qdqkit: {message}\n")
                self.stream.flush()

    def _tick(self) -> None:
        while not self._stop.wait(0.5):
            with self._lock:
                if self._message:
                    elapsed = time.monotonic() - self._since
                    self.stream.write(f"\r\x1b[Kqdqkit: {self._message} ({elapsed:.0f} s)")
                    self.stream.flush()

    def close(self) -> None:
        """Stop redrawing and clear the status line."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)
            with self._lock:
                self.stream.write("\r\x1b[K")
                self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
