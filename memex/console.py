"""What a `memex` command prints, and the log file that gets everything else.

By default the console shows, on stderr, one progress line per stage (memex/runner.py: a line
updated in place on a terminal, else a line when a stage starts and one when it ends, with counts
and seconds; `memex train`: its step lines) and memex's own warnings and errors; the result goes
to stdout. Everything else --
memex's info lines, Ray's start-up, Ray Data's logs, the Ray workers' output, Python warnings,
faiss's loader -- goes to the log file. `memex -v <stage> ...` (or MEMEX_VERBOSE=1) shows it all
on the console as well.

The log file is written on local disk while the command runs (`$MEMEX_LOG_DIR`, default
<tmp>/memex-logs-<uid>/<stage>-<time>-<pid>.log: one folder a user, as a shared <tmp>/memex-logs made by the first
user was not writable by the next), because the run folder may be on S3 and is only named
once the run is prepared, and copied into the run folder when the command ends
(`<run>/logs/<stage>-<time>.log`, memex/layout.py): `finish` returns where it is.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

PROGRESS = "memex.progress"  # the stage lines (memex/runner.py)
# loggers whose info lines a quiet console shows: the stage lines, and `memex train`'s step lines
# (trainer.log_every), its progress: a training run is one long stage in one process
SHOWN = {PROGRESS, "memex.train"}
FILE_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"

VERBOSE = False  # set by `memex -v` (memex/cli.py main)
_state: dict = {"log": None, "handlers": [], "stage": None, "started": None, "folder": None,
                "progress": None}  # the live Progress (a line redrawn in place) now on the console


def verbose() -> bool:
    return VERBOSE or os.environ.get("MEMEX_VERBOSE", "") not in ("", "0")


def interactive() -> bool:
    """A terminal a line can be redrawn on (progress updated in place)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class _Stderr(logging.StreamHandler):
    """A handler on whatever sys.stderr is when a record comes (pytest swaps it)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass

    def emit(self, record: logging.LogRecord) -> None:
        """Under a live progress line, the record on a line of its own and the progress line drawn again
        below it: written as is, a warning mid-stage was glued to the end of the progress line."""
        live = _state["progress"]
        if live is None:
            return super().emit(record)
        with live._lock:  # not between the ticker's \r and its line
            if live._stop.is_set():
                return super().emit(record)
            self.stream.write("\r\033[K")
            super().emit(record)
            live._write()


class _ConsoleFilter(logging.Filter):
    """Quiet: the stage lines, and memex's warnings and errors. Verbose: everything."""

    def filter(self, record: logging.LogRecord) -> bool:
        if verbose():
            return True
        return record.name in SHOWN or (record.name.split(".")[0] == "memex" and record.levelno >= logging.WARNING)


class _ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        if verbose():
            return logging.Formatter(FILE_FORMAT).format(record)
        if record.name in SHOWN and record.levelno < logging.WARNING:
            return record.getMessage()
        return f"memex: {record.levelname.lower()}: {record.getMessage()}"


class LogDirError(OSError):
    """The command's log file cannot be made: raised before any work, naming $MEMEX_LOG_DIR."""


def log_dir() -> Path:
    user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    return Path(os.environ.get("MEMEX_LOG_DIR") or Path(tempfile.gettempdir()) / f"memex-logs-{user}")


def setup(stage: str) -> Path:
    """Route this process's logging: the console as above, everything to a new local log file.
    Called once the Hydra config is composed (Hydra configures logging just before). Returns the file."""
    root = logging.getLogger()
    for h in list(root.handlers):  # Hydra's job_logging (stdout), basicConfig's, an earlier setup's
        if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) in (sys.stdout, sys.stderr) \
                or h in _state["handlers"]:
            root.removeHandler(h)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    d = log_dir()
    path = d / f"{stage}-{stamp}-{os.getpid()}.log"
    try:
        d.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(path, encoding="utf-8")
    except OSError as e:  # before any work: Hydra printed the raw command line (credentials too) and a traceback
        raise LogDirError(f"cannot write this command's log file in {d} ({e.strerror or e}): set MEMEX_LOG_DIR "
                          "to a folder you can write") from e
    file.setFormatter(logging.Formatter(FILE_FORMAT))
    file.setLevel(logging.INFO)  # not Ray Data's DEBUG dumps (they are in Ray's own session logs)
    console = _Stderr()
    console.setLevel(logging.INFO)
    console.addFilter(_ConsoleFilter())
    console.setFormatter(_ConsoleFormatter())
    for h in (file, console):
        root.addHandler(h)
    root.setLevel(logging.INFO)
    logging.captureWarnings(False)  # re-installed even when an earlier setup (tests, a second
    logging.captureWarnings(True)  # command in-process) left it on: warnings.warn -> "py.warnings" -> the file
    _state.update(log=path, handlers=[file, console], stage=stage, started=stamp, folder=None)
    logging.getLogger("memex.console").info("memex %s: log file %s", stage, path)
    return path


