"""docs/method.md stays true: its numbers are the shipped ones, and the code's citations of it resolve.

- every row of its "Shipped settings" table equals the value the named command composes from the
  real conf/ (`memex audit`, `memex audit preset=paper`, ...) or the named file's constant;
- every "`dotted.key` = value" in its text equals what `memex audit` composes to, and every
  "`mia.key` = value" (the membership-inference section) what `memex mia` composes to and the
  default of MiaSettings, what memex/mia.py runs with;
- its worked cost example is the demo audit's own arithmetic;
- every `docs/method.md#anchor` cited in the repo is a heading of the page;
- nothing in the repo cites notes outside it (a user's clone has only the repo).
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import re
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

from memex.config import plain

from conftest import REPO, compose

DOC = REPO / "docs" / "method.md"
# where the code, configs, benchmarks and top-level docs live: what a clone holds and cites
CITING = ["memex", "conf", "bench", "jobs", "tests", "README.md", "architecture.md"]
NO_OUTSIDE_NOTES = ["memex", "conf", "bench", "jobs", "README.md", "architecture.md"]
COMMANDS = {"memex audit": "audit", "memex nightly": "nightly", "memex mia": "mia"}
ROW = re.compile(r"^\| `(?P<setting>[^`]+)` \| `(?P<value>[^`]+)` \| (?P<where>[^|]+?) \|$")
# "`match.threshold` = 0.15" in the text: a value that must be memex audit's default
SPAN = re.compile(r"`(?P<key>[a-z_]+(?:\.[a-z_]+)+)` = (?P<value>`[^`]+`|\d{1,3}(?:,\d{3})+|[^\s,;:)]+)")
CITE = re.compile(r"docs/method\.md#([A-Za-z0-9_-]+)")
# the settings the code's thresholds hinge on: the table must keep a row for each
REQUIRED = {
    ("filter.edge_threshold", "memex audit"), ("filter.min_clique", "memex audit"),
    ("filter.min_clique", "memex audit preset=paper"), ("match.threshold", "memex audit"),
    ("match.threshold", "memex audit match=relative"), ("match.alpha", "memex audit"),
    ("match.n_neighbors", "memex audit"), ("match.min_generations", "memex audit"),
    ("match.low_detail_min_generations", "memex audit"), ("match.max_margin", "memex audit"),
    ("GRID", "memex/distances.py"),
    ("triage.seeds", "memex audit"), ("triage.steps", "memex audit"), ("budget.rounds", "memex audit"),
    ("budget.continue_factor", "memex audit"), ("budget.continue_triage_z", "memex audit"),
    ("budget.kind", "memex nightly"), ("TILED", "bench/memorization.py"), ("COPY_RMS", "bench/memorization.py"),
    ("MIN_COPIES", "bench/memorization.py"),
    ("mia.loss_timestep", "memex mia"), ("mia.draws", "memex mia"), ("mia.pia_timestep", "memex mia"),
    ("mia.secmi_timestep", "memex mia"), ("mia.secmi_k", "memex mia"), ("mia.shadow_models", "memex mia mia=lira"),
}
SETTINGS = "## 10. Shipped settings"
MIA_SECTION = "## 8. Membership inference"


def doc() -> str:
    return DOC.read_text(encoding="utf-8")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> list[str]:
    fenced = False
    out = []
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#{1,6} (.+)$", line)):
            out.append(slug(m.group(1)))
    return out


def table_rows(text: str) -> list[tuple[str, str, str]]:
    section = text.split(SETTINGS, 1)[1]
    return [(m["setting"], m["value"], m["where"].strip()) for m in map(ROW.match, section.splitlines()) if m]


@lru_cache(maxsize=None)
def composed(where: str) -> dict:
    """`memex audit preset=paper` -> the plain dict of the config that command composes from conf/."""
    for command, name in COMMANDS.items():
        if where == command or where.startswith(command + " "):
            return plain(compose(where[len(command):].split(), config_name=name))
    raise AssertionError(f"docs/method.md: unknown 'where' {where!r}: give a memex command or a file")


def config_value(cfg: dict, key: str):
    value = cfg
    for part in key.split("."):
        assert isinstance(value, dict) and part in value, f"docs/method.md: no config key {key!r}"
        value = value[part]
    return value


def constant(path: str, setting: str):
    """The literal value of a module-level constant NAME (optionally subscripted: NAME["l2"][0])."""
    name, subscripts = re.fullmatch(r"([A-Za-z_]\w*)((?:\[[^\]]+\])*)", setting).groups()
    tree = ast.parse((REPO / path).read_text(encoding="utf-8"))
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) \
            else []
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            value = ast.literal_eval(node.value)
            for sub in re.findall(r"\[([^\]]+)\]", subscripts):
                value = value[ast.literal_eval(sub)]
            return value
    raise AssertionError(f"docs/method.md: {path} has no module-level constant {name}")


def parse(value: str):
    """A value as the doc writes it (YAML; "200,000" as a number) -> Python."""
    value = value.strip("`")
    return yaml.safe_load(value.replace(",", "") if re.fullmatch(r"\d{1,3}(,\d{3})+", value) else value)


def same(doc_value, actual) -> bool:
    numbers = (int, float)
    if isinstance(doc_value, numbers) and isinstance(actual, numbers) and not isinstance(actual, bool):
        return doc_value == actual
    return type(doc_value) is type(actual) and doc_value == actual


def test_settings_table_matches_the_shipped_config_and_code():
    rows = table_rows(doc())
    assert len(rows) >= len(REQUIRED)
    missing = REQUIRED - {(s, w) for s, _, w in rows}
    assert not missing, f"docs/method.md section 10 lost its rows for {sorted(missing)}"
    wrong = []
    for setting, value, where in rows:
        if where.endswith(".py"):
            actual = constant(where, setting)
        else:
            actual = config_value(composed(where), setting)
        if not same(parse(value), actual):
            wrong.append(f"{setting} ({where}): the doc says {value}, the code has {actual!r}")
    assert not wrong, "docs/method.md section 10 drifted from the code:\n" + "\n".join(wrong)


def mia_defaults(key: str) -> list:
    """`mia.draws` -> the default of `draws` in each MiaSettings that has the field: the one
    memex/mia.py runs with and memex/config.py's (one class when mia.py imports it); enums as values."""
    from memex import config, mia

    name, out = key.split(".", 1)[1], []
    for cls in {mia.MiaSettings, config.MiaSettings}:
        f = {f.name: f for f in dataclasses.fields(cls)}.get(name)
        if f is not None:
            v = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out.append(v.value if isinstance(v, enum.Enum) else v)
    assert out, f"docs/method.md: MiaSettings has no field {name!r} ({key})"
    return out


