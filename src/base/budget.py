"""--time-limit: a job stops, with its state saved, before the cluster's run-time limit (SGE h_rt) kills it.

Before each step and each validation the Trainer asks `TimeBudget.fits`: does the next piece of work (the longest
of its kind seen in this job) plus one final state save still end before the limit? The save's share is measured
too: the longest state save of this job x TIME_LIMIT_SAVE_FACTOR (a busy file system is slower), never less than
TIME_LIMIT_MIN_MARGIN, which is all there is to go on before the first save. The limit counts from the start of
this process: under the SGE wrappers, which exec python, that is the job's start. A requeued job starts afresh.
"""
import os
import re
import time
from contextlib import contextmanager

from . import constants as C
from .helpers import UserError

_IMPORTED = time.time()


def parse_time_limit(text, flag="--time-limit"):
    """'HH:MM:SS' (as qsub's h_rt; also H:MM:SS, MM:SS or plain seconds, as qstat may show it) -> seconds;
    '' or None -> None (no limit)."""
    if text is None or str(text).strip() == "":
        return None
    match = re.fullmatch(r"(?:(?:(\d+):)?(\d+):)?(\d+)", str(text).strip())
    if match:
        hours, minutes, seconds = (int(part or 0) for part in match.groups())
        total = hours * 3600 + minutes * 60 + seconds
        if total > 0 and (match.group(2) is None or (minutes < 60 and seconds < 60)):
            return total
    raise UserError(f"{flag} {text!r}: expected HH:MM:SS greater than zero (e.g. 23:30:00), or seconds")


def format_duration(seconds):
    """Seconds as HH:MM:SS (the form qsub's h_rt takes), rounded down."""
    seconds = int(seconds)
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def process_start_time():
    """When this process started, in time.time() terms (Linux /proc), else when this module was imported."""
    try:
        start_ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        uptime = float(open("/proc/uptime").read().split()[0])
        age = uptime - start_ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - age if age >= 0 else _IMPORTED
    except (OSError, ValueError, IndexError):
        return _IMPORTED


def save_margin(longest_save):
    """Seconds kept for the final state save, from the longest one measured (0 before any)."""
    return max(C.TIME_LIMIT_SAVE_FACTOR * longest_save, C.TIME_LIMIT_MIN_MARGIN)


class TimeBudget:
    """The time left before --time-limit (None: no limit, everything fits) and the longest work measured so far."""

    def __init__(self, limit_seconds=None, started=None):
        self.limit = limit_seconds
        if started is None:
            started = process_start_time()
        self.deadline = None if limit_seconds is None else started + limit_seconds
        self.longest = {"step": 0.0, "validation": 0.0, "save": 0.0}
        self.lap_started = time.time()

    def left(self):
        return self.deadline - time.time()

    def needs(self, work):
        """Seconds `work` ('step', 'validation' or None: nothing more) and the final save take, at the longest."""
        return (self.longest[work] if work else 0.0) + save_margin(self.longest["save"])

    def fits(self, work=None):
        return self.deadline is None or self.needs(work) <= self.left()

    def start_lap(self):
        self.lap_started = time.time()

    def lap(self, work):
        """Count the time since the last lap, start_lap or measured block as one `work` (a step: its data too)."""
        now = time.time()
        self.longest[work] = max(self.longest[work], now - self.lap_started)
        self.lap_started = now

    @contextmanager
    def measure(self, work):
        """Time the work in a `with` block; a block left by an exception (an interrupted validation) is not counted."""
        started = time.time()
        yield
        self.lap_started = time.time()
        self.longest[work] = max(self.longest[work], self.lap_started - started)

    def describe(self, work):
        """One line on why `work` does not fit."""
        what = f"the next {work} (~{self.longest[work]:.0f} s) and " if work else ""
        return (f"{max(self.left(), 0):.0f} s left of --time-limit {format_duration(self.limit)}, not enough for "
                f"{what}a final state save (~{save_margin(self.longest['save']):.0f} s kept for it)")

