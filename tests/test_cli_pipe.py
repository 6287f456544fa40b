"""A reader that stops early (`memex audit --cfg job | head`, `memex audit --help | head`) closes the pipe. That
is no error: memex printed "memex: error: [Errno 32] Broken pipe" and exited 1."""
import subprocess
import sys

import pytest


@pytest.mark.parametrize("flag", [["--cfg", "job"], ["--help"]])
def test_a_printout_read_in_part_is_no_error(flag):
    p = subprocess.Popen([sys.executable, "-c", "import sys; from memex.cli import main; "
                          f"sys.argv = ['memex', 'audit', *{flag!r}]; main()"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # the reader is gone before memex prints
    err = p.stderr.read().decode()
    assert p.wait() == 0 and "Broken pipe" not in err and "Error" not in err, err