def test_values_in_the_text_are_the_audit_defaults():
    text = doc()
    spans = [m for m in SPAN.finditer(text) if not m["key"].startswith("mia.")]
    assert len(spans) >= 10  # the text states its thresholds this way; a rewrite that drops them fails here
    cfg = composed("memex audit")
    wrong = []
    for m in spans:
        value = m["value"].rstrip(".")
        actual = config_value(cfg, m["key"])
        if not same(parse(value), actual):
            wrong.append(f"`{m['key']}` = {value}: memex audit composes {actual!r}")
    assert not wrong, "docs/method.md text drifted from `memex audit`:\n" + "\n".join(wrong)


def test_membership_inference_values_are_the_mia_settings_defaults():
    text = doc()
    section = text.split(MIA_SECTION, 1)[1].split("\n## ", 1)[0]
    # the attacks' defaults are stated in section 8: loss t and draws, PIA t, SecMI t and k, the noise seed
    assert {m["key"] for m in SPAN.finditer(section)} >= {"mia.loss_timestep", "mia.draws", "mia.pia_timestep",
                                                          "mia.secmi_timestep", "mia.secmi_k", "mia.seed"}, \
        "docs/method.md section 8 should state each attack's default as `mia.key` = value"
    spans = [m for m in SPAN.finditer(text) if m["key"].startswith("mia.")]  # wherever they appear
    cfg = composed("memex mia")
    wrong = []
    for m in spans:
        value = parse(m["value"].rstrip("."))
        wrong += [f"`{m['key']}` = {m['value']}: MiaSettings has {v!r}" for v in mia_defaults(m["key"])
                  if not same(value, v)]
        if not same(value, actual := config_value(cfg, m["key"])):
            wrong.append(f"`{m['key']}` = {m['value']}: memex mia composes {actual!r}")
    assert not wrong, "docs/method.md section 8 drifted from MiaSettings:\n" + "\n".join(wrong)


