"""Expected failures of the runtime, each with the exit code its command-line tools use."""

from __future__ import annotations


class AnchorRuntimeError(Exception):
    """An expected failure with a one-line message that names the problem and the fix."""

    exit_code = 2


class BadInput(AnchorRuntimeError):
    """Something the user gave is wrong: a missing engine or sidecar, mismatched weights, an image too large."""

    exit_code = 2


class Unavailable(AnchorRuntimeError):
    """The machine cannot run the engine: no GPU, no TensorRT, another TensorRT version or GPU."""

    exit_code = 3
