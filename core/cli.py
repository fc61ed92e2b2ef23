"""Conventions every command-line tool shares: the parser layout, argument types and the one error line.

An error is printed exactly as argparse prints its own, ``prog: error: message`` with the parser's ``prog``,
so a bad option and a missing file read alike; ``guarded`` maps an expected failure (core.errors) to its exit
code. Argument types raise ``argparse.ArgumentTypeError``, which argparse reports the same way with exit code 2.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import threading
from typing import Any, Callable

from core.errors import EXIT_INTERRUPTED, EXIT_TERMINATED, AnchorError, Terminated


def parser(prog: str, description: str, epilog: str) -> argparse.ArgumentParser:
    """A parser whose description and epilog keep their own line breaks (examples, exit codes)."""
    return argparse.ArgumentParser(
        prog=prog, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def fail(prog: str, message: Any, code: int) -> int:
    """One error line on stderr, ``prog: error: message``; returns ``code`` for the caller to exit with."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated()


def guarded(prog: str, run: Callable[..., int], *args: Any) -> int:
    """run(*args)'s exit code; an expected failure becomes one error line on stderr and its class's exit code.

    Ctrl-C and SIGTERM become one line, ``prog: interrupted``, and exit 130 (143 for SIGTERM) once the
    KeyboardInterrupt has unwound ``run``: our writes are atomic (core.sidecar.replace_atomically) and temporary
    folders are context managers, so nothing is left half-written. SIGTERM takes that path only where nothing
    else handles it (a server that installs its own handler inside ``run`` keeps it)."""
    restore = None
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        restore = signal.signal(signal.SIGTERM, _terminate)
    try:
        return run(*args)
    except AnchorError as exc:
        return fail(prog, exc, exc.exit_code)
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, Terminated)
        print(f"{prog}: {'terminated (SIGTERM)' if terminated else 'interrupted'}", file=sys.stderr)
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
    finally:
        if restore is not None:
            signal.signal(signal.SIGTERM, restore)


# ---------------------------------------------------------------- argument types


def _bad(text: str, expected: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")


def positive_int(text: str) -> int:
    """An integer of at least 1 (a batch, a count, MiB)."""
    try:
        value = int(text)
    except ValueError:
        raise _bad(text, "a positive integer") from None
    if value < 1:
        raise _bad(text, "a positive integer")
    return value


def positive_float(text: str) -> float:
    """A positive finite number (a tolerance: <= 0 would fail everything, nan or inf pass anything)."""
    try:
        value = float(text)
    except ValueError:
        raise _bad(text, "a positive finite number, e.g. 1e-3") from None
    if not (math.isfinite(value) and value > 0):
        raise _bad(text, "a positive finite number, e.g. 1e-3")
    return value


def probability(text: str) -> float:
    """A number in [0, 1]: a score or a threshold."""
    try:
        value = float(text)
    except ValueError:
        raise _bad(text, "a number from 0 to 1") from None
    if not 0 <= value <= 1:  # also refuses nan
        raise _bad(text, "a number from 0 to 1 (scores are probabilities)")
    return value


def int_list(text: str, expected: str = "comma-separated positive integers, e.g. 1,4",
             names: tuple[str, ...] = ()) -> list[int]:
    """Comma-separated positive integers: ``1,4``. A refusal of several names the one that is wrong (by its
    ``names`` entry, e.g. MIN, when given)."""
    items = text.split(",")
    values = []
    for i, item in enumerate(items):
        try:
            value = int(item)
        except ValueError:
            value = 0
        if value < 1:
            which = f"{names[i]} " if i < len(names) else ""
            detail = f": {which}{item.strip()!r} is not a positive integer" if len(items) > 1 else ""
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}{detail}")
        values.append(value)
    return values


def gpu_list(text: str) -> list[int]:
    """Comma-separated GPU indices, from 0, each once: ``0,1``."""
    expected = "comma-separated GPU indices, e.g. 0,1"
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise _bad(text, expected) from None
    if min(values) < 0 or len(set(values)) != len(values):
        raise _bad(text, expected)
    return values


def min_opt_max(text: str) -> tuple[int, int, int]:
    """``MIN,OPT,MAX`` positive integers (their order is for the caller to check, with a better message)."""
    expected = "MIN,OPT,MAX, e.g. 1,1,8"
    values = int_list(text, expected, ("MIN", "OPT", "MAX"))
    if len(values) != 3:
        raise _bad(text, expected)
    return values[0], values[1], values[2]


def hw(text: str) -> tuple[int, int]:
    """``HEIGHTxWIDTH`` in pixels, both positive: ``800x800``."""
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise _bad(text, "HEIGHTxWIDTH, e.g. 800x800") from None
    if min(height, width) < 1:
        raise _bad(text, "HEIGHTxWIDTH with positive sides, e.g. 800x800")
    return height, width


def hw_list(text: str) -> list[tuple[int, int]]:
    """Comma-separated ``HxW``: ``800x800,1344x1344``."""
    try:
        return [hw(item) for item in text.split(",")]
    except argparse.ArgumentTypeError:
        raise _bad(text, "HxW[,HxW...], e.g. 800x800,1344x1344") from None
