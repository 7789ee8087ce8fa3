"""Progress of a long loop: tqdm's bar on a terminal; in a job's log (stderr not a terminal), a plain line now and
then instead, so that a log file holds no carriage returns, cursor moves or half-drawn bars."""
import sys
import time

from tqdm import tqdm

from .budget import format_duration
from .helpers import log

LOG_EVERY_SECONDS = 60


class ProgressBar:
    """`total` units of work (steps, images), `initial` of them done already. On a terminal, tqdm's bar; elsewhere a
    log line every LOG_EVERY_SECONDS ("training: 120/3000 steps (4%), 3.10 steps/s, 15 min left, loss 2.3100").
    `enabled=False` shows nothing (the other processes of a multi-process run)."""

    def __init__(self, total, desc, unit, initial=0, enabled=True, leave=True):
        self.total, self.desc, self.unit, self.done, self.postfix = total, desc, unit, initial, ""
        self.enabled = enabled
        self.bar = None
        if enabled and sys.stderr.isatty():
            # miniters=1: tqdm's monitor thread would otherwise redraw between mininterval's redraws
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave, dynamic_ncols=True,
                            mininterval=0.5, miniters=1)
        self.started, self.done_at_start = time.time(), initial
        self.last_line = self.started

    def update(self, n=1):
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and time.time() - self.last_line >= LOG_EVERY_SECONDS:
            self.last_line = time.time()
            log.info(self.line())

    def set_postfix(self, text):
        """Shown after the counts: on the terminal at the next redraw, in the log at the next line."""
        self.postfix = text
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)

    def line(self):
        rate = (self.done - self.done_at_start) / max(time.time() - self.started, 1e-9)
        left = f", {format_duration((self.total - self.done) / rate)} left" if rate > 0 and self.total else ""
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        return (f"{self.desc}: {self.done}/{self.total} {self.unit}s{share}, {rate:.2f} {self.unit}s/s{left}"
                + (f", {self.postfix}" if self.postfix else ""))

    def close(self):
        if self.bar is not None:
            self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
