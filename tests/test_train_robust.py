"""`memex train` under memory, bad rows, a second run into its folder, precision, seeds and kills.

Names from memex.training that the code before did not have are imported inside each test, so every test of
this file runs (and fails where it tests a fix) against that code too."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from memex.config import ConfigError
from memex.images import encode_png
from memex.manifest import ManifestError
from memex.synth import logo
from memex.training import INFO_FILE, MANIFEST_FILE, train


def _compose(overrides):
    from hydra import compose, initialize_config_dir

    from memex.cli import CONF_DIR, to_train_config

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return to_train_config(compose(config_name="train", overrides=overrides))


def _cfg(manifest, out, *extra):
    """tests/test_train.py's tiny run: 16 px, two UNet levels, a few steps."""
    text = [] if "arch=uncond_small" in extra else ["arch.max_length=24"]
    return _compose([f"data.path={manifest}", f"output={out}", "trainer=quick", "trainer.steps=3",
                     "trainer.checkpoint_every=3", "arch.resolution=16", "arch.block_out_channels=[8,16]",
                     *text, "data.duplication=[]", *extra])


def _manifest(path, images, captions=None, ids=None):
    ids = ids or [f"i{k}" for k in range(len(images))]
    cols = {"id": ids, "image": [x if isinstance(x, (bytes, type(None))) else encode_png(x) for x in images]}
    if captions is not None:
        cols["caption"] = captions
    pq.write_table(pa.table(cols), path)
    return path


@pytest.fixture
def manifest(tmp_path):
    rows = [logo(i, 16) for i in range(6)]
    return _manifest(tmp_path / "m.parquet", [im for im, _ in rows], [c for _, c in rows])


def test_the_training_set_is_kept_as_uint8_and_hashed_as_before(tmp_path, monkeypatch):
    """load_training_set held the set as float32 (4x its uint8 size) beside the decoded list, np.stack's copy and
    two float temporaries; recipe() copied it once more to hash it; train moved it whole to every device. It is
    one uint8 array now, filled as images decode; a batch is converted on the device (to_float: the same float32
    bits and strides as the whole-set conversion), and recipe()'s digest, hashed a chunk at a time, is the one
    of before, so checkpoints and output folders of before still resume."""
    from memex import training

    rows = [logo(i, 16) for i in range(5)]
    wide = np.concatenate([rows[0][0], rows[0][0][:, :8]], axis=1)  # squashed by data.resize
    path = _manifest(tmp_path / "m.parquet", [im for im, _ in rows] + [wide, logo(9, 24)[0]],
                     [c for _, c in rows] + ["a wide logo", "a big logo"])
    cfg = _cfg(path, tmp_path / "o", "data.duplication=[{copies: 3, count: 2}]")
    _, images, captions, example_image, squashed = training.load_training_set(cfg)
    assert images.dtype == torch.uint8 and images.shape == (7, 3, 16, 16) and squashed == 1
    assert images.untyped_storage().nbytes() == 7 * 16 * 16 * 3  # one array: no other copy of the pixels
    # what the code before held (np.stack of the decoded images, permuted, / 127.5 - 1) and hashed
    old = torch.from_numpy(images.permute(0, 2, 3, 1).contiguous().numpy()).permute(0, 3, 1, 2).float() / 127.5 - 1
    h = hashlib.sha256(memoryview(np.ascontiguousarray(old.detach().cpu().float().numpy())).cast("B"))
    h.update(json.dumps(captions).encode())
    h.update(example_image.cpu().numpy().astype(np.int64).tobytes())
    assert training.recipe(cfg, images, captions, example_image)["training_set_sha256"] == h.hexdigest()
    monkeypatch.setattr(training, "HASH_CHUNK_BYTES", 16 * 16 * 3 * 4 * 2)  # 2 images a chunk: 4 chunks
    assert training.recipe(cfg, images, captions, example_image)["training_set_sha256"] == h.hexdigest()
    assert training.recipe(cfg, old, captions, example_image)["training_set_sha256"] == h.hexdigest()
    # a batch: the same float32 bits and (channels-last) strides as the rows of the whole-set conversion
    lut = training._float_lut()
    every = torch.from_numpy(np.arange(256 * 3, dtype=np.int64).reshape(1, 16, 16, 3).astype(np.uint8)).permute(
        0, 3, 1, 2)
    assert torch.equal(training.to_float(every, lut), every.float() / 127.5 - 1)
    picked = torch.tensor([3, 0, 3, 6])
    batch = training.to_float(images[picked], lut)
    assert torch.equal(batch, old[picked]) and batch.stride() == old[picked].stride() and batch.dtype == torch.float32


