"""The sweep's one live progress line on stderr.

On a terminal the line is redrawn in place (at most ~4 times a second): runs done / total,
running, failed, ETA, and the latest progress of a running run. Not on a terminal (a log
file, CI), a plain line is written at most every `log_interval_s` seconds and at the end.
"""
from __future__ import annotations

import sys
import time


def format_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class ProgressLine:
    def __init__(self, total: int, stream=None, live: bool | None = None, enabled: bool = True,
                 log_interval_s: float = 15.0):
        self.total = total
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.enabled = enabled
        self.log_interval_s = log_interval_s
        self.last_draw: float | None = None
        self.width = 0

    def text(self, done: int, running: int, failed: int, eta_s: float | None, detail: str = "") -> str:
        text = f"sweep: {done}/{self.total} done, {running} running, {failed} failed, ETA {format_duration(eta_s)}"
        return f"{text} | {detail}" if detail else text

    def update(self, done: int, running: int, failed: int, eta_s: float | None, detail: str = "", force: bool = False):
        if not self.enabled:
            return
        now = time.monotonic()
        interval = 0.25 if self.live else self.log_interval_s
        if not force and self.last_draw is not None and now - self.last_draw < interval:
            return
        self.last_draw = now
        text = self.text(done, running, failed, eta_s, detail)
        if self.live:
            pad = max(0, self.width - len(text))
            self.stream.write("\r" + text + " " * pad)
            self.width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def finish(self, message: str):
        if not self.enabled:
            return
        if self.live:
            self.stream.write("\r" + " " * self.width + "\r")
        self.stream.write(message + "\n")
        self.stream.flush()
