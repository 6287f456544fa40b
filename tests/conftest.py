"""Shared fixtures: one local Ray head per test session, tiny models, a moto S3 server on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def load_bench(name: str):
    """bench/<name>.py as a module (bench/ is scripts, not a package): e.g. references, the code before a
    memory change that its bench and its test both compare the new code with."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
# A scaled-down audit of the demo model for the end-to-end tests of what wraps an audit (nightly,
# trackers): the 4 most duplicated captions x 8 samples, 10 DDIM steps instead of the checkpoint's 50
# DDPM ones (5x fewer UNet calls; its memorized logos still come out within tiled l2 0.15), no triage
# (one actor pool fewer per audit; triage is tested in test_audit.py), a 3-clique
# and the fixed budget, so the sample count is known: ~5 s of generation per checkpoint on 2 cores.
SMALL_AUDIT = ["prompts.limit=4", "sampling.samples_per_prompt=8", "sampling.scheduler=ddim",
               "sampling.num_inference_steps=10", "triage=none", "filter.min_clique=3", "index.shards=2",
               "budget=fixed"]
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# No test reaches the Hugging Face hub (memex asks it about a hub id with no cached snapshot:
# models.check_hub_model); tests of that request serve the hub's API on loopback and turn this off.
os.environ["HF_HUB_OFFLINE"] = "1"
# Ray workers inherit this from the head started below. The suite runs more torch threads than the
# 2 cores (the head declares 4 CPUs, and the test process computes too): OpenMP's default spin-wait
# then burns the cores another thread needs (two 2-thread shadow trainings side by side: 61 s active,
# 34 s passive).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Set before anything imports ray: Ray reads the auth mode once per process (see ray_head).
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN"] = uuid.uuid4().hex + uuid.uuid4().hex
os.environ.pop("RAY_AUTH_TOKEN_PATH", None)


# Tests that use these fixtures start a Ray head or a browser: integration tests, marked slow so
# that `pytest -m "not slow"` is the unit loop. Tests that start subprocesses or train are marked
# @pytest.mark.slow by hand.
SLOW_FIXTURES = {"ray_head", "browser"}
# pytest-xdist runs the suite on 2 workers (pyproject addopts: -n 2 --dist loadgroup). Every test
# that runs Ray (the session's head, or @pytest.mark.ray: a cluster of its own) is in one group,
# so one worker runs them all in order: one Ray head per session, never two Rays side by side
# (their workers would fight for the 2 cores that the kill and node-loss tests time). Every other
# test goes with its module, so a module's fixtures (a trained model, say) are built once.
RAY_GROUP = "ray"


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    gpu = None  # torch imported only when a gpu test is collected
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if SLOW_FIXTURES & names:
            item.add_marker(pytest.mark.slow)
        ray = "ray_head" in names or item.get_closest_marker("ray") is not None
        item.add_marker(pytest.mark.xdist_group(RAY_GROUP if ray else item.nodeid.split("::")[0]))
        if item.get_closest_marker("gpu"):
            if gpu is None:
                import torch

                gpu = torch.cuda.is_available()
            if not gpu:  # skipped on CPU-only machines, never faked
                item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


def check_grouped(session) -> None:
    """xdist groups a test by the `@group` its hook appends to the test's id; pytest 9.2 ids ignore
    that append (pytest-xdist issue #1386), and the Ray tests would then run on both workers, two
    Ray heads side by side (whose jobs fail to authenticate). Fail them naming the fix instead."""
    if os.environ.get("PYTEST_XDIST_WORKER") and getattr(session.config.option, "loadgroup", False):
        if not any("@" in item.nodeid for item in session.items):
            pytest.fail("pytest-xdist did not group the Ray tests onto one worker (pytest-xdist issue #1386, on "
                        "pytest 9.2): install the test extra's pytest (<9.2), or run with -n 0", pytrace=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RayHead:
    address: str  # GCS address for ray.init / resources.address
    dashboard: str  # HTTP address for `ray job submit`


@pytest.fixture(scope="session")
def ray_head(request):
    """`ray start --head` once per session; this process connects as a driver.

    Ray turns 127.0.0.1 into this host's own interface address (services.resolve_ip_for_localhost),
    so traffic stays on this machine. Token authentication is switched on with a fresh token for
    the session (the cluster default when ~/.ray/auth_token exists), so the tests run the same way
    on a machine with or without a token file, and subprocesses and `ray job submit` inherit it.
    """
    import ray

    # Not done: RAY_preload_python_modules=diffusers... would spare an actor that takes an idle worker
    # its ~10 s diffusers import, but every task worker (index, filter) then pays it too: measured on
    # tests/test_audit.py -n 0, 186 s without, 258 s with (2026-12-05).
    check_grouped(request.session)
    port, dash = free_port(), free_port()
    cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
           "--num-cpus=4", "--disable-usage-stats", f"--ray-client-server-port={free_port()}",
           f"--dashboard-agent-listen-port={free_port()}", f"--min-worker-port={free_port()}",
           "--max-worker-port=0"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=180)
    head = RayHead(f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}")
    try:
        ray.init(address=head.address, log_to_driver=False)
        yield head
    finally:
        ray.shutdown()
        stop_head(port)


