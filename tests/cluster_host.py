"""A multi-node Ray cluster on this machine (`ray.cluster_utils.Cluster`), owned by its own process
and driven over stdin by tests/test_cluster.py.

Why a process of its own: `Cluster.shutdown` resets the calling process's Ray state (internal kv,
the cached cluster address), which would cut the test session's own driver off its `ray_head`.
Here the cluster is just processes on this machine, as `ray up` makes them on many, and memex
connects to it as any driver does (resources.address).

    python tests/cluster_host.py <gpu nodes>
    -> prints one JSON line: {"address": <GCS address>, "head": <node id>, "gpu_nodes": [<node id>, ...]}
    <- "remove <i>"  removes GPU node i (its raylet, object store and workers die) -> prints "removed <i>"
    <- "add <g>"     adds a node with g GPUs (an autoscaler's launch) -> prints its node id; it is GPU node
                     len(gpu_nodes) from then on
    <- "quit" or EOF shuts everything down

The head declares no GPU and 2 CPUs; each GPU node declares num_gpus=1 (a logical resource: Ray
schedules by it, nothing checks for a device) and 2 CPUs, as cluster.yaml's node types do.
"""

from __future__ import annotations

import json
import sys

from ray.cluster_utils import Cluster

CPUS = 2  # per node: one memex actor (resources.num_cpus=2) or one CPU task at a time
STORE = 200 * 1024**2  # object store per node: units return one summary row each, images never


def main() -> None:
    n_gpu = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": CPUS, "num_gpus": 0, "object_store_memory": STORE})
    gpu_nodes = [cluster.add_node(num_cpus=CPUS, num_gpus=1, object_store_memory=STORE) for _ in range(n_gpu)]
    cluster.wait_for_nodes()
    print(json.dumps({"address": cluster.address, "head": cluster.head_node.node_id,
                      "gpu_nodes": [n.node_id for n in gpu_nodes]}), flush=True)
    try:
        for line in sys.stdin:
            cmd = line.split()
            if cmd[:1] == ["remove"]:
                cluster.remove_node(gpu_nodes[int(cmd[1])], allow_graceful=False)  # a node lost, not drained
                print(f"removed {cmd[1]}", flush=True)
            elif cmd[:1] == ["add"]:
                gpu_nodes.append(cluster.add_node(num_cpus=CPUS, num_gpus=int(cmd[1]), object_store_memory=STORE))
                cluster.wait_for_nodes()
                print(gpu_nodes[-1].node_id, flush=True)
            elif cmd[:1] == ["quit"]:
                break
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
