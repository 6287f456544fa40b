"""memex on a multi-node Ray cluster: a head with no GPU and two worker nodes declaring num_gpus=1
(`ray.cluster_utils.Cluster`, run by tests/cluster_host.py in its own process), memex's driver
connected by resources.address as `ray job submit` connects it.

  - resources=gpu: the sampler actors land only on the GPU nodes (the node each unit
    ran on is in its marker), and an audit with storage on the moto S3 server completes;
  - a local storage.root is refused on this cluster (each node would write to its own disk);
  - a worker no node fits (resources.num_gpus=2) waits for a node to join, as an autoscaler adds one;
  - a GPU node removed mid-generation, storage.shared_mount=true on a local root (here every node
    does share this machine's disk): the run still ends with every sample present exactly once
    (last: the module's cluster has one GPU node less afterwards).

GPUs are logical resources here: the actors run on CPU (resources.device=cpu)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pyarrow.dataset as pds
import pytest

from conftest import BIN, REPO

pytestmark = [pytest.mark.slow, pytest.mark.ray]  # a cluster of its own: on the Ray tests' xdist worker

# the demo checkpoint, scaled down: 4 prompts of the near-duplicate ranking, few steps
SMALL = ["sampling.num_inference_steps=10", "sampling.batch_size=4", "sampling.shard_size=8"]
GPU = ["resources=gpu", "resources.device=cpu", "resources.min_actors=2", "resources.max_actors=2"]


class Host:
    """tests/cluster_host.py: address, head and GPU node ids, `remove(i)`."""

    def __init__(self, gpu_nodes: int = 2):
        self.proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "cluster_host.py"), str(gpu_nodes)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the cluster did not start (exit {self.proc.wait(60)})")
        info = json.loads(line)
        self.address, self.head, self.gpu_nodes = info["address"], info["head"], info["gpu_nodes"]

    def remove(self, i: int) -> None:
        self.proc.stdin.write(f"remove {i}\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == f"removed {i}"

    def add(self, gpus: int) -> int:
        """A node with `gpus` GPUs joins (as an autoscaler would launch one); returns its index."""
        self.proc.stdin.write(f"add {gpus}\n")
        self.proc.stdin.flush()
        self.gpu_nodes.append(self.proc.stdout.readline().strip())
        return len(self.gpu_nodes) - 1

    def close(self) -> None:
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            self.proc.wait(120)
        except (BrokenPipeError, subprocess.TimeoutExpired):
            self.proc.kill()


@pytest.fixture(scope="module")
def cluster():
    """One cluster for this module (~20 s to start); the test that removes a node comes last."""
    host = Host()
    try:
        yield host
    finally:
        host.close()


def memex(stage: str, *overrides: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "memex"), stage, *overrides], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)


def s3_overrides(s3_server: dict, bucket: str) -> list[str]:
    url = s3_server["client_kwargs"]["endpoint_url"]
    return ["storage=s3", f"storage.root=s3://{bucket}/runs", "+storage.options.key=testing",
            "+storage.options.secret=testing", f"storage.options.client_kwargs.endpoint_url={url}"]


def markers(fs, folder: str) -> list[dict]:
    """The stage's unit markers (not the `_tmp-` file a node lost mid-write may leave: readers skip it)."""
    return [json.loads(fs.cat(p)) for p in sorted(fs.glob(f"{folder}/_markers/shard-*.json"))]


