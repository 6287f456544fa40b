"""memex/console.py: a quiet console (one line per stage, memex's warnings, the result) and a log
file with everything else, copied into the run folder at the end (issue 14). No Ray here."""

from __future__ import annotations

import logging
import os
import warnings

import pytest

from memex import cli, console
from memex.config import ConfigError
from memex.storage import Store


@pytest.fixture
def log_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMEX_LOG_DIR", str(tmp_path / "local-logs"))
    monkeypatch.setattr(console, "VERBOSE", False)
    monkeypatch.delenv("MEMEX_VERBOSE", raising=False)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    # Ray configures its loggers when a Ray test ran earlier in the session (own handlers, no
    # propagation); these tests log through them as a fresh process would, so reset them here.
    for name in ("ray", "ray.data"):
        lg = logging.getLogger(name)
        monkeypatch.setattr(lg, "handlers", [])
        monkeypatch.setattr(lg, "propagate", True)
        monkeypatch.setattr(lg, "level", logging.NOTSET)
    with warnings.catch_warnings():  # a warning an earlier test raised at the same line is shown again
        warnings.simplefilter("always")
        yield tmp_path / "local-logs"
    console.finish(keep=False)  # leave the root logger as it was for the other tests
    logging.captureWarnings(False)
    root.handlers[:] = handlers
    root.setLevel(level)


def test_quiet_console_shows_stage_lines_and_memex_warnings_and_the_file_gets_everything(log_dir, tmp_path, capsys):
    path = console.setup("audit")
    assert path.parent == log_dir
    p = console.Progress("generate", 6, done_before=2)
    p.update(6)
    p.close()
    logging.getLogger("memex.audit").info("round 0: 24 prompts")  # memex's info: the file only
    logging.getLogger("memex.lease").warning("run folder is in use: waiting")
    logging.getLogger("ray.data").warning("Progress bars disabled")  # not memex's: the file only
    logging.getLogger("faiss.loader").info("Loading faiss with AVX512 support.")
    warnings.warn("`CLIPImageProcessor` requires torchvision", UserWarning, stacklevel=1)
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "generate: 6 units to run (2 complete from an earlier run)"
    assert err[1].startswith("generate: 6 units done in ") and err[1].endswith("s")
    assert err[2:] == ["memex: warning: run folder is in use: waiting"]

    store = Store(str(tmp_path / "run"))
    where = console.finish(store)
    assert where.startswith(str(tmp_path / "run" / "logs" / "audit-")) and where.endswith(".log")
    text = open(where).read()
    for line in ("round 0: 24 prompts", "Progress bars disabled", "Loading faiss with AVX512",
                 "`CLIPImageProcessor` requires torchvision", "generate: 6 units done in"):
        assert line in text
    assert not path.exists()  # moved into the run folder
    logging.getLogger("memex.audit").info("after the end")
    assert "after the end" not in open(where).read()


def test_verbose_console_shows_everything(log_dir, capsys, monkeypatch):
    monkeypatch.setattr(console, "VERBOSE", True)
    console.setup("generate")
    logging.getLogger("ray.data").info("Starting execution of Dataset")
    logging.getLogger("memex.generate").info("run r: 6 shards")
    err = capsys.readouterr().err
    assert "Starting execution of Dataset" in err and "run r: 6 shards" in err


def test_the_log_stays_local_without_a_folder_and_is_dropped_when_nothing_ran(log_dir):
    path = console.setup("generate")
    assert console.finish() == str(path) and path.exists()
    path = console.setup("generate")
    console.note_folder(Store(str(log_dir.parent / "run")))  # a stage started in this folder
    assert console.finish().startswith(str(log_dir.parent / "run" / "logs" / "generate-"))
    path = console.setup("generate")
    assert console.finish(keep=False) is None and not path.exists()


def test_cli_prints_the_log_location_after_the_result(log_dir, tmp_path, capsys):
    run = Store(str(tmp_path / "runs" / "r1"))

    def _audit(cfg):
        logging.getLogger("ray").info("Started a local Ray instance.")
        print("memex audit: 3 unique training images extracted")
        return run

    cli._report_errors(_audit)(None)
    out, err = capsys.readouterr()
    assert out.splitlines() == ["memex audit: 3 unique training images extracted"]
    (line,) = err.splitlines()
    assert line.startswith(f"memex: log: {tmp_path}/runs/r1/logs/audit-") and line.endswith(".log")
    assert "Started a local Ray instance." in open(line.split("memex: log: ")[1]).read()


def test_cli_config_error_is_one_line_and_leaves_no_log(log_dir, capsys):
    def _generate(cfg):
        raise ConfigError("sampling.batch_size must be >= 1, got 0")

    with pytest.raises(SystemExit) as e:
        cli._report_errors(_generate)(None)
    assert e.value.code == 1
    assert capsys.readouterr().err.splitlines() == ["memex: error: sampling.batch_size must be >= 1, got 0"]
    assert not list(log_dir.glob("*.log"))


