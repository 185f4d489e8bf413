"""Where the deployments go on N identical nodes: the overrides of serve_config.yaml for one
GPU box, for a Modal cluster and for a KubeRay worker group, and the batch command's placement
options for the same nodes (a KubeRay RayJob), written once.

The arithmetic (benchmarks/RESULTS.md): the model needs well under a GPU-second per song, the
MP3 encoder ~15-20 CPU-seconds. So a GPU node gets one Separate replica per GPU (with one CPU
each for its batch loop), one Decode replica, and one Encode replica that takes every CPU left:
Encode's CPUs, not the GPUs, bound MP3 throughput.
"""
import typing as tp
from dataclasses import dataclass

# CPUs a node keeps for Ingress, Decode, the Serve proxy and controller, and Ray itself
RESERVED_CPUS = 2


@dataclass(frozen=True)
class NodeShape:
    """What each of `nodes` identical nodes offers: `gpus` GPUs (0: a CPU-only node) and
    `cpus` CPUs (what Ray sees: the container's or pod's CPU request)."""
    gpus: int
    cpus: int
    nodes: int = 1

    def __post_init__(self):
        if self.nodes < 1 or self.gpus < 0 or self.cpus < 1:
            raise ValueError(f"a cluster needs nodes >= 1, gpus >= 0, cpus >= 1: {self}")

    @property
    def encode_cpus(self) -> int:
        """CPUs of each node's Encode replica: what Separate (one per GPU) and the reserved
        share leave, at least one."""
        return max(1, self.cpus - self.gpus - RESERVED_CPUS)


def deployment_overrides(shape: NodeShape, max_batch_size: int = 16,
                         batch_wait_timeout_s: float = 0.01) -> tp.Dict[str, dict]:
    """Per-deployment overrides of serve_config.yaml (`launch.write_config(deployments=...)`)
    for `shape`: one Separate replica per GPU (CPU nodes: one per node, as the file says), one
    Decode and one Encode replica per node, spread one per node."""
    per_node = {"max_replicas_per_node": 1} if shape.nodes > 1 else {}
    codec = {"num_replicas": shape.nodes, **per_node}
    if not shape.gpus:
        return {"Separate": {"num_replicas": shape.nodes, **per_node,
                             "ray_actor_options": {"num_gpus": 0, "num_cpus": 0.5}},
                "Decode": codec, "Encode": codec}
    return {"Separate": {"num_replicas": shape.nodes * shape.gpus,
                         **({"max_replicas_per_node": shape.gpus} if shape.nodes > 1 else {}),
                         "ray_actor_options": {"num_gpus": 1, "num_cpus": 1},
                         "user_config": {"max_batch_size": max_batch_size,
                                         "batch_wait_timeout_s": batch_wait_timeout_s}},
            "Decode": codec,
            "Encode": {**codec, "ray_actor_options": {"num_cpus": shape.encode_cpus}}}


def application_args(shape: NodeShape, max_batch_size: int = 16) -> dict:
    """The `args` that go with `deployment_overrides`: on GPUs Encode runs one thread per CPU
    it was given and one song may queue a whole batch of windows; more than one node is a real
    cluster (Ray on the nodes' addresses)."""
    cluster = {"cluster": shape.nodes > 1}
    if not shape.gpus:  # serve_config.yaml's CPU settings as they are
        return cluster
    return {"encode_threads": 0, "windows_in_flight": max_batch_size, **cluster}


def batch_arguments(shape: NodeShape) -> tp.List[str]:
    """`python -m serve_graph batch`'s options for `shape`, by the service's rules: one model
    actor per GPU (CPU nodes: one per node), each with as many encoding threads as its share
    of the CPUs Encode would have; decoding takes the CPUs (Ray Data's tasks, every node)."""
    actors = shape.nodes * max(shape.gpus, 1)
    threads = max(1, shape.encode_cpus // max(shape.gpus, 1))
    return ["--device", "cuda" if shape.gpus else "cpu", "--actors", str(actors),
            "--encode-threads", str(threads)]