def test_gpu_actors_land_on_gpu_nodes_and_audit_completes_on_s3(cluster, s3_server, bucket):
    import s3fs

    r = memex("audit", f"resources.address={cluster.address}", *GPU, *SMALL, *s3_overrides(s3_server, bucket),
              "prompts.limit=4", "sampling.samples_per_prompt=4", "filter.min_clique=4", "index.shards=2",
              "triage=none", "run.name=on-cluster")  # triage=none: one actor pool less, ~35 s
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    fs = s3fs.S3FileSystem(**s3_server)
    run = f"{bucket}/runs/on-cluster"
    summary = json.loads(fs.cat(f"{run}/summary.json"))
    assert f"s3://{run}/report/index.html" in r.stdout  # where the report is, as the console says
    assert fs.exists(f"{run}/report/index.html")

    # every generation unit ran on a GPU node, none on the head (triage's pool is the same code: runner.run_actor_pool)
    nodes = {m["node_id"] for m in markers(fs, f"{run}/samples")}
    assert nodes and nodes <= set(cluster.gpu_nodes), (nodes, cluster.gpu_nodes)
    assert cluster.head not in nodes

    samples = pds.dataset(f"{run}/samples", filesystem=fs, format="parquet").to_table(columns=["sample_id"])
    ids = samples["sample_id"].to_pylist()
    assert len(ids) == len(set(ids)) == summary["samples"] == 4 * 4
    assert summary["candidates_verified"] == 4 * 4  # every generation matched against the S3 run's index


def test_local_storage_is_refused_on_a_cluster_unless_a_shared_mount(cluster, tmp_path):
    common = [f"resources.address={cluster.address}", *GPU, "run.name=local", "sampling.samples_per_prompt=2",
              "sampling.num_inference_steps=4", "sampling.batch_size=2", "sampling.shard_size=2"]
    r = memex("generate", f"storage.root={tmp_path}", *common)
    assert r.returncode != 0
    err = r.stdout + r.stderr
    assert f"storage.root={tmp_path} is a local path, but Ray has 3 nodes" in err, err[-3000:]
    assert "storage.shared_mount=true" in err
    assert not (tmp_path / "local" / "samples").exists()  # refused before any unit ran
    # the same root with storage.shared_mount=true runs: the lost-node test below


