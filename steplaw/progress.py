"""One live status line on stderr, for any long job (a sweep, a training run).

On a terminal the line is redrawn in place (at most ~4 times a second). Not on a terminal
(a log file, CI), a plain line is written at most every `log_interval_s` seconds and at
the end, so logs stay readable. Plain Python: no torch, no steplaw imports.

    line = ProgressLine(total=72)
    line.update(done, running, failed, eta_s, detail)   # the sweep's line
    line.show("12.5M / 50M tokens, loss 3.21")           # any other text
    line.clear()                                          # before writing another line
    line.finish("sweep done")
"""
from __future__ import annotations

import sys
import time


def format_duration(seconds: float | None) -> str:
    """'42s', '3m05s', '2h01m'; '?' for unknown (None, NaN, infinite)."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class ProgressLine:
    def __init__(self, total: int | None = None, stream=None, live: bool | None = None, enabled: bool = True,
                 log_interval_s: float = 15.0):
        self.total = total
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.enabled = enabled
        self.log_interval_s = log_interval_s
        self.last_draw: float | None = None
        self.width = 0

    def text(self, done: int, running: int, failed: int, eta_s: float | None, detail: str = "") -> str:
        """The sweep's line: runs done / total, running, failed, ETA and a detail."""
        text = f"sweep: {done}/{self.total} done, {running} running, {failed} failed, ETA {format_duration(eta_s)}"
        return f"{text} | {detail}" if detail else text

    def update(self, done: int, running: int, failed: int, eta_s: float | None, detail: str = "", force: bool = False):
        if self.enabled:
            self.show(self.text(done, running, failed, eta_s, detail), force)

    def show(self, text: str, force: bool = False):
        """Draw `text` as the line (throttled unless `force`)."""
        if not self.enabled:
            return
        now = time.monotonic()
        interval = 0.25 if self.live else self.log_interval_s
        if not force and self.last_draw is not None and now - self.last_draw < interval:
            return
        self.last_draw = now
        if self.live:
            pad = max(0, self.width - len(text))
            self.stream.write("\r" + text + " " * pad)
            self.width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def clear(self):
        """Wipe the live line, so that another line (a warning) can be written clear of it;
        the next show() draws it again."""
        if self.enabled and self.live and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0

    def finish(self, message: str):
        """Replace the line by `message`, on a line of its own."""
        if not self.enabled:
            return
        self.clear()
        self.stream.write(message + "\n")
        self.stream.flush()