def test_worked_cost_example_is_the_demo_audits():
    c = composed("memex audit")
    prompts, s, t = c["prompts"]["limit"], c["sampling"], c["triage"]
    guided = 2 if s["guidance_scale"] > 1 else 1
    generation = prompts * s["samples_per_prompt"] * s["num_inference_steps"] * guided
    triage = prompts * t["seeds"] * t["steps"] * 2
    from memex.stages.triage import needs_stage

    assert not needs_stage(compose([], config_name="audit"))  # the demo's triage comes from its samples: 0 evaluations
    expected = (f"{prompts} prompts x {s['samples_per_prompt']} samples x {s['num_inference_steps']} steps x "
                f"{guided} = {generation:,} evaluations for\ngeneration, plus 0 for triage (its scores come from "
                f"samples 0 to {t['seeds'] - 1}), **{generation:,}** in all; with\n`triage.keep` set the stage would "
                f"add {prompts} x {t['seeds']} seeds x {t['steps']} step x 2 = {triage:,}")
    assert expected in doc(), f"docs/method.md section 4's worked example should read: {expected!r}"


def test_headings_are_unique_and_internal_links_resolve():
    text = doc()
    heads = anchors(text)
    assert len(heads) == len(set(heads)), f"duplicate headings in docs/method.md: {heads}"
    for target in re.findall(r"\]\(#([A-Za-z0-9_-]+)\)", text):
        assert target in heads, f"docs/method.md links to #{target}, which is not one of its headings"


def files(roots: list[str]):
    for root in roots:
        p = REPO / root
        for f in ([p] if p.is_file() else sorted(p.rglob("*"))):
            if f.is_file() and "__pycache__" not in f.parts and f.suffix in (".py", ".md", ".yaml", ".yml", ".txt"):
                yield f


def test_every_citation_of_the_notes_resolves():
    heads = set(anchors(doc()))
    cites = [(f, a) for f in files(CITING) for a in CITE.findall(f.read_text(encoding="utf-8", errors="replace"))
             if f != Path(__file__)]
    assert len({f for f, _ in cites}) >= 4, "the code should cite docs/method.md sections"
    bad = [f"{f.relative_to(REPO)}: docs/method.md#{a}" for f, a in cites if a not in heads]
    assert not bad, "citations of missing docs/method.md sections:\n" + "\n".join(bad)


@pytest.mark.parametrize("needle", ["../shared", "shared/METHOD", "METHOD.md"])
def test_nothing_cites_notes_outside_the_repo(needle):
    bad = [str(f.relative_to(REPO)) for f in files(NO_OUTSIDE_NOTES) if needle in f.read_text(encoding="utf-8",
                                                                                              errors="replace")]
    assert not bad, f"{needle!r} is outside a user's clone; cite docs/method.md instead: {bad}"


def test_readme_and_architecture_point_to_the_notes():
    for name in ("README.md", "architecture.md"):
        assert "docs/method.md" in (REPO / name).read_text(encoding="utf-8"), name
