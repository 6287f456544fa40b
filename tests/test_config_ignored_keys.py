"""Settings a run would silently ignore are refused before any work, naming the key and the fix
(memex/config.py): filter.* on an unconditional model, which runs no clique filter (validate_audit), and the
Ray workers' resources.* with resources.executor=local, which starts no Ray (validate_resources)."""

from __future__ import annotations

import pytest

from memex.config import ConfigError

from conftest import compose

MIA = ["members.path=/d/m", "nonmembers.path=/d/n"]  # mia's default sets are the demo's; any two paths compose
UNCOND = ["model=demo_uncond", "prompts=none", "match=relative"]  # conf/model/demo_uncond.yaml's own command


# ---- filter.* on an unconditional model --------------------------------------------------------------------
@pytest.mark.parametrize("config_name", ["audit", "nightly"])
@pytest.mark.parametrize("override, key", [
    ("filter.min_clique=3", "filter.min_clique"),
    ("filter.edge_threshold=0.1", "filter.edge_threshold"),
    ("filter.max_expansions=1000", "filter.max_expansions"),
    ("filter.prompts_per_task=4", "filter.prompts_per_task"),
])
def test_a_filter_setting_on_an_unconditional_model_is_refused_naming_the_key(config_name, override, key):
    """The clique filter groups the generations of one prompt, and runs only for prompted audits
    (memex/stages/audit.py): with prompts=none a filter setting was accepted and ignored, the user believing
    the audit changed."""
    with pytest.raises(ConfigError) as e:
        compose([*UNCOND, override], config_name=config_name)
    msg = str(e.value)
    assert msg.startswith(f"{override} is set, and an unconditional model (prompts=none) runs no clique filter"), msg
    assert f"drop {key}" in msg and "match.*" in msg, msg  # the fix, and what to tune instead


@pytest.mark.parametrize("config_name", ["audit", "nightly"])
@pytest.mark.parametrize("extra", [[], ["filter=demo"], ["filter=default"], ["match.threshold=0.8"]])
def test_the_shipped_filter_options_do_not_fail_an_unconditional_audit(config_name, extra):
    """conf/audit.yaml and conf/nightly.yaml pick filter=demo (min_clique 5, not the schema's 10) for every model:
    that is no setting of the user's, and match.* is what an unconditional audit reads."""
    cfg = compose([*UNCOND, *extra], config_name=config_name)
    assert cfg.filter.min_clique in (5, 10)


def test_a_filter_setting_on_a_text_model_still_passes():
    assert compose(["filter.min_clique=3"], config_name="audit").filter.min_clique == 3


# ---- resources.* of Ray's workers with resources.executor=local ----------------------------------------------
@pytest.mark.parametrize("config_name, extra", [("generate", []), ("audit", []), ("nightly", []), ("mia", MIA)])
@pytest.mark.parametrize("override, key", [
    ("resources.num_gpus=1", "resources.num_gpus"),
    ("resources.num_cpus=4", "resources.num_cpus"),
    ("resources.min_actors=2 resources.max_actors=2", "resources.min_actors"),  # (min <= max)
    ("resources.max_actors=4", "resources.max_actors"),
    ("resources.start_timeout_s=60", "resources.start_timeout_s"),
    ("resources=gpu", "resources.num_gpus"),  # the option's GPU per worker and 8 actors
])
def test_a_ray_worker_setting_with_the_local_executor_is_refused_naming_the_key(config_name, extra, override, key):
    """resources.executor=local runs every unit in the command's process: the GPUs, CPUs, actor pool and
    node wait of Ray's workers were accepted and ignored (a GPU asked for, the CPU used where none is visible)."""
    with pytest.raises(ConfigError) as e:
        compose([*extra, "resources.executor=local", *override.split()], config_name=config_name)
    msg = str(e.value)
    assert msg.startswith(f"{key}=") and "is set, and it is a setting of Ray's workers" in msg, msg
    assert f"drop {key}" in msg and "resources.executor=ray" in msg, msg
    if key == "resources.num_gpus":
        assert "resources.device=cuda" in msg, msg  # the local executor's own way to a GPU
    compose([*extra, *override.split()], config_name=config_name)  # on Ray it is read: accepted


@pytest.mark.parametrize("config_name, extra", [("generate", []), ("audit", []), ("mia", MIA)])
def test_the_keys_the_local_executor_reads_still_pass(config_name, extra):
    """resources.device (auto, cpu, cuda: this process's device) and resources.pixel_cache_mb (the driver's
    cache) apply to local execution; the schema's defaults, given explicitly, are no setting to ignore."""
    cfg = compose([*extra, "resources.executor=local", "resources.device=cpu", "resources.pixel_cache_mb=256",
                   "resources.num_gpus=0", "resources.num_cpus=2"], config_name=config_name)
    assert cfg.resources.device == "cpu" and cfg.resources.pixel_cache_mb == 256
