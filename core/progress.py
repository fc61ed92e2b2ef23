"""Tiny text progress reporting for our command-line tools (standard library only).

- ``ProgressBar(total, desc)``: a bar for work with a known size; ``update(n)`` or ``set(done, status=...)``.
- ``Spinner(desc)``: for work of unknown length; shows the elapsed time from a background thread.
- ``print_table(rows, headers)``: an aligned plain-text table for the summary at the end of a command.
- ``format_bytes`` / ``format_seconds``: human-readable sizes and durations.

Bars and spinners write to stderr so that stdout stays clean for tables and JSON. On a terminal they redraw
one line in place; when stderr is a file or a pipe (CI logs) they print a plain line at most every 10% (bar)
or only at start and end (spinner), so logs stay short. Use them as context managers so the line is always
finished, also when the work raises.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import IO, Any, Iterable, Sequence

__all__ = ["ProgressBar", "Spinner", "print_table", "format_bytes", "format_seconds"]


def format_seconds(seconds: float) -> str:
    """``4.2s``, ``3m07s``, ``1h02m``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def format_bytes(n: int | float) -> str:
    """``512 B``, ``1.5 KiB``, ``162.3 MiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            break
        value /= 1024
    return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"


def _is_tty(stream: IO[str]) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class _Line:
    """One status line on a stream: redrawn in place on a terminal, appended elsewhere."""

    def __init__(self, stream: IO[str] | None):
        self.stream = stream if stream is not None else sys.stderr
        self.tty = _is_tty(self.stream)
        self._width = 0
        self._lock = threading.Lock()

    def show(self, text: str, final: bool = False) -> None:
        with self._lock:
            if self.tty:
                pad = " " * max(0, self._width - len(text))
                self.stream.write("\r" + text + pad + ("\n" if final else ""))
                self._width = 0 if final else len(text)
            else:
                self.stream.write(text + "\n")
            self.stream.flush()


class ProgressBar:
    """``[#########.........]  45%  9/20  desc: status  12.3s``.

    ``total`` may be any positive number; the ``done/total`` count is shown only for an integer total (a build
    monitor reports fractions of 1.0). ``done`` is clamped to ``total`` and never moves backwards. ``tick`` (seconds):
    on a terminal, redraw that often from a background thread too, so the elapsed time keeps moving through long
    steps that report nothing (a log gets no extra lines).
    """

    WIDTH = 30

    def __init__(self, total: float, desc: str = "", stream: IO[str] | None = None, tick: float | None = None):
        if total <= 0:
            raise ValueError(f"ProgressBar total must be positive, got {total}")
        self.total = total
        self.desc = desc
        self.done = 0.0
        self.status = ""
        self._line = _Line(stream)
        self._start = time.monotonic()
        self._last_draw = -1.0
        self._last_decile = -1
        self._last_shown = -1.0
        self._closed = False
        self._tick = tick
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._start

    def _tick_loop(self) -> None:
        while not self._stop.wait(self._tick):
            self._draw()

    def update(self, n: float = 1, status: str | None = None) -> None:
        self.set(self.done + n, status)

    def set(self, done: float, status: str | None = None) -> None:
        self.done = min(max(self.done, done), self.total)
        if status is not None:
            self.status = status
        self._draw()

    def render(self) -> str:
        frac = self.done / self.total
        filled = int(frac * self.WIDTH)
        bar = "#" * filled + "." * (self.WIDTH - filled)
        parts = [f"[{bar}] {frac:4.0%}"]
        if isinstance(self.total, int):
            parts.append(f"{self.done:g}/{self.total}")
        label = ": ".join(s for s in (self.desc, self.status) if s)
        if label:
            parts.append(label)
        parts.append(format_seconds(self.elapsed))
        return "  ".join(parts)

    def _draw(self, final: bool = False) -> None:
        if self._closed:
            return
        if self._line.tty:
            now = time.monotonic()
            if final or now - self._last_draw >= 0.1:  # redrawing faster only burns CPU
                self._last_draw = now
                self._line.show(self.render(), final)
        else:
            decile = int(10 * self.done / self.total)
            # the closing line is only worth printing when it says something the last line did not
            if decile > self._last_decile or (final and self.done != self._last_shown):
                self._last_decile, self._last_shown = decile, self.done
                self._line.show(self.render())

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        self._draw(final=True)
        self._closed = True

    def __enter__(self) -> "ProgressBar":
        self._draw()
        if self._tick and self._line.tty:
            self._ticker = threading.Thread(target=self._tick_loop, daemon=True)
            self._ticker.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Spinner:
    """``| desc  12.3s`` redrawn ten times a second by a daemon thread until the block ends."""

    FRAMES = "|/-\\"

    def __init__(self, desc: str, stream: IO[str] | None = None, interval: float = 0.1):
        self.desc = desc
        self.interval = interval
        self._line = _Line(stream)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = 0.0

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._start

    def _spin(self) -> None:
        frame = 0
        while not self._stop.wait(self.interval):
            frame += 1
            self._line.show(f"{self.FRAMES[frame % 4]} {self.desc}  {format_seconds(self.elapsed)}")

    def __enter__(self) -> "Spinner":
        self._start = time.monotonic()
        if self._line.tty:
            self._thread = threading.Thread(target=self._spin, daemon=True)
            self._thread.start()
        else:
            self._line.show(f"{self.desc} ...")
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        outcome = "failed" if exc_type is not None else "done"
        self._line.show(f"{self.desc}: {outcome} in {format_seconds(self.elapsed)}", final=True)


def print_table(
    rows: Iterable[Sequence[Any]], headers: Sequence[str] | None = None, stream: IO[str] | None = None
) -> None:
    """Columns left-aligned for text and right-aligned for numbers, a rule under the headers."""
    body = [["" if v is None else str(v) for v in row] for row in rows]
    numeric = [
        all(_is_number(row[i]) for row in body if i < len(row)) and bool(body)
        for i in range(max([len(headers or [])] + [len(r) for r in body]))
    ]
    table = ([list(headers)] if headers else []) + body
    widths = [max(len(r[i]) for r in table if i < len(r)) for i in range(len(numeric))]

    def fmt(row: Sequence[str]) -> str:
        cells = [
            (v.rjust(widths[i]) if numeric[i] else v.ljust(widths[i])) for i, v in enumerate(row)
        ]
        return "  ".join(cells).rstrip()

    out = stream if stream is not None else sys.stdout
    if headers:
        out.write(fmt(list(headers)) + "\n")
        out.write("  ".join("-" * w for w in widths) + "\n")
    for row in body:
        out.write(fmt(row) + "\n")
    out.flush()


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
