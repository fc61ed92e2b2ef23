"""What the runtime's command-line tools share: the parser layout and the one-line handling of expected errors."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from core.errors import AnchorRuntimeError


def parser(prog: str, description: str, epilog: str) -> argparse.ArgumentParser:
    """A parser whose description and epilog keep their own line breaks (examples, exit codes)."""
    return argparse.ArgumentParser(
        prog=prog, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def probability(text: str) -> float:
    """An argparse type for scores and thresholds: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}") from None
    if not 0 <= value <= 1:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1 (scores are probabilities), got {text}")
    return value


def guarded(run: Callable[..., int], *args) -> int:
    """run(*args)'s exit code; an expected failure becomes one `error:` line on stderr and its own exit code."""
    try:
        return run(*args)
    except AnchorRuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
