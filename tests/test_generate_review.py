"""`memex generate` over a run folder an audit's other budget wrote, and a text model sampled with the empty prompt
alone under guidance: each refused before any sample is generated, naming the fix. No Ray: resources.executor=local
(the command's own process)."""

from __future__ import annotations

import subprocess

import pytest

from memex.config import ConfigError
from memex.layout import RunLayout, StorageError
from memex.plan import SamplePlan
from memex.stages import generate

from conftest import BIN, compose

PROMPTS = ["a red apple", "a lighthouse at dusk", "blue logo"]


def _overrides(tiny_models, tmp_path, *extra):
    p = tmp_path / "prompts.txt"
    p.write_text("\n".join(PROMPTS) + "\n")
    return ["model=local", f"model.path={tiny_models['pixel_text']}", "prompts=file", f"prompts.path={p}",
            f"storage.root={tmp_path / 'runs'}", "resources.executor=local", "sampling.num_inference_steps=2",
            "sampling.batch_size=4", "sampling.shard_size=4", "sampling.samples_per_prompt=8", *extra]


def _memex_generate(tmp_path, overrides) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "memex"), "generate", *overrides], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)


ADAPTIVE = [(None, 0, 4, None), ([1], 4, 8, {"continue_factor": 1.2})]  # budget=adaptive budget.rounds=[4,8]
KEEP = [([0, 2], 0, 8, None)]  # budget=fixed with triage.keep=2: a first round of two of the three prompts


def _audited(tiny_models, tmp_path, rounds):
    """The overrides, config and run folder of a `memex generate` whose folder an audit wrote `rounds` in (the same
    model, sampling and prompts: the same default run name)."""
    over = _overrides(tiny_models, tmp_path)
    cfg = compose(over)
    layout = RunLayout(cfg.storage.root, generate.prepare(cfg))  # the audit's claim of the run folder
    plan = SamplePlan.read(layout.store)
    for rows, lo, hi, rule in rounds:  # what audit.triage_and_generate wrote
        plan.add_round(layout.store, rows, len(PROMPTS), lo, hi, 4, 4, rule)
    return over, cfg, layout


