"""Every command the documentation shows composes with the real conf/ and converts to its typed config.

Sources: README.md, demo/README.md, architecture.md, conf/README.md, the comments of conf/**/*.yaml and
the docstrings of jobs/*.py and memex/**/*.py. A command is `memex <stage>` or `jobs/<stage>.py` (after
`python`, `accelerate launch ...` or `ray job submit ... --`) followed by Hydra overrides; a fragment is a
`backtick span` holding only overrides (`model=local model.path=...`), composed with the first stage
whose schema has its groups. Shell around a command is dropped: whatever precedes the head, `$(...)`,
`\\` continuations, quotes, `--cfg job`, and everything from the first word that is not an override on
(`# comment`, `| while`, `;`, prose). Placeholders are values: `/ckpt/...`, `s3://b/...`, `$ckpt`,
`output=...`; `<checkpoint>` is quoted for Hydra (a shell would read it as a redirection).

A command that names a missing option or key, or a bad value, fails naming its file and line. What the
prose claims about a command's values ("the paper's setting", "the demo recipe") is in CLAIMS below.
`python -m pytest -s tests/test_documented_commands.py` prints every command found.
"""

from __future__ import annotations

import ast
import dataclasses
import re
import shlex
from dataclasses import dataclass

import pytest

from memex import config as C
from memex.cli import CONF_DIR

from conftest import REPO, compose

SCHEMAS = {"generate": C.GenerateConfig, "audit": C.AuditConfig, "nightly": C.NightlyAuditConfig,
           "train": C.TrainConfig, "mia": C.MiaConfig}
# top-level keys a fragment may start with, per stage (`preset` is a group without a dataclass)
STAGE_KEYS = {s: {f.name for f in dataclasses.fields(cls)} | ({"preset"} if s in ("audit", "nightly") else set())
              for s, cls in SCHEMAS.items()}

HEAD = re.compile(r"\bmemex\s+(?P<cli>generate|audit|nightly|train|mia|report|--help)\b"
                  r"|(?<![\w/<])jobs/(?P<job>\w+)\.py\b")
OVERRIDE = re.compile(r"^(\+\+|\+|~)?[A-Za-z_][\w.@/-]*=")
SPAN = re.compile(r"`([^`\n]+)`")
# Skipped on purpose:
SKIP_STAGES = {
    "report",  # `memex report RUN`: a run folder for argparse, not Hydra overrides (memex/cli.py:report_main)
    "--help",  # `memex --help`: usage, no config
}
SYNOPSIS = {"key=value", "group=name", "group.key=value"}  # the syntax itself (`memex audit key=value ...`)
# A command whose overrides are elided (a bare `memex train` in prose, `jobs/train.py ...`, a fragment)
# cannot state the one mandatory value the demo does not supply; the test supplies it.
ELIDED_FILL = {"train": "output=models/elided"}


@dataclass
class Command:
    where: str  # file:line
    text: str  # the command as documented (one line)
    stage: str
    overrides: list[str]
    partial: bool = False  # overrides elided (`...`), a bare mention, or a fragment
    fragment: bool = False
    skip: str | None = None  # why it is not composed

    def to_compose(self) -> list[str]:
        fill = ELIDED_FILL.get(self.stage)
        if self.partial and fill and not any(o.split("=")[0] == fill.split("=")[0] for o in self.overrides):
            return self.overrides + [fill]
        return list(self.overrides)


def _placeholder(tok: str) -> str:
    """`nightly.only=<checkpoint>`: a placeholder value, quoted so that Hydra reads it as a string."""
    key, value = tok.split("=", 1)
    return f"{key}='{value}'" if re.search(r"<[^<>]+>", value) else tok


def parse_overrides(rest: str) -> tuple[list[str], bool, str | None]:
    """The overrides at the start of `rest` (the text after a command's head): (overrides, partial, skip)."""
    rest = re.sub(r"\$\([^)]*\)", "", rest.split("`", 1)[0])
    lex = shlex.shlex(rest, posix=True, punctuation_chars=";|&")
    lex.whitespace_split = True
    out, partial = [], False
    while True:
        try:
            tok = lex.get_token()
        except ValueError:  # an unbalanced quote in the prose after the command
            break
        if tok is None or tok == "":
            break
        if tok == "--cfg":  # --cfg job|hydra|all: print the config instead of running
            lex.get_token()
        elif tok == "...":
            partial = True
        elif tok in SYNOPSIS:
            return out, partial, f"synopsis `{tok}`"
        elif OVERRIDE.match(tok):
            out.append(_placeholder(tok))
        else:
            break
    return out, partial or not out, None


