"""README's "Bad input, faults and what each gets" table: every row names a test that exists.

The table is the user's promise; the tests named in it keep each row true. This test keeps the
table honest in the other direction: a row whose test was renamed or deleted fails here."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\|(?P<input>[^|]+)\|(?P<gets>[^|]+)\|\s*`(?P<test>tests/[\w/]+\.py::\w+)`\s*\|$")


def table_rows() -> list[dict]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Bad input, faults and what each gets", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|") and not line.startswith("|---")]
    return [m.groupdict() if (m := ROW.match(line)) else {"bad": line} for line in rows[1:]]  # [0]: header


def test_every_row_names_one_test_that_exists():
    rows = table_rows()
    assert len(rows) >= 30, "the table lost rows"
    assert not [r["bad"] for r in rows if "bad" in r], "each row: | input | what memex does | `tests/x.py::test` |"
    defined: dict[str, set[str]] = {}
    for r in rows:
        path, name = r["test"].split("::")
        if path not in defined:
            tree = ast.parse((REPO / path).read_text())
            defined[path] = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert name in defined[path], f"README row {r['input'].strip()!r} names {r['test']}, which does not exist"


def test_the_issue_catalogue_is_covered():
    """The failures the table was written for (issue 14) each have a row."""
    inputs = " ".join(r["input"] for r in table_rows()).lower()
    for words in ("credentials", "16-bit", "overwritten in place", "outside the schema", "truncated safetensors",
                  "pickle", "ray task or actor", "second audit", "killed mid-batch", "s3 throttling", "bucket",
                  "pyarrow.dataset"):
        assert words in inputs, f"no README row for {words!r}"