def library_logs_to_file() -> None:
    """Hand transformers' and diffusers' loggers to the root logger: each library gives its logger its
    own stderr handler and propagate=False, so their warnings reached the terminal past the console
    filter (transformers 5 warns that `CLIPImageProcessor` falls back to PIL without torchvision
    when a text pipeline is imported). Called before memex imports them in this process (model
    loading, `memex train`, the CLIP embedder); a no-op outside a `memex` command, whose logging is
    the caller's. Not in `setup`: importing them costs seconds that a refused config should not wait."""
    if _state["log"] is None or _state.get("libraries_routed"):
        return
    import diffusers.utils.logging as d
    import transformers.utils.logging as t

    for lib in (t, d):
        lib.disable_default_handler()
        lib.enable_propagation()
    if not verbose():  # transformers' "Writing model shards" bar when `memex train` saves its text encoder,
        t.disable_progress_bar()  # diffusers' "Loading pipeline components..." at every model load
        d.disable_progress_bar()
    _state["libraries_routed"] = True


def log_file() -> Path | None:
    """The local log file of this command (None before `setup`, e.g. in tests calling stages)."""
    return _state["log"]


def note_folder(store) -> None:
    """The run (or index) folder a stage is working in (memex/runner.py): where the log goes when
    the command fails before it can say."""
    if _state["log"] is not None:
        _state["folder"] = store


def finish(store=None, keep: bool = True) -> str | None:
    """Copy the log file into `<store>/logs/` (the run folder; default: the last folder a stage
    worked in), then stop writing it. Returns where the log is: that copy, or the local file when
    there is no folder or the copy failed. keep=False: drop it (a command refused before any work)."""
    from memex.layout import log_path

    path = _state["log"]
    if path is None:
        return None
    store = store if store is not None else _state["folder"]
    if not keep:
        store = None
    where = str(path)
    for h in _state["handlers"]:
        h.flush()
    if store is not None:
        try:
            dest = log_path(store, f"{_state['stage']}-{_state['started']}.log")
            store.write_bytes(dest, path.read_bytes())
            where = store.uri_of(dest)
        except Exception as e:  # noqa: BLE001 - the log stays local; the command's result stands
            logging.getLogger("memex.console").warning("could not copy the log to %s (%s: %s); it is at %s",
                                                       store.uri, type(e).__name__, e, path)
    root = logging.getLogger()
    for h in _state["handlers"]:
        if isinstance(h, logging.FileHandler):
            root.removeHandler(h)
            h.close()
    _state.update(log=None, handlers=[h for h in _state["handlers"] if not isinstance(h, logging.FileHandler)])
    if not keep or (store is not None and where != str(path)):
        try:
            path.unlink()
        except OSError:
            pass
    return where if keep else None


def units(n: int) -> str:
    return f"{n} unit" + ("" if n == 1 else "s")


class Progress:
    """One stage's progress on the console: on a terminal, one line redrawn in place (units done,
    seconds, ticking every second); otherwise a line when it starts and one when it ends. Either
    way both lines also go to the log file."""

    def __init__(self, label: str, total: int, done_before: int = 0):
        self.label, self.total, self.done_before = label, total, done_before
        self.done, self.t0 = 0, time.perf_counter()
        self.live = interactive() and not verbose() and _state["log"] is not None
        earlier = f" ({done_before} complete from an earlier run)" if done_before else ""
        self._log(f"{label}: {units(total)} to run{earlier}")
        # reentrant: a record logged while the line is drawn (a signal handler's) waits for no one
        self._lock, self._stop = threading.RLock(), threading.Event()
        if self.live:
            _state["progress"] = self
            self._draw()
            threading.Thread(target=self._tick, name="memex-progress", daemon=True).start()

    def _log(self, msg: str) -> None:
        # live: the file gets the line, the console the redrawn one
        logging.getLogger("memex.runner" if self.live else PROGRESS).info(msg)

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            self._draw()

    def _draw(self, end: str = "") -> None:
        if not self.live:
            return
        with self._lock:
            if self._stop.is_set() and not end:
                return
            self._write(end)

    def _write(self, end: str = "") -> None:
        sys.stderr.write(f"\r{self.label}: {self.done}/{units(self.total)}, "
                         f"{time.perf_counter() - self.t0:.0f}s\033[K{end}")
        sys.stderr.flush()

    def update(self, n: int = 1) -> None:
        self.done += n
        self._draw()

    def close(self, ok: bool = True) -> None:
        secs = time.perf_counter() - self.t0
        self._stop.set()
        self._draw("\n")
        if _state["progress"] is self:
            _state["progress"] = None
        if ok:
            self._log(f"{self.label}: {units(self.total)} done in {secs:.1f}s")
        else:
            logging.getLogger("memex.runner").info("%s: failed after %d of %d units, %.1fs", self.label, self.done,
                                                   self.total, secs)


def noted_folder():
    """The folder `note_folder` last recorded (None outside the `memex` command)."""
    return _state["folder"]