def _logical_lines(numbered: list[tuple[int, str]]):
    """Join `\\` continuations; yields [(lineno, text)] segments of one logical line."""
    segs: list[tuple[int, str]] = []
    for lineno, text in numbered:
        stripped = text.rstrip()
        if stripped.endswith("\\"):
            segs.append((lineno, stripped[:-1] + " "))
            continue
        segs.append((lineno, text))
        yield segs
        segs = []
    if segs:
        yield segs


def _yaml_comments(path) -> list[tuple[int, str]]:
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        m = re.search(r"(^|\s)#", line)
        if m:
            out.append((i, line[m.end():]))
    return out


def _docstrings(path) -> list[tuple[int, str]]:
    """Raw source lines of the module, class and function docstrings (line numbers kept, `\\` kept)."""
    src = path.read_text()
    lines = src.splitlines()
    out = []
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            doc = node.body[0]
            if isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str):
                for i in range(doc.lineno, doc.end_lineno + 1):
                    out.append((i, lines[i - 1].replace('"""', "   ").replace("'''", "   ")))
    return sorted(out)


def sources() -> dict[str, list[tuple[int, str]]]:
    docs = {}
    for name in ("README.md", "demo/README.md", "architecture.md", "conf/README.md"):
        docs[name] = list(enumerate((REPO / name).read_text().splitlines(), 1))
    for p in sorted(CONF_DIR.rglob("*.yaml")):
        docs[str(p.relative_to(REPO))] = _yaml_comments(p)
    for p in sorted((REPO / "jobs").glob("*.py")) + sorted((REPO / "memex").rglob("*.py")):
        docs[str(p.relative_to(REPO))] = _docstrings(p)
    return docs


def _fragment_stage(overrides: list[str]) -> str | None:
    roots = {re.sub(r"^[+~]+", "", o).split("=")[0].split(".")[0] for o in overrides}
    return next((s for s, keys in STAGE_KEYS.items() if roots <= keys), None)


def find_commands() -> list[Command]:
    found = []
    for name, numbered in sources().items():
        for segs in _logical_lines(numbered):
            text = "".join(t for _, t in segs)
            starts = [sum(len(t) for _, t in segs[:k]) for k in range(len(segs))]

            def lineno(offset: int) -> int:
                return next(n for (n, _), s in reversed(list(zip(segs, starts))) if s <= offset)

            heads = list(HEAD.finditer(text))
            for m in heads:
                stage = m.group("cli") or m.group("job")
                overrides, partial, skip = parse_overrides(text[m.end():])
                if stage in SKIP_STAGES:
                    skip = f"`memex {stage}` takes no Hydra overrides"
                show = " ".join(text[m.start():].split("`", 1)[0].split())
                found.append(Command(f"{name}:{lineno(m.start())}", show, stage, overrides, partial, skip=skip))
            for s in SPAN.finditer(text):  # fragments: spans of overrides only, without a head
                if HEAD.search(s.group(1)):
                    continue
                toks = s.group(1).split()
                if not toks or not all(OVERRIDE.match(t) or t == "..." for t in toks):
                    continue
                overrides, partial, skip = parse_overrides(s.group(1))
                stage = _fragment_stage(overrides)
                if stage is None and not skip:  # `torch==2.13.0`: not a config key of any stage
                    continue
                found.append(Command(f"{name}:{lineno(s.start())}", s.group(1), stage or "-", overrides, True,
                                     fragment=True, skip=skip))
    return found


COMMANDS = find_commands()
CHECKED = [c for c in COMMANDS if c.skip is None]


def test_extractor_finds_the_documented_commands():
    for c in COMMANDS:
        kind = "skip: " + c.skip if c.skip else ("fragment " if c.fragment else "") + c.stage
        print(f"{c.where:32} [{kind}] {c.text}\n{'':32}  -> {c.to_compose()}")
    print(f"{len(CHECKED)} commands checked ({len({(c.stage, tuple(c.overrides)) for c in CHECKED})} distinct), "
          f"{len(COMMANDS) - len(CHECKED)} skipped")
    assert len(CHECKED) >= 80, "the extractor lost commands"
    files = {c.where.split(":")[0] for c in CHECKED}
    assert {"README.md", "demo/README.md", "architecture.md", "conf/audit.yaml", "conf/train.yaml",
            "jobs/audit.py", "jobs/nightly.py", "memex/training.py"} <= files
    stages = {c.stage for c in CHECKED if not c.fragment}
    assert stages == {"generate", "audit", "nightly", "train", "mia"}
    # shell around the command is gone, continuation lines are joined, placeholders kept as values
    cron = next(c for c in CHECKED if c.where.startswith("README.md") and "nightly.only=$ckpt" in c.overrides)
    assert cron.overrides == ["nightly=default", "nightly.location=/fsx/train/sd15-ft",
                              "nightly.base_model=/fsx/models/sd15", "model=sd15",
                              "trainset=manifest", "trainset.path=s3://b/train.parquet", "storage=s3",
                              "storage.root=s3://b/memex-runs", "resources=gpu", "nightly.only=$ckpt"]
    cluster = next(c for c in CHECKED if c.where.startswith("jobs/audit.py") and c.overrides)
    assert cluster.overrides[-1] == "index=ivfpq" and "trainset.path=s3://b/train.parquet" in cluster.overrides
    assert next(c for c in CHECKED if c.text.startswith("memex audit --cfg job")).overrides == []
    assert not any(o.startswith("$(") or o in ("--", "\\") for c in COMMANDS for o in c.overrides)


