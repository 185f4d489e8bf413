"""A KubeRay `RayService` for the graph: a head group (Ray's GCS, the Serve controller and the
HTTP proxy; no CPUs for replicas) and a GPU worker group, with serve_config.yaml embedded as
`serveConfigV2` and placed on the workers by `serve_graph.placement`. And a `RayJob` for the
batch command on the same cluster shape, its actors placed by the same rules.

    python -m serve_graph kuberay --workers 2 --gpus 8 --cpus 64 --image <registry>/stem-separation:0.1.0
    kubectl apply -f deploy/kuberay/rayservice.yaml      # the shipped one: 2 workers x 8 GPUs
    python -m serve_graph kuberay --job s3://bucket/songs s3://bucket/stems --job-args "--format flac"
    kubectl apply -f deploy/kuberay/rayjob.yaml          # the shipped example of a batch

The image is `deploy/Dockerfile` (Ray's GPU image, this project from uv.lock, weights baked in).
"""
import shlex
import typing as tp
from dataclasses import dataclass
from pathlib import Path

import yaml

from .launch import DEFAULT_CONFIG, configured
from .placement import NodeShape, application_args, batch_arguments, deployment_overrides

SHIPPED = Path(__file__).resolve().parents[1] / "deploy" / "kuberay" / "rayservice.yaml"
SHIPPED_JOB = SHIPPED.with_name("rayjob.yaml")
# the shipped RayJob's batch: INPUT, OUTPUT and options
EXAMPLE_JOB = ("s3://your-bucket/songs", "s3://your-bucket/stems", "--format flac")
JOB_RETRIES = 3  # a failed run is started again; the batch resumes where it stopped
SERVE_PORT = 8000


@dataclass(frozen=True)
class ClusterSpec:
    """The cluster a RayService asks Kubernetes for: `workers` pods of `gpus` GPUs, `cpus`
    CPUs and `memory_gib` memory each, running `image`."""
    name: str = "stem-separation"
    image: str = "stem-separation:0.1.0"  # built from deploy/Dockerfile; push it to your registry
    ray_version: str = "2.60.0"  # of the image: KubeRay starts Ray with it
    workers: int = 2
    gpus: int = 8
    cpus: int = 64
    memory_gib: int = 512
    max_batch_size: int = 16

    @property
    def shape(self) -> NodeShape:
        return NodeShape(gpus=self.gpus, cpus=self.cpus, nodes=self.workers)


def serve_config(spec: ClusterSpec, source: Path = DEFAULT_CONFIG) -> dict:
    """serve_config.yaml placed on the worker group, HTTP on every interface of the head."""
    return configured(source, port=SERVE_PORT, host="0.0.0.0",
                      args=application_args(spec.shape, spec.max_batch_size),
                      deployments=deployment_overrides(spec.shape, spec.max_batch_size))


def _container(name: str, spec: ClusterSpec, resources: dict, ports: tp.List[dict]) -> dict:
    return {"name": name, "image": spec.image,
            "env": [{"name": "RAY_USAGE_STATS_ENABLED", "value": "0"}],
            "resources": {"requests": resources, "limits": resources},
            **({"ports": ports} if ports else {}),
            # the object store lives in /dev/shm: give it the pod's memory, not Docker's 64 MB
            "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]}


SHM_VOLUME = {"name": "dshm", "emptyDir": {"medium": "Memory"}}


def _head_group(spec: ClusterSpec) -> dict:
    ports = [{"containerPort": 6379, "name": "gcs-server"},
             {"containerPort": 8265, "name": "dashboard"},
             {"containerPort": 10001, "name": "client"},
             {"containerPort": SERVE_PORT, "name": "serve"}]
    head = _container("ray-head", spec, {"cpu": "4", "memory": "16Gi"}, ports)
    return {"rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
            "template": {"spec": {"containers": [head], "volumes": [SHM_VOLUME]}}}


def _worker_group(spec: ClusterSpec) -> dict:
    resources = {"cpu": str(spec.cpus), "memory": f"{spec.memory_gib}Gi",
                 "nvidia.com/gpu": str(spec.gpus)}
    worker = _container("ray-worker", spec, resources, [])
    return {"groupName": "gpu", "replicas": spec.workers, "minReplicas": spec.workers,
            "maxReplicas": spec.workers, "rayStartParams": {},
            "template": {"spec": {
                "containers": [worker], "volumes": [SHM_VOLUME],
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                                 "effect": "NoSchedule"}]}}}