def stop_head(port: int) -> None:
    """Stop this session's head only. `ray stop --force` kills every Ray process on the machine,
    including another pytest session's (or a benchmark's) head: its processes are found here by the
    GCS port on their command line (gcs_server, raylet, dashboard, workers all carry it)."""
    import psutil

    def ours(args) -> bool:  # Ray turns 127.0.0.1 into the host's address: match the port alone
        return any(a.endswith(f":{port}") or a == f"--gcs_server_port={port}" for a in args or ())

    procs = [p for p in psutil.process_iter(["cmdline"]) if p.pid != os.getpid() and ours(p.info["cmdline"])]
    for p in list(procs):  # agents and workers rename themselves (ray::...): take them as children
        try:
            procs += p.children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """The three model families, built from configs in code and saved as diffusers folders."""
    from memex import tiny

    root = tmp_path_factory.mktemp("models")
    return {kind: str(tiny.build(kind, root / kind)) for kind in tiny.KINDS}


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 in server mode on 127.0.0.1; yields fsspec/s3fs storage options."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    url = f"http://127.0.0.1:{port}"
    yield {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": url, "region_name": "us-east-1"}}
    server.stop()


@pytest.fixture
def bucket(s3_server, request):
    import boto3

    name = "memex-" + request.node.name.lower().replace("_", "-")[:40]
    boto3.client("s3", endpoint_url=s3_server["client_kwargs"]["endpoint_url"], region_name="us-east-1",
                 aws_access_key_id="testing", aws_secret_access_key="testing").create_bucket(Bucket=name)
    return name


def compose(overrides: list[str], config_name: str = "generate"):
    """Compose the real conf/ with Hydra and convert it to the typed config the stages take."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from memex import cli

    with initialize_config_dir(config_dir=str(cli.CONF_DIR), version_base=None):
        cfg = hydra_compose(config_name=config_name, overrides=overrides)
    return {"generate": cli.to_generate_config, "train": cli.to_train_config, "audit": cli.to_audit_config,
            "nightly": cli.to_nightly_config, "mia": cli.to_mia_config}[config_name](cfg)


CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
                 if os.path.exists(p)), None)


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium driven by Playwright (the Debian package: .ci/run installs it).

    Without it the browser tests skip, unless MEMEX_REQUIRE_BROWSER=1 (set by .ci/run), where a
    missing browser fails them: CI never goes green by skipping."""
    if CHROMIUM is None:
        msg = "no Chromium found: apt-get install chromium (see .ci/run)"
        if os.environ.get("MEMEX_REQUIRE_BROWSER") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


def blocky(rng, size: int = 32):
    """A random picture of 4x4 flat blocks (uint8 size x size x 3): any two differ by ~0.4 tiled l2,
    far above the 0.15 threshold, and from any generation of the tiny models."""
    import numpy as np

    return np.kron(rng.integers(0, 256, (4, 4, 3)), np.ones((size // 4, size // 4, 1))).astype(np.uint8)


def plant_run(root, run_name: str, samples: dict, shard_size: int = 8):
    """A run folder as `memex generate` leaves it, with hand-made generations: prompts.parquet and
    samples/ (shards, markers, _SUCCESS.json). `samples`: prompt text -> list of uint8 HxWx3 images,
    the same number for every prompt. Returns its RunLayout."""
    import pyarrow as pa

    from memex.images import encode_png
    from memex.layout import SAMPLES_SCHEMA, RunLayout
    from memex.plan import SamplePlan
    from memex.prompts import prompt_id

    prompts = list(samples)
    n = len(samples[prompts[0]])
    layout = RunLayout(str(root), run_name)
    layout.store.write_table(layout.prompts_path, pa.table({"prompt_id": [prompt_id(p) for p in prompts],
                                                            "prompt": prompts}))
    plan = SamplePlan.read(layout.store)
    plan.add_round(layout.store, None, len(prompts), 0, n, shard_size, shard_size)
    for shard in plan.shards():
        rows = []
        for p, i in plan.units(shard):
            img = samples[prompts[p]][i]
            rows.append({"sample_id": f"{prompt_id(prompts[p])}/{i}", "prompt_id": prompt_id(prompts[p]),
                         "prompt": prompts[p], "sample_index": i, "seed": i, "image": encode_png(img),
                         "height": img.shape[0], "width": img.shape[1], "model_id": "planted", "scheduler": "none",
                         "num_inference_steps": 0, "guidance_scale": 0.0, "dtype": "float32",
                         "batch_size": shard_size, "triage_score": None, "round": 0})
        layout.samples.write_shard(shard.index, pa.Table.from_pylist(rows, schema=SAMPLES_SCHEMA))
    layout.samples.mark_success({"rows": len(prompts) * n})
    return layout


def attach_index(layout, info) -> None:
    """Record the index a planted run is matched against, as `memex audit` does (<run>/index.json)."""
    layout.store.write_json(layout.index_json, info.to_json())


def make_lora(base: str, folder: Path, seed: int = 1, scale: float = 0.5, text_encoder: bool = False) -> Path:
    """A LoRA of `base` made as diffusers' train_text_to_image_lora.py makes one (peft adapters on the
    UNet's attention projections, save_lora_weights), with random up factors: it changes the samples.
    text_encoder: also on the text encoder's attention projections, as train_dreambooth_lora.py
    --train_text_encoder saves them (its text_encoder.add_adapter needs peft >= 0.22 on transformers 5,
    newer than this machine's registry; peft's inject_adapter_in_model makes the same layers)."""
    import torch
    from diffusers import DiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    pipe = DiffusionPipeline.from_pretrained(base)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                     target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    te = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                            target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]),
                                 pipe.text_encoder) if text_encoder else None
    torch.manual_seed(seed)
    for model in (pipe.unet, te):
        for name, p in (model.named_parameters() if model is not None else ()):
            if "lora_B" in name:
                p.data.normal_(0, scale)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    text = convert_state_dict_to_diffusers(get_peft_model_state_dict(te)) if te is not None else None
    type(pipe).save_lora_weights(folder, unet_lora_layers=layers, text_encoder_lora_layers=text,
                                 safe_serialization=True)
    return folder


def logo_set(path: Path, indices, ids: list[str] | None = None, size: int = 8) -> Path:
    """An image set for `memex mia` (members, non-members, queries): synthetic logos (memex/synth.py) at
    `size` px as id, PNG image and caption, ids logo-<i> unless given."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from memex import synth
    from memex.images import encode_png

    rows = [synth.logo(i, size, 0) for i in indices]
    pq.write_table(pa.table({"id": ids or [f"logo-{i:02d}" for i in indices],
                             "image": [encode_png(r[0]) for r in rows], "caption": [r[1] for r in rows]}), path)
    return path


def tiny_uncond(members: Path, output: Path, steps: int = 10, warmup: int = 2, seed: int | None = None,
                size: int = 8) -> Path:
    """A `memex train` unconditional model of `members` at `size` px, two levels of 8 and 16 channels and no
    attention: 10 steps train it in seconds (its scores need not separate anything); 300 memorize 6 logos."""
    from memex.config import ArchConfig, ArchKind, DataConfig, TrainConfig, TrainerConfig
    from memex.training import train

    trainer = TrainerConfig(steps=steps, batch_size=8, lr=5e-3, warmup_steps=warmup, checkpoint_every=steps,
                            log_every=min(steps, 100), **({} if seed is None else {"seed": seed}))
    return train(TrainConfig(arch=ArchConfig(kind=ArchKind.unconditional, resolution=size,
                                             block_out_channels=[8, 16], attention_levels=0),
                             data=DataConfig(path=str(members)), trainer=trainer, output=str(output)))
