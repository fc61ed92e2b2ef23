"""core.progress: bars, spinners and tables as a user sees them on a terminal and in a log."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time

import pytest

from core.progress import ProgressBar, Spinner, format_bytes, format_seconds, print_table


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def plain(text: str) -> str:
    """What a terminal shows, without rich's colour and cursor codes."""
    return ANSI.sub("", text)


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_format_seconds_and_bytes():
    assert format_seconds(4.24) == "4.2s"
    assert format_seconds(187) == "3m07s"
    assert format_seconds(3720) == "1h02m"
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(170_200_000) == "162.3 MiB"
    assert format_bytes(3 * 1024**4) == "3072.0 GiB"


def test_bar_in_a_log_prints_one_line_per_tenth():
    log = io.StringIO()
    with ProgressBar(200, "build", stream=log) as bar:
        for _ in range(200):
            bar.update(1, status="timing")
    lines = log.getvalue().splitlines()
    # 0%, 10%, ..., 100%: never one line per step, and no closing line repeating 100%.
    assert len(lines) == 11
    assert lines[0].startswith("  0%  0/200  build")
    assert lines[-1].startswith("100%  200/200  build: timing")
    assert "\r" not in log.getvalue()


def test_bar_in_a_log_closes_with_where_it_stopped():
    log = io.StringIO()
    with ProgressBar(30, "eval", stream=log) as bar:
        for _ in range(14):
            bar.update(1)
    lines = log.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["0/30", "3/30", "6/30", "9/30", "12/30", "14/30"]


def test_bar_on_a_terminal_redraws_in_place_and_ends_the_line():
    term = FakeTerminal()
    bar = ProgressBar(4, "steps", stream=term)
    bar.set(3, status="a much longer status text")
    bar.set(1)  # never backwards
    assert bar.done == 3
    bar.set(10)  # clamped
    bar.close()
    out = plain(term.getvalue())
    assert "\r" in out and out.endswith("\n") and out.count("\n") == 1
    last = out.rsplit("\r", 1)[1]
    assert "100% 4/4 steps: a much longer status text" in last


def test_bar_with_fractional_total_hides_the_count():
    log = io.StringIO()
    bar = ProgressBar(1.0, stream=log)
    bar.set(0.5)
    assert "50%" in bar.render() and "/" not in bar.render()
    with pytest.raises(ValueError, match="positive"):
        ProgressBar(0)


def test_spinner_in_a_log_prints_start_and_end():
    log = io.StringIO()
    with Spinner("building", stream=log):
        time.sleep(0.05)
    lines = log.getvalue().splitlines()
    assert lines[0] == "building ..."
    assert lines[1].startswith("building: done in 0.")
    assert len(lines) == 2


def test_spinner_on_a_terminal_animates_and_reports_failure():
    term = FakeTerminal()
    with pytest.raises(RuntimeError):
        with Spinner("building", stream=term, interval=0.01):
            time.sleep(0.1)
            raise RuntimeError("boom")
    out = term.getvalue()
    assert out.count("\r") >= 3  # several frames were drawn
    assert out.endswith("\n") and "building: failed in" in out.rsplit("\r", 1)[1]


def test_print_table_aligns_text_left_and_numbers_right():
    out = io.StringIO()
    print_table([("backbone", 12.5, "ok"), ("decoder.5", 0.001, None)], headers=("block", "err", "status"), stream=out)
    assert out.getvalue().splitlines() == [
        "block        err  status",
        "---------- ------ ------",
        "backbone    12.5  ok",
        "decoder.5  0.001",
    ]


def test_bar_on_a_terminal_keeps_the_elapsed_time_moving_without_updates():
    term = FakeTerminal()
    with ProgressBar(1.0, "building engine", stream=term, tick=0.02) as bar:
        bar.set(0.5, status="Timing tactics")
        time.sleep(0.35)
    frames = [f for f in term.getvalue().split("\r") if f]
    assert len(frames) >= 4  # redrawn with no set() in between
    assert all("Timing tactics" in f for f in frames[1:])
    elapsed = [f.split()[-1] for f in frames]
    assert len(set(elapsed)) >= 3  # the elapsed time moved


def test_ticking_bar_in_a_log_adds_no_lines():
    log = io.StringIO()
    with ProgressBar(1.0, "build", stream=log, tick=0.01) as bar:
        bar.set(0.5)
        time.sleep(0.1)
    assert len(log.getvalue().splitlines()) == 2  # 0% and 50% only


def test_a_ci_log_gets_plain_lines_even_when_the_environment_forces_colour():
    """stderr and stdout piped, as in CI, with FORCE_COLOR set (some CI runners do): no ANSI, no carriage return."""
    code = (
        "from core.progress import ProgressBar, Spinner, print_table\n"
        "with ProgressBar(50, 'eval') as bar:\n"
        "    for _ in range(50): bar.update(1, status='running')\n"
        "with Spinner('reading'): pass\n"
        "print_table([('engine', 0.5)], headers=('model', 'AP'))\n"
    )
    env = {**os.environ, "FORCE_COLOR": "1", "TTY_COMPATIBLE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    for text in (proc.stdout, proc.stderr):
        assert "\x1b" not in text and "\r" not in text, repr(text)
    err = proc.stderr.splitlines()
    assert len(err) == 11 + 2 and err[0].startswith("  0%  0/50  eval") and err[10].startswith("100%  50/50  eval")
    assert err[11] == "reading ..." and err[12].startswith("reading: done in ")
    assert proc.stdout.splitlines() == ["model    AP", "------- ---", "engine  0.5"]


def test_print_table_never_cuts_a_wide_table_to_the_console_width():
    out = io.StringIO()
    path = "engines/" + "x" * 200 + ".plan"
    print_table([("engine", path)], headers=("build", "value"), stream=out)
    assert out.getvalue().splitlines()[2] == f"engine  {path}"