@pytest.mark.parametrize("rest,expected", [
    (" nightly=default nightly.only=\"$ckpt\"; done >> /var/log/x 2>&1", ["nightly=default", "nightly.only=$ckpt"]),
    (" model=demo_uncond prompts=none   # the shipped unconditional demo", ["model=demo_uncond", "prompts=none"]),
    (" --cfg job                # print the composed config", []),
    (" \"data.duplication=[{copies: 32, count: 8}]\" output=...", ["data.duplication=[{copies: 32, count: 8}]",
                                                                   "output=..."]),
    (" nightly.only=<checkpoint> ...", ["nightly.only='<checkpoint>'"]),
    (" (memex/stages/audit.py) chains stages; each one", []),
    ("` with no overrides audits the shipped demo (`demo/models`, a", []),
    (" x=1 | while read id ckpt; do", ["x=1"]),
    (" run.name=day-$(date +%F) storage=s3", ["run.name=day-", "storage=s3"]),
    (" (the paper's choice) x=1", []),
])
def test_parse_overrides(rest, expected):
    assert parse_overrides(rest)[0] == expected


def _unique(commands):
    seen: dict = {}
    for c in commands:
        seen.setdefault((c.stage, tuple(c.to_compose())), []).append(c)
    return list(seen.values())


@pytest.mark.parametrize("group", _unique(CHECKED), ids=lambda g: g[0].where)
def test_documented_command_composes(group):
    c = group[0]
    where = ", ".join(x.where for x in group)
    try:
        cfg = compose(c.to_compose(), config_name=c.stage)
    except Exception as e:  # noqa: BLE001 - Hydra, OmegaConf and ConfigError alike: name the documentation line
        pytest.fail(f"{where}: `{c.text}` does not compose ({c.stage}, overrides {c.to_compose()}): "
                    f"{type(e).__name__}: {e}", pytrace=False)
    assert isinstance(cfg, SCHEMAS[c.stage])


# ---- what the prose claims -----------------------------------------------------------------------
def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return getattr(cfg, "value", cfg)


PAPER = {"prompts.source": "near_duplicates", "prompts.limit": 350000, "sampling.samples_per_prompt": 500,
         "sampling.scheduler": "ddim", "sampling.num_inference_steps": 50, "sampling.guidance_scale": 7.5,
         "sampling.dtype": "float16", "filter.min_clique": 10, "filter.edge_threshold": 0.15,
         "match.candidates": "cliques", "match.distance": "tiled_l2", "match.threshold": 0.15,
         "match.max_margin": None, "budget.kind": "fixed", "triage.kind": "none"}
DEMO_AUDIT = {"prompts.source": "near_duplicates", "prompts.limit": 24, "sampling.samples_per_prompt": 80,
              "sampling.num_inference_steps": 10, "sampling.scheduler": "default",
              "filter.min_clique": 5, "filter.edge_threshold": 0.15, "match.distance": "tiled_l2",
              "match.candidates": "all", "budget.kind": "fixed", "match.min_generations": 2,
              "match.threshold": 0.15}
DEMO_NIGHTLY = {"prompts.limit": 24, "sampling.samples_per_prompt": 16, "sampling.num_inference_steps": 50,
                "budget.kind": "adaptive", "budget.rounds": [4, 16], "filter.min_clique": 5,
                "match.min_generations": 1}
DEMO_RECIPE = {"arch.kind": "pixel_text", "trainer.steps": 5000, "trainer.batch_size": 32, "trainer.lr": 1e-3,
               "trainer.seed": 0, "data.duplication": [(32, 8), (8, 8)]}

