"""A one-line progress bar for long work (denoising steps, chunks), on stderr."""
from __future__ import annotations

import sys
import time


class Progress:
    """A one-line progress bar on stderr: done/total, s/step and ETA (a new line per update off a terminal)."""

    def __init__(self, total: int, label: str, stream=None, enabled: bool = True, width: int = 24):
        self.total, self.label, self.width = total, label, width
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.done = 0
        self.start = time.perf_counter()
        self.first: float | None = None        # time of the first update: s/step excludes warm-up (loading)
        self.shown = 0.0                       # when the line was last written
        self.shown_len = 0                     # its length (a shorter line must blank the rest)

    def update(self, n: int = 1, note: str = "") -> None:
        self.done += n
        now = time.perf_counter()
        if self.first is None:
            self.first, rate = now, now - self.start
        else:
            rate = (now - self.first) / max(self.done - 1, 1)
        last = self.done >= self.total
        # at most 10 lines/s on a terminal, one per 5 s in a log (plus the first and the last)
        if not self.enabled or (self.done > 1 and not last and now - self.shown < (0.1 if self.tty else 5.0)):
            return
        self.shown = now
        eta = rate * (self.total - self.done)
        fill = int(self.width * self.done / max(self.total, 1))
        line = (f"{self.label} {self.done}/{self.total} [{'#' * fill}{'.' * (self.width - fill)}] "
                f"{rate:.2f} s/step, ETA {int(eta // 60):02d}:{int(eta % 60):02d}" + (f" {note}" if note else ""))
        if self.tty:
            self.stream.write("\r" + line.ljust(self.shown_len) + ("\n" if last else ""))
            self.shown_len = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