def test_memex_generate_refuses_an_audits_rounds_in_its_run_folder(tiny_models, tmp_path):
    """An adaptive (or triage.keep) audit and `memex generate` with the same model, sampling and prompts share the
    default run name. `memex generate` resumed the audit's rounds and reported success with some prompts at 4
    samples for samples_per_prompt=8 of every prompt. It is refused now in one line, naming the folder, another
    run.name and memex audit, and nothing is generated."""
    over, _, layout = _audited(tiny_models, tmp_path, ADAPTIVE)
    r = subprocess.run([str(BIN / "memex"), "generate", *over], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    errors = [line for line in r.stderr.splitlines() if line.startswith("memex: error:")]
    assert r.returncode == 1 and len(errors) == 1, (r.returncode, r.stdout, r.stderr)
    msg = errors[0]
    assert f"run folder {layout.uri} holds rounds of samples [(0, 4), (4, 8)], and this run asks for [(0, 8)]" in msg
    assert "sampling.samples_per_prompt=8 of every prompt" in msg and "resume with memex audit" in msg, msg
    assert "Use another run.name" in msg, msg
    assert not layout.samples.complete()  # nothing generated


def test_memex_generate_refuses_a_triage_keep_audits_first_round(tiny_models, tmp_path):
    """The same, in-process (what cli._generate calls), for a fixed audit's triage.keep round: one prompt of three
    had no sample."""
    _, cfg, layout = _audited(tiny_models, tmp_path, KEEP)
    with pytest.raises(StorageError, match=r"holds rounds of a first round of other prompts \(triage.keep\) "
                                           r"\(memex generate: sampling.samples_per_prompt=8 of every prompt"):
        generate.run(cfg, layout.run_name, fixed=True)
    assert not layout.samples.complete()
    generate.run(cfg, layout.run_name)  # an audit's call (it checks its own budget): its round, as written


def test_memex_generate_resumes_a_fixed_audits_round(tiny_models, tmp_path):
    """A fixed audit's one round (every prompt, samples [0, samples_per_prompt)) is the run `memex generate`
    makes: it resumes it, every prompt at samples_per_prompt."""
    cfg = compose(_overrides(tiny_models, tmp_path))
    name = generate.prepare(cfg)
    layout = RunLayout(cfg.storage.root, name)
    SamplePlan.read(layout.store).add_round(layout.store, None, len(PROMPTS), 0, 8, 4, 4)
    s = generate.run(cfg, name, fixed=True)
    assert s["rows"] == 3 * 8 and s["rounds"] == 1
    counts = {}
    for pid in layout.samples.read(columns=["prompt_id"])["prompt_id"].to_pylist():
        counts[pid] = counts.get(pid, 0) + 1
    assert sorted(counts.values()) == [8, 8, 8]


@pytest.mark.parametrize("kind", ["pixel_text", "latent_text"])
def test_a_text_model_with_no_prompts_under_guidance_is_refused_naming_the_keys(tiny_models, tmp_path, kind):
    """prompts=none gives a text model only the empty prompt; guidance then ran it against itself: two identical
    UNet rows a sample and step (twice the UNet evaluations for the same images) and a triage score of 0.0 stored.
    Refused before any work, naming sampling.guidance_scale=1 and prompts; guidance 1 on the same model, and an
    unconditional model at any guidance_scale (it has none), pass."""
    base = ["model=local", f"model.path={tiny_models[kind]}", "prompts=none", f"storage.root={tmp_path / 'runs'}",
            "resources.executor=local", "sampling.num_inference_steps=2", "sampling.batch_size=4",
            "sampling.samples_per_prompt=4", "sampling.shard_size=4"]
    with pytest.raises(ConfigError, match=rf"prompts=none gives model.path=.*, a {kind} model, only the empty prompt, "
                                          r"and sampling.guidance_scale=7.5 would guide it .*Set "
                                          r"sampling.guidance_scale=1, or give it prompts \(prompts=file"):
        generate.prepare(compose(base))
    assert not (tmp_path / "runs").exists()  # refused before the run folder was claimed
    generate.check_model(compose([*base, "sampling.guidance_scale=1"]))
    generate.check_model(compose(["model=local", f"model.path={tiny_models['unconditional']}", "prompts=none",
                                  "sampling.guidance_scale=7.5"]))


def test_the_sampler_actor_refuses_a_run_of_empty_prompts_under_guidance(tiny_models, tmp_path):
    """The same refusal where the kind is known only once the model is loaded (a hub id): the run's prompts all
    empty. A run of empty prompts with guidance off samples one UNet row a sample and step, and stores no triage
    score."""
    base = ["model=local", f"model.path={tiny_models['pixel_text']}", "prompts=none", "run.name=r",
            f"storage.root={tmp_path / 'runs'}", "resources.executor=local", "sampling.num_inference_steps=2",
            "sampling.batch_size=4", "sampling.samples_per_prompt=4", "sampling.shard_size=4"]
    cfg = compose([*base, "sampling.guidance_scale=1"])
    name = generate.prepare(cfg)
    s = generate.run(cfg, name)
    assert (s["rows"], s["unet_evaluations"]) == (4, 4 * 2)  # 4 samples x 2 steps, one row each
    scores = RunLayout(cfg.storage.root, name).samples.read(columns=["triage_score"])["triage_score"].to_pylist()
    assert scores == [None] * 4
    with pytest.raises(ConfigError, match=r"every prompt of the run is empty, which gives model.path=.*, a "
                                          r"pixel_text model, only the empty prompt, .*sampling.guidance_scale=1"):
        generate.RunSampler(compose([*base, "sampling.guidance_scale=7.5"]), name)
