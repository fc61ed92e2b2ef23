"""The end of every benchmark that reports JSON: the report on stdout, and the same text in --out when given."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from core.sidecar import write_atomic


def emit(report: Any, out: Path | None, indent: int) -> None:
    """Print `report` as JSON (`indent` as each benchmark has always written it) and write it to `out`, if any."""
    text = json.dumps(report, indent=indent)
    print(text)
    if out:
        write_atomic(out, (text + "\n").encode())