# (file, phrase the file says (whitespace-insensitive), stage, overrides, the values the phrase claims)
CLAIMS = [
    ("README.md", "`preset=paper` (`conf/preset/paper.yaml`) sets the paper's setting at once",
     "audit", ["preset=paper"], PAPER),
    ("README.md", "memex audit preset=paper model=sd15 trainset=manifest trainset.path=s3://b/train.parquet "
     "resources=gpu storage=s3 storage.root=s3://b/memex-runs # the paper's setting",
     "audit", ["preset=paper", "model=sd15", "trainset=manifest", "trainset.path=s3://b/train.parquet",
               "resources=gpu", "storage=s3", "storage.root=s3://b/memex-runs"],
     {**PAPER, "model.kind": "latent_text", "resources.num_gpus": 1}),
    ("conf/preset/paper.yaml", "The paper's setting in one word", "nightly", ["preset=paper"], PAPER),
    ("README.md", "Overrides after it still win (`preset=paper sampling.samples_per_prompt=100`)",
     "audit", ["preset=paper", "sampling.samples_per_prompt=100"],
     {**PAPER, "sampling.samples_per_prompt": 100}),
    ("conf/preset/paper.yaml", "Any override on the command line still wins",  # a group choice too
     "audit", ["preset=paper", "sampling=fast", "filter.min_clique=4"],
     {"sampling.samples_per_prompt": 8, "sampling.num_inference_steps": 10, "filter.min_clique": 4,
      "prompts.limit": 350000}),
    ("README.md", "The defaults are the demo, sized for 2 CPU cores: the 24 most near-duplicated captions x 80 "
     "samples at 10 DDPM steps, a clique of 5 within tiled l2 0.15, every generation verified at tiled l2 "
     "<= 0.15, a picture counted once 2 generations copy it (`conf/tune/audit_demo.yaml`", "audit", [],
     DEMO_AUDIT),
    ("README.md", "`memex nightly` samples in rounds (`budget=adaptive`: 4 per prompt first, then up to 16 only",
     "nightly", [], {**DEMO_NIGHTLY, "budget.continue_factor": 1.2}),
    ("conf/audit.yaml", "memex audit # the demo: 24 prompts x 80 samples at 10 steps, 2 copies of a picture within "
     "tiled l2 0.15", "audit", [], DEMO_AUDIT),
    ("README.md", "5 in the demo (of 80 samples; of 16 in `memex nightly`), the paper's 10 of 500 with "
     "`preset=paper`", "audit", [], DEMO_AUDIT),
    ("README.md", "5 in the demo (of 80 samples; of 16 in `memex nightly`)", "nightly", [], DEMO_NIGHTLY),
    ("conf/filter/demo.yaml", "scaled to memex nightly's 16 samples per prompt: a clique of 5 of 16", "nightly", [],
     DEMO_NIGHTLY),
    ("conf/tune/audit_demo.yaml", "80 samples per prompt at 10 steps of the checkpoint's DDPM scheduler", "audit", [],
     DEMO_AUDIT),
    ("README.md", "another model keeps 16 samples at 50 steps, one generation, guidance 7.5 and batches of 16",
     "audit", ["model=sd15"], {"sampling.samples_per_prompt": 16, "sampling.num_inference_steps": 50,
                               "match.min_generations": 1, "sampling.guidance_scale": 7.5, "sampling.batch_size": 16}),
    ("conf/tune/nightly_demo.yaml", "another model has no such file and keeps the groups' settings (the schema's "
     "batch of 16 and guidance 7.5", "nightly", ["model=sd15", "nightly.base_model=/m",
                                                       "trainset=manifest", "trainset.path=/t"],
     {"sampling.guidance_scale": 7.5, "sampling.batch_size": 16, "sampling.samples_per_prompt": 16}),
    ("conf/tune/nightly_demo.yaml", "batch_size: 32", "nightly", [],
     {"sampling.guidance_scale": 3.0, "sampling.batch_size": 32}),
    ("conf/tune/audit_demo_uncond.yaml", "batch_size: 32", "audit", ["model=demo_uncond", "prompts=none",
                                                                     "match=relative"],
     {"sampling.guidance_scale": 3.0, "sampling.batch_size": 32, "sampling.samples_per_prompt": 16}),
    ("conf/tune/nightly_demo_uncond.yaml", "batch_size: 32", "nightly", ["model=demo_uncond", "prompts=none",
                                                                         "match=relative"],
     {"sampling.guidance_scale": 3.0, "sampling.batch_size": 32}),
    ("conf/preset/paper.yaml", "The paper's setting in one word", "audit", ["preset=paper"],
     {"sampling.samples_per_prompt": 500, "sampling.num_inference_steps": 50, "match.min_generations": 1}),
    ("conf/filter/default.yaml", "The paper's filter: a prompt is flagged when >= 10", "audit",
     ["filter=default"], {"filter.min_clique": 10, "filter.edge_threshold": 0.15}),
    ("conf/sampling/paper.yaml", "500 samples per prompt, 50 DDIM steps, guidance 7.5, fp16", "generate",
     ["sampling=paper"], {k: v for k, v in PAPER.items() if k.startswith("sampling.")}),
    ("README.md", "audits the shipped demo checkpoint (`demo/models/demo-text`", "audit", [],
     {"model.kind": "pixel_text", "model.name": "demo"}),
    ("README.md", "memex audit model=demo_uncond prompts=none match=relative # the shipped unconditional demo",
     "audit", ["model=demo_uncond", "prompts=none", "match=relative"],
     {"model.kind": "unconditional", "prompts.source": "none", "match.candidates": "all",
      "match.distance": "relative_l2", "match.threshold": 0.9}),
    ("conf/match/relative.yaml", "relative l2 <= 0.9 (alpha = 0.5 over the n = 50 nearest", "audit", ["match=relative"],
     {"match.threshold": 0.9, "match.alpha": 0.5, "match.n_neighbors": 50}),
    ("README.md", "`memex nightly` runs the adaptive budget (`budget=adaptive`: 24 prompts x 4 samples, then up to 16",
     "nightly", [], {"prompts.limit": 24, "budget.kind": "adaptive", "budget.rounds": [4, 16],
                     "filter.min_clique": 5}),
    ("README.md", "with the fixed budget (24 prompts x 16 samples each)", "nightly", ["budget=fixed"],
     {"prompts.limit": 24, "sampling.samples_per_prompt": 16, "budget.kind": "fixed"}),
    ("README.md", "memex train output=models/logos # the demo recipe: synthetic logos, 8x32 + 8x8 duplicates",
     "train", ["output=models/logos"], DEMO_RECIPE),
    ("conf/train.yaml", "memex train output=models/my-model # the demo recipe", "train",
     ["output=models/my-model"], DEMO_RECIPE),
    ("conf/data/demo.yaml", "8x32 + 8x8 + 240x1 = 560 training examples", "train", ["output=x"], DEMO_RECIPE),
    ("demo/README.md", "| demo-text | 5000 | 32 | 1e-3 | 0 |", "train", ["output=demo/models/demo-text"],
     DEMO_RECIPE),
    ("demo/README.md", "| demo-uncond | 1500 | 32 | 1e-3 | 0 |", "train",
     ["arch=uncond_small", "trainer.steps=1500", "output=demo/models/demo-uncond"],
     {**DEMO_RECIPE, "arch.kind": "unconditional", "trainer.steps": 1500}),
]