def rayservice(spec: ClusterSpec = ClusterSpec(), source: Path = DEFAULT_CONFIG) -> dict:
    """The RayService manifest for `spec`, embedding `source` (serve_config.yaml)."""
    return {"apiVersion": "ray.io/v1", "kind": "RayService",
            "metadata": {"name": spec.name},
            "spec": {"serveConfigV2": yaml.safe_dump(serve_config(spec, source),
                                                     sort_keys=False),
                     "rayClusterConfig": _cluster(spec)}}


def _cluster(spec: ClusterSpec) -> dict:
    """The Ray cluster both manifests ask for: the head group and the GPU worker group."""
    return {"rayVersion": spec.ray_version, "headGroupSpec": _head_group(spec),
            "workerGroupSpecs": [_worker_group(spec)]}


def batch_entrypoint(spec: ClusterSpec, source: str, output: str, job_args: str = "") -> str:
    """The batch command a RayJob runs on the head, placed on the workers by
    `placement.batch_arguments`; `job_args`: more of the batch's options (as typed). Songs
    that fail do not fail the job (the manifest lists them): a retry would only start a
    cluster to skip them."""
    command = ["python", "-m", "serve_graph", "batch", source, output,
               *batch_arguments(spec.shape), "--failed-songs-ok", *shlex.split(job_args)]
    return shlex.join(command)


def rayjob(spec: ClusterSpec, source: str, output: str, job_args: str = "") -> dict:
    """The RayJob manifest: the batch of `source` into `output` on a cluster of `spec`'s
    shape (the RayService's groups), torn down when the job ends; a failed run is retried
    `JOB_RETRIES` times, each resuming the last (the batch is resumable)."""
    return {"apiVersion": "ray.io/v1", "kind": "RayJob",
            "metadata": {"name": f"{spec.name}-batch"},
            "spec": {"entrypoint": batch_entrypoint(spec, source, output, job_args),
                     "shutdownAfterJobFinishes": True, "ttlSecondsAfterFinished": 600,
                     "backoffLimit": JOB_RETRIES, "rayClusterSpec": _cluster(spec)}}


class _ManifestDumper(yaml.SafeDumper):
    """Plain YAML as people write manifests: no anchors, multi-line strings as `|` blocks."""

    def ignore_aliases(self, data) -> bool:
        return True


_ManifestDumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))


def manifest_text(spec: ClusterSpec = ClusterSpec(), source: Path = DEFAULT_CONFIG) -> str:
    header = ("# Generated by `python -m serve_graph kuberay` from serve_config.yaml "
              "(serve_graph/kuberay.py); regenerate rather than edit.\n")
    return header + _dump(rayservice(spec, source))


def job_text(spec: ClusterSpec = ClusterSpec(), job: tp.Sequence[str] = EXAMPLE_JOB) -> str:
    """The RayJob manifest of `job` (INPUT, OUTPUT[, the batch's options]) as YAML."""
    header = ("# Generated by `python -m serve_graph kuberay --job INPUT OUTPUT` "
              "(serve_graph/kuberay.py); regenerate rather than edit.\n"
              "# INPUT and OUTPUT must be storage every pod reads: s3:// needs s3fs in the image "
              "(deploy/Dockerfile: --build-arg FSSPEC=s3fs).\n")
    return header + _dump(rayjob(spec, *job))


def _dump(manifest: dict) -> str:
    return yaml.dump(manifest, Dumper=_ManifestDumper, sort_keys=False, width=100)
