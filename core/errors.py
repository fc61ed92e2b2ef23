"""Exit codes of every command-line tool, and the expected failures that carry them.

An exception derived from ``AnchorError`` is a failure we foresaw: its message is one line that names the problem
and the fix, and ``core.cli.guarded`` turns it into ``prog: error: message`` and the exit code of its class.
Errors of other layers (weights, netdef, ...) derive from ``BadInput``/``Unavailable``/``Failed`` as well, so no
command needs its own table of which exception means which code.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1  # the work ran but did not succeed: a build TensorRT refused, blocks that differ, skipped images
EXIT_BAD_INPUT = 2  # something the user gave is wrong (argparse exits 2 on bad arguments too)
EXIT_ENVIRONMENT = 3  # the machine lacks something: GPU, TensorRT, PyTorch
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as a shell reports it); SIGTERM gives 143 (128 + SIGTERM)
EXIT_TERMINATED = 143


class AnchorError(Exception):
    """An expected failure with a one-line message that names the problem and the fix."""

    exit_code = EXIT_BAD_INPUT


class BadInput(AnchorError):
    """Something the user gave is wrong: a missing engine or sidecar, mismatched weights, an image too large."""

    exit_code = EXIT_BAD_INPUT


class Unavailable(AnchorError):
    """The machine cannot do the work: no GPU, no TensorRT (or not one that can), no PyTorch."""

    exit_code = EXIT_ENVIRONMENT


class Failed(AnchorError):
    """The input was fine but the work did not succeed (TensorRT refused to build, the interpreter gave up)."""

    exit_code = EXIT_FAILED


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as Ctrl-C's KeyboardInterrupt is, so that the same ``finally`` blocks and
    context managers remove temporary and partial files (``core.cli.guarded`` installs it)."""


class Interrupted(AnchorError):
    """The user interrupted the work (Ctrl-C); what was half done is removed, nothing is written."""

    exit_code = EXIT_INTERRUPTED