def test_every_unusable_row_is_named_in_one_error(tmp_path, monkeypatch):
    """The first undecodable image (another size with data.resize=false, a missing caption, characters the
    tokenizer cannot read) stopped training: fixed and rerun, every image was decoded again to find the next.
    Every row is checked now, and one error gives the count, the first 10 with their reasons, each kind's fix,
    and the file that lists them all. A missing caption column is refused before any image is decoded, and a
    store that does not answer stops at the first row (each row would wait on it again)."""
    from memex import manifest as manifest_mod
    from memex import training

    good = [logo(i, 16) for i in range(8)]
    images, captions = [im for im, _ in good], [c for _, c in good]
    images += [b"\x89PNG garbage"] * 6 + [logo(20 + k, 24)[0] for k in range(4)] + [logo(30, 16)[0]] * 3
    captions += [f"broken {k}" for k in range(6)] + [f"big {k}" for k in range(4)] + [None, "日本の犬", "猫のロゴ"]
    path = _manifest(tmp_path / "bad.parquet", images, captions)
    out = tmp_path / "o"
    with pytest.raises(ManifestError) as e:
        train(_cfg(path, out, "data.resize=false"))
    msg = str(e.value)
    assert msg.startswith(f"13 of 21 rows of the training manifest {path} cannot be trained on (13 problems): "
                          "image 'i8' cannot be decoded"), msg
    assert "image 'i14' is 24x24, the model takes 16x16" in msg and "image 'i17'" in msg  # the 10th
    assert "image 'i18'" not in msg and f"and 3 more (all 13 listed in {out / training.PROBLEMS_FILE})" in msg
    for fix in ("repair or drop the images that do not decode", "set data.resize=true", "transliterate"):
        assert fix in msg, fix
    listed = (out / training.PROBLEMS_FILE).read_text().splitlines()
    assert listed[0] == "id\treason" and [r.split("\t")[0] for r in listed[1:]] == [f"i{k}" for k in range(8, 21)]
    assert "its caption '猫のロゴ' has characters" in listed[-1]
    assert sorted(p.name for p in out.iterdir()) == [training.PROBLEMS_FILE]  # nothing else: no lease left
    # the rows fixed: it trains, and the list of the refused run is gone
    fixed = _manifest(tmp_path / "fixed.parquet", images[:8], captions[:8])
    done = train(_cfg(fixed, out, "data.resize=false", "trainer.steps=1"))
    assert not (done / training.PROBLEMS_FILE).exists() and (done / INFO_FILE).is_file()

    decoded = []
    real = training.load_image
    monkeypatch.setattr(training, "load_image", lambda *a: decoded.append(1) or real(*a))
    with pytest.raises(ManifestError, match=r"has no 'caption' column \(it has id, image\): a text-conditional"):
        train(_cfg(_manifest(tmp_path / "nocap.parquet", images[:4]), tmp_path / "o2"))
    assert not decoded and not (tmp_path / "o2").exists()
    from botocore.exceptions import EndpointConnectionError

    asked = []

    def unreachable(uri, opts, version=None):
        asked.append(uri)
        raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1")

    monkeypatch.setattr(manifest_mod, "read_uri", unreachable)
    pq.write_table(pa.table({"id": ["a", "b", "c"], "uri": [f"s3://b/{k}.png" for k in "abc"],
                             "caption": ["a", "b", "c"]}), tmp_path / "s3.parquet")
    with pytest.raises(ManifestError, match=r"image 'a': cannot read s3://b/a.png: EndpointConnectionError.*Rerun"):
        train(_cfg(tmp_path / "s3.parquet", tmp_path / "o3"))
    assert asked == ["s3://b/a.png"]


