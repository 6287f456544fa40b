"""A list of config entries given on the command line (data.duplication=[{copies: 32, count: 8}]): each item's keys
and values are checked against its dataclass before Hydra composes (memex/cli.py _check_item), in one line naming
the nearest key. Nothing here starts Ray."""

from __future__ import annotations

import sys

import pytest

from memex import cli
from memex import config as C
from memex.config import ConfigError


@pytest.mark.parametrize("override, message", [
    ("data.duplication=[{copies: 32, cnt: 8}]",
     "data.duplication[0].cnt is not a setting; did you mean data.duplication[0].count?"),
    # Hydra's own advice, the + form, failed again with "Error merging override"
    ("+data.duplication=[{copies: 32, cnt: 8}]",
     "data.duplication[0].cnt is not a setting; did you mean data.duplication[0].count?"),
    ("data.duplication=[{copies: 32, count: 8}, {copeis: 2, count: 100}]",
     "data.duplication[1].copeis is not a setting; did you mean data.duplication[1].copies?"),
    ("data.duplication=[{copies: 2, zzz: 1}]",
     "data.duplication[0].zzz is not a setting: an item of data.duplication takes copies, count, ids"),
    ("data.duplication=[{copies: many, count: 8}]", "data.duplication[0].copies=many is not a whole number"),
])
def test_a_bad_key_or_value_in_an_item_of_data_duplication_is_named_in_one_line(override, message):
    """Hydra's seven lines ("Key 'cnt' not in 'DuplicationGroup'") advised +data.duplication=..., which failed
    again; a typo in a mapping override (trainer={stepz: 3}) was already named with its nearest key."""
    with pytest.raises(ConfigError) as e:
        cli.check_overrides(["output=/tmp/out", override], C.TrainConfig)
    assert str(e.value) == message


@pytest.mark.parametrize("override", [
    "data.duplication=[{copies: 32, count: 8}]",
    "data.duplication=[{copies: 4, ids: [a, b]}, {copies: 2, count: 10}]",
    "data.duplication=[]",
    "data.duplication=[{copies: '${data.duplication_seed}'}]",  # an interpolation: OmegaConf's to resolve
])
def test_good_items_of_data_duplication_pass(override):
    cli.check_overrides(["output=/tmp/out", override], C.TrainConfig)


def test_the_cli_names_an_item_key_typo_in_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["memex", "train", f"output={tmp_path / 'out'}",
                                      "data.duplication=[{copies: 32, cnt: 8}]"])
    monkeypatch.setitem(cli.STAGES, "train", lambda: pytest.fail("the training ran"))  # refused before, or this fails
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err.splitlines()
    assert e.value.code == 1 and err == ["memex: error: data.duplication[0].cnt is not a setting; did you mean "
                                         "data.duplication[0].count?"], err
    assert not any(tmp_path.iterdir())
