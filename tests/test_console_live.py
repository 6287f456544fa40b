"""memex/console.py on a terminal: a memex warning logged while a stage's progress line is drawn in place
gets a line of its own, and the progress line is drawn again below it. No Ray here."""

from __future__ import annotations

import io
import logging
import sys

import pytest

from memex import console


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _screen(raw: str) -> list[str]:
    """What a terminal shows for `raw`: \\r back to the line's start, \\033[K erases to its end."""
    screen, col, i = [""], 0, 0
    while i < len(raw):
        if raw[i] == "\n":
            screen.append("")
            col, i = 0, i + 1
        elif raw[i] == "\r":
            col, i = 0, i + 1
        elif raw.startswith("\033[K", i):
            screen[-1] = screen[-1][:col]
            i += 3
        else:
            screen[-1] = screen[-1][:col] + raw[i] + screen[-1][col + 1:]
            col, i = col + 1, i + 1
    return screen


@pytest.fixture
def console_setup(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMEX_LOG_DIR", str(tmp_path / "local-logs"))
    monkeypatch.setattr(console, "VERBOSE", False)
    monkeypatch.delenv("MEMEX_VERBOSE", raising=False)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    console.setup("audit")
    yield
    if (live := console._state["progress"]) is not None:  # a failed test's: stop its ticker
        live._stop.set()
        console._state["progress"] = None
    console.finish(keep=False)
    logging.captureWarnings(False)
    root.handlers[:] = handlers
    root.setLevel(level)


def test_a_warning_under_a_live_progress_line_gets_its_own_line_and_the_line_is_drawn_again(console_setup, monkeypatch):
    terminal = _Terminal()  # here, not in the fixture: pytest sets its own sys.stderr when the test starts
    monkeypatch.setattr(sys, "stderr", terminal)  # the console handler writes to whatever sys.stderr is
    p = console.Progress("match", 3)
    assert p.live
    p.update()
    logging.getLogger("memex.match").warning("match: training image 42 could not be read (OSError)")
    after_warning = terminal.getvalue()
    p.update(2)
    p.close()
    logging.getLogger("memex.filter").warning("after the stage")
    # was: "match: 1/3 units, 0smemex: warning: match: ..." (the warning glued to the progress line)
    assert _screen(after_warning)[0] == "memex: warning: match: training image 42 could not be read (OSError)"
    assert _screen(after_warning)[1].startswith("match: 1/3 units, ")  # drawn again below it
    screen = _screen(terminal.getvalue())
    assert screen[0] == "memex: warning: match: training image 42 could not be read (OSError)"
    assert screen[1].startswith("match: 3/3 units, ") and screen[1].endswith("s")
    assert screen[2:] == ["memex: warning: after the stage", ""]  # after the stage: written as is
    assert console._state["progress"] is None