_HOLDER = """
import sys, time
from memex.lease import Lease
from memex.storage import Store
lease = Lease(Store(sys.argv[1]), "output").acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_a_fault_of_every_row_is_refused_without_decoding_them_all(tmp_path, monkeypatch):
    """A fault every row has (another size with data.resize=false) stopped at row 1 before every row was checked;
    checked to the end it was hours of decoding at 5M rows before the error. The check stops at MAX_PROBLEMS
    and says so ("at least")."""
    from memex import training

    monkeypatch.setattr(training, "MAX_PROBLEMS", 3)
    path = _manifest(tmp_path / "big.parquet", [logo(k, 24)[0] for k in range(12)], [f"big {k}" for k in range(12)])
    decoded = []
    real = training.load_image
    monkeypatch.setattr(training, "load_image", lambda *a: decoded.append(1) or real(*a))
    with pytest.raises(ManifestError) as e:
        train(_cfg(path, tmp_path / "o", "data.resize=false"))
    msg = str(e.value)
    assert msg.startswith(f"at least 3 of 12 rows of the training manifest {path} cannot be trained on"), msg
    assert "the check stopped at 3 problems: more rows may have them" in msg
    assert len(decoded) == 3  # not the other 9


def test_a_second_run_into_the_same_output_is_refused_naming_the_first(manifest, tmp_path, monkeypatch):
    """Nothing stopped two runs in one output folder (a requeued job, a double launch): one run's save removed
    the other's _tmp-checkpoint-N mid-write (its stale-folder cleanup) and pruned its checkpoints. The run holds
    output/_lease.json now (memex/lease.py): a second one refuses before anything is read or written, naming the
    holder, and once the holder is gone (its pid, on this machine) the lease is taken over."""
    import memex.training

    monkeypatch.setattr(memex.training, "OUTPUT_LEASE_WAIT_S", 0.0)  # (a requeue's wait: the test below)
    out = tmp_path / "m"
    (out / "checkpoints" / "_tmp-checkpoint-9" / "unet").mkdir(parents=True)  # the first run's save, mid-write
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=re.escape(f"output={out} is in use by host ") + r".* pid "
                           + str(holder.pid) + r" .*another memex train writes.*choose another output folder"):
            train(_cfg(manifest, out))
        assert (out / "checkpoints" / "_tmp-checkpoint-9" / "unet").is_dir()  # the first run's, untouched
        assert not (out / INFO_FILE).exists() and json.loads((out / "_lease.json").read_text())["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()
    done = train(_cfg(manifest, out))  # the holder is gone: its lease taken over
    assert (done / INFO_FILE).is_file() and not (done / "_lease.json").exists()
    assert not (done / "checkpoints" / "_tmp-checkpoint-9").exists()  # a stale save of a dead run: removed

    # `accelerate launch`: only the main process takes the lease; the others stop when it could not
    import accelerate
    import accelerate.utils

    monkeypatch.setattr(accelerate.PartialState, "is_main_process", property(lambda self: False))
    # (num_processes is the shared state's attribute: a property on the class reads first)
    monkeypatch.setattr(accelerate.PartialState, "num_processes", property(lambda self: 2), raising=False)
    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", lambda objs, from_process=0: ["in use by X"])
    with pytest.raises(ConfigError, match=re.escape(f"the main training process did not take output={tmp_path / 'n'}"
                                                    ": in use by X")):
        train(_cfg(manifest, tmp_path / "n"))
    assert not (tmp_path / "n").exists()


def test_a_requeued_run_waits_for_its_killed_predecessors_lease_and_resumes(manifest, tmp_path, caplog):
    """A requeued job (SLURM --requeue, a Kubernetes retry) starts on another node within the lease's timeout of
    its predecessor's kill: that lease is not stale yet, and no pid on this machine says it is gone. It was
    refused at once (the predecessor's checkpoints unresumed); it now waits for the lease to go stale, then
    takes it over and trains."""
    import os
    import socket

    from memex.config import StorageConfig

    out = tmp_path / "m"
    out.mkdir()
    timeout = StorageConfig().lease_timeout_s
    (out / "_lease.json").write_text(json.dumps({  # another node's run, killed: its last heartbeat ~timeout ago
        "host": "node-7", "pid": os.getpid() + 12345, "machine": f"node-7/{socket.gethostname()}-other",
        "started": "2026-12-07T00:00:00+00:00", "heartbeat_unix": time.time() - timeout + 10,
        "nonce": "f" * 32, "timeout_s": timeout, "command": "memex"}))
    with caplog.at_level("WARNING", logger="memex.lease"):
        done = train(_cfg(manifest, out))
    assert (done / INFO_FILE).is_file() and not (done / "_lease.json").exists()
    assert "is in use by host node-7" in caplog.text and "waiting up to" in caplog.text
    # it waited for the heartbeat to go stale, then took it over: the takeover names the heartbeat's age then
    took_over = re.findall(r"taking over the lease of host node-7 .*: no heartbeat for (\d+) s", caplog.text)
    assert len(took_over) == 1 and int(took_over[0]) >= timeout, caplog.text


def test_fp16_on_the_cpu_is_refused_before_any_data(manifest, tmp_path, monkeypatch):
    """trainer.mixed_precision=fp16 on the CPU: accelerate runs no fp16 there (no autocast, no GradScaler), and
    the run trained in float32 with fp16 in its recipe and memex_train.json, without a word. Refused before the
    data is read, naming bf16 and no. LiRA's shadows copy a target's recipe (train's copies_recipe=True): a
    target trained fp16 on a GPU still gets its shadows on CPU workers, trained in float32 as before and
    recorded so."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    # accelerate's device is the process's, fixed by its first train (state shared by every instance): on a GPU
    # host an earlier test's train took the GPU, and cpu=True was then ignored. A fresh state, as in a new process
    for shared in (PartialState, AcceleratorState, GradientState):
        monkeypatch.setattr(shared, "_shared_state", {})
    cfg = _cfg(tmp_path / "missing.parquet", tmp_path / "o", "trainer.mixed_precision=fp16")
    refusal = r"trainer.mixed_precision=fp16 on the CPU.*trainer.mixed_precision=bf16.*trainer.mixed_precision=no"
    with pytest.raises(ConfigError, match=refusal):
        train(cfg, cpu=True)
    assert not (tmp_path / "o").exists()
    out = train(_cfg(manifest, tmp_path / "shadow", "arch=uncond_small", "trainer.mixed_precision=fp16",
                     "trainer.steps=1"), cpu=True, copies_recipe=True)
    assert json.loads((out / INFO_FILE).read_text())["config"]["trainer"]["mixed_precision"] == "no"
    from memex.training import check_run_inputs

    with pytest.raises(ConfigError, match=refusal):
        check_run_inputs(cfg, "cpu", 1)
    assert check_run_inputs(cfg, "cuda", 1) is cfg
    assert check_run_inputs(cfg, "cpu", 1, copies_a_recipe=True).trainer.mixed_precision == "no"


def test_a_seed_torch_cannot_take_is_refused_before_any_data(manifest, tmp_path):
    """Each step's batch generator is seeded with trainer.seed x 1,000,003 + step x 101 + process: a seed past
    ~1.8e13 (a nanosecond timestamp) overflowed torch's 64-bit seed with a traceback at step 0, after every image
    was decoded. Refused before the data is read, naming the range, which is exact: its ends train."""
    for seed in (time.time_ns(), -(10**20)):
        with pytest.raises(ConfigError, match=rf"trainer.seed={seed} is outside -?\d+\.\.\d+: each training step "
                                              r".*Give a seed in that range"):
            train(_cfg(tmp_path / "missing.parquet", tmp_path / "o", f"trainer.seed={seed}"))
        assert not (tmp_path / "o").exists()
    from memex.training import _step_seed, seed_range

    lo, hi = seed_range(2)
    assert 10**13 < hi < 2 * 10**13 and lo < -9 * 10**12
    torch.Generator().manual_seed(_step_seed(hi, 1, 0))  # the last step's seed at the ends: torch takes them
    torch.Generator().manual_seed(_step_seed(lo, 0, 0))
    with pytest.raises((RuntimeError, ValueError)):
        torch.Generator().manual_seed(_step_seed(hi + 1, 1, 0))
    with pytest.raises(ConfigError, match=f"trainer.seed={hi + 1} is outside"):
        train(_cfg(manifest, tmp_path / "o", "arch=uncond_small", "trainer.steps=2", f"trainer.seed={hi + 1}"))
    for seed in (hi, lo):
        out = train(_cfg(manifest, tmp_path / f"s{seed}", "arch=uncond_small", "trainer.steps=2",
                         "trainer.checkpoint_every=2", f"trainer.seed={seed}"))
        assert json.loads((out / INFO_FILE).read_text())["seed"] == seed and (out / MANIFEST_FILE).is_file()


def test_a_prune_killed_mid_delete_leaves_no_checkpoint_that_looks_complete(tmp_path, monkeypatch):
    """Old checkpoints were pruned with rmtree in place: a run killed mid-delete left a checkpoint-N missing some
    files, which checkpoints() counted as complete (and a damaged checkpoint's message named as the one to resume
    from). Renamed out of the checkpoint names first, then deleted; the next save removes what a kill left."""
    import shutil

    from memex import training
    from memex.config import ArchConfig, ArchKind

    unet = training.build_unet(ArchConfig(kind=ArchKind.unconditional, block_out_channels=[8, 16]), None)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    folder = tmp_path / "checkpoints"
    training._save_checkpoint(folder, 3, unet, opt, 1, {"r": 1})
    real = shutil.rmtree

    def killed(path, *a, **k):
        if str(path).endswith("checkpoint-3") and (path / "optimizer.json").exists():
            (path / "optimizer.json").unlink()  # the delete got this far
            raise KeyboardInterrupt("killed mid-delete (simulated)")
        return real(path, *a, **k)

    monkeypatch.setattr(training.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        training._save_checkpoint(folder, 5, unet, opt, 1, {"r": 1})
    monkeypatch.undo()
    assert [p.name for p in training.checkpoints(folder)] == ["checkpoint-5"]
    training._save_checkpoint(folder, 7, unet, opt, 1, {"r": 1})
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-7"]