@pytest.mark.parametrize("name,phrase,stage,overrides,claimed", CLAIMS, ids=[f"{c[0]}:{c[1][:30]}" for c in CLAIMS])
def test_documented_claims_hold(name, phrase, stage, overrides, claimed):
    text = re.sub(r"(?m)^\s*#", " ", (REPO / name).read_text())  # YAML comment lines read as one text
    text = " ".join(text.replace("#", " # ").split())
    assert " ".join(phrase.replace("#", " # ").split()) in text, f"{name} no longer says {phrase!r}: update CLAIMS"
    cfg = compose(overrides, config_name=stage)
    for key, want in claimed.items():
        got = _get(cfg, key)
        if key == "data.duplication":
            got = [(g.copies, g.count) for g in got]
        assert got == want, f"{name} says {phrase!r}, but `memex {stage} {' '.join(overrides)}` has {key}={got!r}"


def test_default_paths_of_the_demo():
    """What README and demo/README say the defaults point at (paths depend on the checkout)."""
    audit, nightly = compose([], config_name="audit"), compose([], config_name="nightly")
    assert audit.model.path.endswith("demo/models/demo-text")
    assert audit.trainset.path == audit.model.path + "/training_manifest.parquet"
    assert nightly.nightly.location.endswith("demo/checkpoints")
    assert nightly.nightly.base_model.endswith("demo/models/demo-text")


def test_preset_is_a_checked_choice():
    """`preset=papr` fails (a group listed as `preset: null`, not `optional`); generate has no preset."""
    from hydra.errors import HydraException

    with pytest.raises(HydraException, match="preset/papr"):
        compose(["preset=papr"], config_name="audit")
    with pytest.raises(HydraException, match="preset"):
        compose(["preset=paper"], config_name="generate")
    for p in sorted((CONF_DIR / "preset").glob("*.yaml")):
        assert p.read_text().startswith("# @package _global_\n"), p.name
