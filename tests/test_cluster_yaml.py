"""cluster.yaml must be a config the Ray cluster launcher accepts, and docker/Dockerfile
must build on the rayproject/ray image of the exact ray version installed here.

Validation goes through the same offline steps `ray up` runs before touching AWS
(ray.autoscaler._private.commands._bootstrap_config): prepare_config() merges the AWS
defaults.yaml, then validate_config() checks the result against ray/autoscaler/ray-schema.json.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
DOCKERFILE = REPO / "docker" / "Dockerfile"
CONSTRAINTS = REPO / "constraints.txt"


@pytest.fixture(scope="module")
def raw() -> dict:
    with open(CLUSTER_YAML) as f:
        return yaml.safe_load(f)


def _validate(config: dict) -> dict:
    """What `ray up` does offline: fill in provider defaults, then schema + sanity checks."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_validates_against_ray_schema(raw):
    prepared = _validate(raw)
    assert prepared["cluster_name"] == "memex"
    assert prepared["provider"]["type"] == "aws"


def test_no_setup_commands_leak_from_ray_defaults(raw):
    # defaults.yaml for AWS carries pip installs (a dev ray wheel, boto3); the image holds
    # everything, so the merged config must not run any setup command.
    prepared = _validate(raw)
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert prepared[key] == [], key


def test_head_is_cpu_only(raw):
    head = raw["available_node_types"][raw["head_node_type"]]
    assert head["resources"]["GPU"] == 0


def test_gpu_worker_autoscales(raw):
    workers = {
        name: t
        for name, t in raw["available_node_types"].items()
        if name != raw["head_node_type"] and t["resources"].get("GPU", 0) >= 1
    }
    assert workers, "no worker node type declares a GPU"
    for name, t in workers.items():
        assert t["max_workers"] > t.get("min_workers", 0), name
        assert t["max_workers"] <= raw["max_workers"], name


def test_docker_image_named(raw):
    docker = raw["docker"]
    image = docker.get("image") or docker.get("worker_image")
    assert isinstance(image, str) and image.strip()
    assert docker["container_name"]


def _constraint(name: str) -> str:
    pins = dict(
        line.split("#")[0].strip().split("==")
        for line in CONSTRAINTS.read_text().splitlines()
        if "==" in line.split("#")[0]
    )
    assert name in pins, f"{CONSTRAINTS.name} pins no {name}"
    return pins[name]


def test_dockerfile_base_matches_constraints_and_installed_ray():
    # One Ray version for the image, the constraints CI installs with, and the Ray these tests ran
    # on: a loose `ray>=` alone let a fresh CI pick up a new release the image does not have.
    froms = [
        line.split()[1]
        for line in DOCKERFILE.read_text().splitlines()
        if line.strip().upper().startswith("FROM ")
    ]
    assert len(froms) == 1, froms
    m = re.fullmatch(r"rayproject/ray:(?P<tag>\S+)", froms[0])
    assert m, f"base image is not rayproject/ray: {froms[0]}"
    tag = m["tag"]
    assert tag.endswith("-gpu"), tag
    pinned = _constraint("ray")
    assert tag.split("-")[0] == pinned, f"Dockerfile base {froms[0]} != constraints.txt ray=={pinned}"
    assert ray.__version__ == pinned, (
        f"ray {ray.__version__} installed, constraints.txt pins {pinned}: "
        "pip install -c constraints.txt -e '.[test]'"
    )


def test_the_laptop_install_has_what_ray_up_needs():
    """`ray up cluster.yaml` (Ray's AWS launcher) imports boto3. It came only from s3fs's [boto3] extra,
    which s3fs 2026.x no longer has: the README's laptop install (`-e .`, no test extra) had none, and only
    the test extra's moto brought it in CI. memex itself requires it, and the installed one imports."""
    from importlib.metadata import requires

    import boto3  # noqa: F401

    assert any(re.match(r"boto3\b(?!.*extra ==)", r) for r in requires("memex")), requires("memex")


def test_every_install_uses_the_constraints():
    # README's two commands, .ci/run and the image all install through constraints.txt.
    readme = (REPO / "README.md").read_text()
    installs = [ln for ln in readme.splitlines() if "pip install torch==2.13.0 " in ln and "-e '." in ln]
    assert len(installs) == 2, installs
    ci = (REPO / ".ci" / "run").read_text()
    assert any(ln in ci for ln in installs), ".ci/run does not run README's test command"
    # a RUN's continuation lines joined: the main install is the `&& pip install` after a backslash
    docker_pip = [ln for ln in DOCKERFILE.read_text().replace("\\\n", " ").splitlines()
                  if ln.startswith("RUN") and "pip install" in ln]
    assert len(docker_pip) == 2, docker_pip
    for line in installs + docker_pip:
        assert "constraints.txt" in line, line


def test_every_key_is_commented():
    # Each key line needs a comment on the line above or inline (the file documents itself).
    lines = CLUSTER_YAML.read_text().splitlines()
    key = re.compile(r"^\s*(- )?[A-Za-z_][\w.]*:")
    missing = [
        f"{i + 1}: {line.strip()}"
        for i, line in enumerate(lines)
        if key.match(line) and "#" not in line and not lines[i - 1].strip().startswith("#")
    ]
    assert not missing, "uncommented keys:\n" + "\n".join(missing)


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda c: c.__setitem__("max_worker", c.pop("max_workers")), id="top-level-typo"),
        pytest.param(
            lambda c: c["available_node_types"]["ray.worker.gpu"]["resources"].__setitem__("GPU", -1),
            id="negative-gpu",
        ),
        pytest.param(lambda c: c["docker"].__setitem__("imagee", "x"), id="docker-typo"),
    ],
)
def test_validator_rejects_broken_copies(raw, mutate):
    broken = copy.deepcopy(raw)
    mutate(broken)
    with pytest.raises(jsonschema.ValidationError):
        _validate(broken)


def test_the_image_has_every_tracker_and_no_mutable_tag_or_local_output():
    """A cluster user cannot pip install a tracker's extra on the nodes, and tracker=mlflow|wandb write in
    the working folder by default (its report artifacts would be baked into the image); cluster.yaml's
    image was ghcr.io/memex-audit/memex:latest, someone else's mutable tag."""
    docker = DOCKERFILE.read_text()
    trackers = [p.stem for p in (REPO / "conf" / "tracker").glob("*.yaml") if p.stem != "none"]
    assert trackers and all(f"'{t}'" in docker and t in docker.split("-e \"/opt/memex[")[1].split("]")[0]
                            for t in trackers), trackers
    ignored = (REPO / ".dockerignore").read_text().splitlines()
    def norm(e: str) -> str:
        return e.removeprefix("**/").rstrip("/")

    for entry in ("mlflow.db", "mlruns/", "wandb/", *(REPO / ".gitignore").read_text().split()):
        assert norm(entry) in {norm(e) for e in ignored}, entry
    raw = yaml.safe_load(CLUSTER_YAML.read_text())
    assert not raw["docker"]["image"].endswith(":latest") and "memex-audit" not in docker