def _generate_until_it_waits(overrides: list[str]) -> tuple[subprocess.Popen, str]:
    """`memex generate` started in the background, read until it says it waits for a node (the
    placement group an autoscaler answers); returns the process and that line."""
    proc = subprocess.Popen([str(BIN / "memex"), "generate", *overrides, "resources.start_timeout_s=300"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    waiting = proc.stderr.readline()
    while waiting and "waiting up to 300s (resources.start_timeout_s)" not in waiting:
        waiting = proc.stderr.readline()
    assert waiting, proc.communicate(timeout=60)
    return proc, waiting


def test_a_worker_no_node_fits_waits_until_a_node_joins_and_that_node_takes_the_work(cluster, tmp_path):
    """resources.num_gpus=2: no node of this cluster has two GPUs. Ray would wait for one forever,
    silently; memex says on the console that it waits (its placement group is the demand an
    autoscaler answers) and goes on when a node that fits joins, which then takes every unit.
    Refused when none joins in time: tests/test_runner.py (the same check, in process)."""
    import fsspec

    common = [f"resources.address={cluster.address}", *GPU, "resources.num_gpus=2", "resources.min_actors=1",
              "resources.max_actors=1", "run.name=two-gpus", "sampling.samples_per_prompt=2",
              "sampling.num_inference_steps=4", "sampling.batch_size=2", "sampling.shard_size=2",
              f"storage.root={tmp_path}", "storage.shared_mount=true"]
    fs = fsspec.filesystem("file")
    proc, waiting = _generate_until_it_waits(common)
    assert ("resources.num_gpus=2 asks for 2 GPUs per worker, and no node of the Ray cluster has that (the largest: "
            "2 CPUs, 1 GPU) yet") in waiting, waiting
    assert not (tmp_path / "two-gpus" / "samples" / "_markers").exists()
    new = cluster.add(2)
    try:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        nodes = {m["node_id"] for m in markers(fs, str(tmp_path / "two-gpus" / "samples"))}
        assert nodes == {cluster.gpu_nodes[new]}  # the node that joined ran every unit
    finally:
        cluster.remove(new)  # the lost-node test below counts on the module's two GPU nodes


def test_a_local_root_is_refused_when_the_first_gpu_node_joins(tmp_path):
    """cluster.yaml's min_workers: 0: when the job starts only the head is alive, so a local
    storage.root passed the one-node check, the autoscaler then added a GPU worker, and the units wrote
    to that worker's own disk (the driver found no markers: "units did not complete", on every rerun).
    The check runs again when a node joins during the wait: refused before any unit runs."""
    host = Host(gpu_nodes=0)  # a head alone, as a cluster.yaml cluster between jobs
    try:
        common = [f"resources.address={host.address}", *GPU, "resources.min_actors=1", "resources.max_actors=1",
                  "run.name=auto", "sampling.samples_per_prompt=2", "sampling.num_inference_steps=4",
                  "sampling.batch_size=2", "sampling.shard_size=2", f"storage.root={tmp_path}"]
        proc, _ = _generate_until_it_waits(common)
        host.add(1)  # the autoscaler's first GPU worker
        _, err = proc.communicate(timeout=300)
        assert proc.returncode != 0 and f"storage.root={tmp_path} is a local path, but Ray has 2 nodes" in err, \
            err[-3000:]
        assert not (tmp_path / "auto" / "samples" / "_markers").exists()
    finally:
        host.close()


def test_a_gpu_node_lost_mid_generation_leaves_every_sample_once(cluster, tmp_path):
    """Remove one of the two GPU nodes once 2 shards are written: its actor dies with the unit it
    held; Ray Data retries that unit on the surviving actor, and the unit's atomic write and
    marker make the retry the only copy. The storage root is local with storage.shared_mount=true:
    all three nodes are processes on this machine, so the path really is shared, and the flag lets
    the run go ahead (the test above: refused without it). Object storage on this cluster: the first test."""
    import fsspec

    fs = fsspec.filesystem("file")
    root = tmp_path / "runs"
    folder = str(root / "lost-node" / "samples")
    per_prompt, shard = 16, 4  # the demo's prompts x 4 units of one batch each
    proc = subprocess.Popen([str(BIN / "memex"), "generate", f"resources.address={cluster.address}", *GPU,
                             f"storage.root={root}", "storage.shared_mount=true", "run.name=lost-node",
                             "sampling.num_inference_steps=10",
                             f"sampling.samples_per_prompt={per_prompt}", f"sampling.batch_size={shard}",
                             f"sampling.shard_size={shard}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and len(fs.glob(f"{folder}/_markers/shard-*.json")) < 2:
        time.sleep(0.5)
        fs.invalidate_cache()
    assert proc.poll() is None, "the run ended before a node could be lost:\n" + proc.stdout.read()[-3000:]
    cluster.remove(1)
    marked_at_loss = set(fs.glob(f"{folder}/_markers/shard-*.json"))
    lost_at = len(marked_at_loss)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:]

    fs.invalidate_cache()
    n_prompts = pds.dataset(str(root / "lost-node" / "prompts.parquet"), format="parquet").count_rows()
    ids = pds.dataset(folder, format="parquet").to_table(columns=["sample_id"])["sample_id"].to_pylist()
    assert len(ids) == len(set(ids)) == n_prompts * per_prompt
    done = markers(fs, folder)
    assert len(done) == n_prompts * per_prompt // shard
    assert lost_at < len(done)  # units were still to do when the node went
    # the head ran nothing, and every unit marked after the loss ran on the surviving GPU node (at most one
    # from the lost node: a worker that was writing its marker as the node went)
    assert {m["node_id"] for m in done} <= set(cluster.gpu_nodes[:2])
    fs.invalidate_cache()
    after = [json.loads(fs.cat(p))["node_id"] for p in sorted(fs.glob(f"{folder}/_markers/shard-*.json"))
             if p not in marked_at_loss]
    assert after and after.count(cluster.gpu_nodes[1]) <= 1, after
    assert after.count(cluster.gpu_nodes[0]) >= max(1, len(after) - 1)
