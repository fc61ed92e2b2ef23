"""Progress and tables for our command-line tools, drawn by rich.

- ``ProgressBar(total, desc)``: a bar for work with a known size; ``update(n)`` or ``set(done, status=...)``.
- ``Spinner(desc)``: for work of unknown length; shows the elapsed time.
- ``print_table(rows, headers)``: an aligned table for the summary at the end of a command.
- ``format_bytes`` / ``format_seconds``: human-readable sizes and durations.

Bars and spinners write to stderr so that stdout stays clean for tables and JSON. On a terminal rich redraws
them in place (its own refresh thread keeps the elapsed time moving). When the stream is a file or a pipe
(CI logs) rich draws nothing live: we print plain lines, a bar at start, at most every 10% and at the end, a
spinner at start and end, with no ANSI codes and no carriage returns. Use them as context managers so the
line is always finished, also when the work raises.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any, Iterable, Sequence

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, SpinnerColumn, TextColumn
from rich.table import Table
from rich.text import Text

__all__ = ["ProgressBar", "Spinner", "print_table", "format_bytes", "format_seconds"]

# Dashes under the headers only, columns two spaces apart: reads the same in a log as on a terminal.
_RULE_UNDER_HEADERS = box.Box("    \n    \n -  \n    \n    \n    \n    \n    \n", ascii=True)


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


def _console(stream: IO[str] | None, default: IO[str], width: int | None = None) -> Console:
    stream = stream if stream is not None else default
    isatty = getattr(stream, "isatty", None)
    # Whether the stream is a terminal decides alone: FORCE_COLOR or TTY_COMPATIBLE in a CI job's environment
    # must not put cursor codes into its log.
    return Console(file=stream, force_terminal=bool(isatty and isatty()), highlight=False, width=width)


class _Elapsed(ProgressColumn):
    """Elapsed time as format_seconds writes it (rich's own column moves in whole seconds)."""

    def render(self, task: Any) -> Text:
        return Text(format_seconds(task.elapsed or 0.0))


def _live(console: Console, *columns: Any, tick: float | None) -> Progress:
    return Progress(*columns, _Elapsed(), console=console, refresh_per_second=1 / tick if tick else 10)


class ProgressBar:
    """A bar with percentage, ``done/total``, ``desc: status`` and the elapsed time.

    ``total`` may be any positive number; the ``done/total`` count is shown only for an integer total (a build
    monitor reports fractions of 1.0). ``done`` is clamped to ``total`` and never moves backwards. ``tick``
    (seconds): how often a terminal redraws (default ten times a second); a log gets no extra lines from it.
    """

    def __init__(self, total: float, desc: str = "", stream: IO[str] | None = None, tick: float | None = None):
        if total <= 0:
            raise ValueError(f"ProgressBar total must be positive, got {total}")
        self.total = total
        self.desc = desc
        self.done = 0.0
        self.status = ""
        self._console = _console(stream, sys.stderr)
        self._start = time.monotonic()
        self._closed = False
        self._last_decile = -1
        self._last_shown = -1.0
        self._progress: Progress | None = None
        if self._console.is_terminal:
            count = [MofNCompleteColumn()] if isinstance(total, int) else []
            self._progress = _live(self._console, BarColumn(bar_width=30), TextColumn("{task.percentage:>3.0f}%"),
                                   *count, TextColumn("{task.description}"), tick=tick)
            self._task = self._progress.add_task(self._label(), total=total)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._start

    def _label(self) -> str:
        return ": ".join(s for s in (self.desc, self.status) if s)

    def update(self, n: float = 1, status: str | None = None) -> None:
        self.set(self.done + n, status)

    def set(self, done: float, status: str | None = None) -> None:
        self.done = min(max(self.done, done), self.total)
        if status is not None:
            self.status = status
        self._draw()

    def render(self) -> str:
        """The plain line a log gets: ``45%  9/20  desc: status  12.3s``."""
        parts = [f"{self.done / self.total:4.0%}"]
        if isinstance(self.total, int):
            parts.append(f"{self.done:g}/{self.total}")
        if self._label():
            parts.append(self._label())
        parts.append(format_seconds(self.elapsed))
        return "  ".join(parts)

    def _draw(self, final: bool = False) -> None:
        if self._closed:
            return
        if self._progress is not None:
            self._progress.start()  # idempotent; the bar may be used without `with`
            self._progress.update(self._task, completed=self.done, description=self._label())
            return
        decile = int(10 * self.done / self.total)
        # the closing line is only worth printing when it says something the last line did not
        if decile > self._last_decile or (final and self.done != self._last_shown):
            self._last_decile, self._last_shown = decile, self.done
            self._console.file.write(self.render() + "\n")
            self._console.file.flush()

    def close(self) -> None:
        self._draw(final=True)
        if self._progress is not None:
            self._progress.stop()  # draws the final state and ends the line
        self._closed = True

    def __enter__(self) -> "ProgressBar":
        self._draw()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Spinner:
    """A spinner with ``desc`` and the elapsed time until the block ends, then ``desc: done in 4.2s``."""

    def __init__(self, desc: str, stream: IO[str] | None = None, interval: float = 0.1):
        self.desc = desc
        self._console = _console(stream, sys.stderr)
        self._progress = (
            _live(self._console, SpinnerColumn(spinner_name="line"), TextColumn(desc), tick=interval)
            if self._console.is_terminal else None
        )
        self._start = 0.0

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._start

    def _line(self, text: str) -> None:
        self._console.file.write(text + "\n")
        self._console.file.flush()

    def __enter__(self) -> "Spinner":
        self._start = time.monotonic()
        if self._progress is not None:
            self._progress.add_task(self.desc, total=None)
            self._progress.start()
        else:
            self._line(f"{self.desc} ...")
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        outcome = f"{self.desc}: {'failed' if exc_type is not None else 'done'} in {format_seconds(self.elapsed)}"
        if self._progress is not None:
            self._progress.transient = True  # the spinner's line gives way to the outcome
            self._progress.stop()
            self._console.print(outcome, markup=False)
        else:
            self._line(outcome)


def print_table(
    rows: Iterable[Sequence[Any]], headers: Sequence[str] | None = None, stream: IO[str] | None = None
) -> None:
    """Columns left-aligned for text and right-aligned for numbers, a rule under the headers (on stdout)."""
    body = [["" if v is None else str(v) for v in row] for row in rows]
    columns = max([len(headers or [])] + [len(r) for r in body])
    numeric = [bool(body) and all(_is_number(r[i]) for r in body if i < len(r)) for i in range(columns)]
    table = Table(box=_RULE_UNDER_HEADERS, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0),
                  show_header=bool(headers), highlight=False)
    for i in range(columns):
        table.add_column(headers[i] if headers and i < len(headers) else "",
                         justify="right" if numeric[i] else "left", no_wrap=True)
    for row in body:
        table.add_row(*row)
    # As wide as the table needs, never cut to the terminal's (or a pipe's 80) columns: a table is for reading whole.
    console = _console(stream, sys.stdout, width=1 << 16)
    # rich pads every cell to its column; trailing blanks are noise in a log or a diff.
    with console.capture() as captured:
        console.print(table, markup=False, crop=False)
    console.file.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))
    console.file.flush()


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