def test_a_log_folder_that_cannot_be_written_is_one_line_naming_memex_log_dir(log_dir, monkeypatch, capsys):
    """A log folder memex cannot make or write (a shared <tmp>/memex-logs another user made): Hydra printed
    "Error executing job with overrides: [...]" with the raw command line, a secret included, and a traceback.
    The default folder is one a user (memex-logs-<uid>)."""
    ran = []
    blocker = log_dir.parent / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv("MEMEX_LOG_DIR", str(blocker / "logs"))  # a folder under a file: mkdir fails
    with pytest.raises(SystemExit) as e:
        cli._report_errors(lambda cfg: ran.append(cfg))(None)
    err = capsys.readouterr().err.splitlines()
    assert e.value.code == 1 and not ran
    assert len(err) == 1 and err[0].startswith(f"memex: error: cannot write this command's log file in {blocker}/logs")
    assert err[0].endswith("set MEMEX_LOG_DIR to a folder you can write")
    monkeypatch.delenv("MEMEX_LOG_DIR")
    assert console.log_dir().name == f"memex-logs-{os.getuid()}"


def test_verbose_flag_is_taken_off_the_command_line_before_hydra(monkeypatch, capsys):
    monkeypatch.setattr(console, "VERBOSE", False)
    monkeypatch.setattr("sys.argv", ["memex", "-v", "generate", "--verbose", "+sampling.sample_per_prompt=5"])
    with pytest.raises(SystemExit):
        cli.main()
    assert console.VERBOSE
    assert "sampling.sample_per_prompt is not a setting" in capsys.readouterr().err


def test_transformers_and_diffusers_warnings_go_to_the_file_not_the_console(log_dir, tmp_path, capfd, monkeypatch):
    """Both libraries log through their own stderr handler with propagate=False: transformers 5's
    "`CLIPImageProcessor` requires torchvision" reached the terminal on every `memex train`."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    monkeypatch.setitem(console._state, "libraries_routed", False)
    tlog.enable_default_handler(), tlog.disable_propagation()  # as a fresh process has them
    dlog.enable_default_handler(), dlog.disable_propagation()
    try:
        console.library_logs_to_file()  # outside a command: the caller's logging is left alone
        assert not logging.getLogger("transformers").propagate
        console.setup("train")
        console.library_logs_to_file()
        tlog.get_logger("transformers.utils.import_utils").warning("`CLIPImageProcessor` requires torchvision")
        dlog.get_logger("diffusers.pipelines").warning("a diffusers warning")
        for _ in dlog.tqdm(range(3), desc="Loading pipeline components..."):  # diffusers' bar at every load
            pass
        err = capfd.readouterr().err
        assert "requires torchvision" not in err and "a diffusers warning" not in err
        assert "Loading pipeline components" not in err
        text = open(console.finish(Store(str(tmp_path / "run")))).read()
        assert "`CLIPImageProcessor` requires torchvision" in text and "a diffusers warning" in text
    finally:
        tlog.enable_default_handler(), tlog.disable_propagation(), tlog.enable_progress_bar()
        dlog.enable_default_handler(), dlog.disable_propagation(), dlog.enable_progress_bar()


@pytest.mark.slow
def test_ctrl_c_is_one_line_and_a_rerun_resumes(tmp_path):
    """SIGINT (Ctrl-C) mid-generation: one line saying what is kept and to rerun, exit 130, the log
    saved; it was a page of Ray Data and torch frames ending on KeyboardInterrupt. The rerun of the
    same command resumes from the marked shards and ends with every sample once."""
    import signal
    import subprocess
    import time

    import pyarrow.dataset as ds

    from conftest import BIN, REPO

    root = tmp_path / "runs"
    cmd = [str(BIN / "memex"), "generate", f"storage.root={root}", "run.name=r", "resources.executor=local",
           "sampling.samples_per_prompt=6", "sampling.shard_size=2", "sampling.batch_size=2"]  # 3 prompts, 9 shards
    markers = root / "r" / "samples" / "_markers"
    # Python leaves SIGINT ignored when its parent ignored it (a shell's background job): restore it
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    # count marks only: a `_tmp-` file in _markers/ is a mark being written, removed if the interrupt lands first
    while not (markers.is_dir() and any(markers.glob("shard-*.json"))) and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    done = len(list(markers.glob("shard-*.json")))
    assert p.returncode == 130, (p.returncode, err[-2000:])
    assert "memex: interrupted: the shards already written are kept; rerun the same command to resume" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
    assert "memex: log: " in err and list((root / "r" / "logs").glob("generate-*.log"))
    assert 1 <= done < 9, done  # interrupted mid-stage
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"({done} complete from an earlier run)" in r.stderr + r.stdout
    ids = ds.dataset(str(root / "r" / "samples"), format="parquet").to_table(columns=["sample_id"])["sample_id"]
    assert len(ids) == 18 and len(set(ids.to_pylist())) == 18
