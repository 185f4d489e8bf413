"""The KubeRay RayService manifest, checked offline: against KubeRay's own CRD schema, against
Ray Serve's config schema, and against serve_config.yaml (it must embed the current one). And
the RayJob of the batch command: against KubeRay's RayJob CRD, its entrypoint against the
batch command's own parser.

`data/ray.io_rayservices.v1.schema.json.gz` and `data/ray.io_rayjobs.v1.schema.json.gz` are
the `v1` openAPIV3Schemas of KubeRay's CRDs `ray-operator/config/crd/bases/ray.io_rayservices.yaml`
and `ray.io_rayjobs.yaml` at commit feeaf72f (v1.7.0-rc.0+5), stored as JSON.
"""
import copy
import gzip
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from serve_graph.kuberay import (EXAMPLE_JOB, SHIPPED, SHIPPED_JOB, ClusterSpec, job_text,
                                 manifest_text, rayjob, rayservice, serve_config)

CRD_SCHEMA = Path(__file__).parent / "data" / "ray.io_rayservices.v1.schema.json.gz"
JOB_CRD_SCHEMA = CRD_SCHEMA.with_name("ray.io_rayjobs.v1.schema.json.gz")


def strict(schema):
    """The CRD schema as `kubectl apply --validate=strict` reads it: an object's unknown
    fields are errors (Kubernetes would silently drop them) unless the schema keeps them."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    schema = {key: strict(value) for key, value in schema.items()}
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        schema["additionalProperties"] = False
    return schema


def crd_validator(path: Path) -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(strict(json.loads(gzip.decompress(path.read_bytes()))))


@pytest.fixture(scope="module")
def validator():
    return crd_validator(CRD_SCHEMA)


@pytest.fixture(scope="module")
def job_validator():
    return crd_validator(JOB_CRD_SCHEMA)


def errors(validator, manifest) -> list:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(manifest)]


def test_shipped_manifest_is_generated_from_the_current_config():
    assert SHIPPED.read_text() == manifest_text(), (
        "deploy/kuberay/rayservice.yaml is stale: run "
        "`python -m serve_graph kuberay -o deploy/kuberay/rayservice.yaml`")


def test_manifest_is_valid_against_kuberays_crd(validator):
    assert errors(validator, yaml.safe_load(SHIPPED.read_text())) == []


def test_the_validator_rejects_what_kuberay_would(validator):
    """The check can fail: a misspelt field, a wrong type and a missing required field."""
    manifest = rayservice()
    misspelt = copy.deepcopy(manifest)
    misspelt["spec"]["rayClusterConfig"]["workerGroupSpec"] = \
        misspelt["spec"]["rayClusterConfig"].pop("workerGroupSpecs")
    assert any("workerGroupSpec" in e for e in errors(validator, misspelt))
    wrong_type = copy.deepcopy(manifest)
    wrong_type["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "2"
    assert any("replicas" in e for e in errors(validator, wrong_type))
    no_containers = copy.deepcopy(manifest)
    del no_containers["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"][
        "containers"]
    assert any("containers" in e for e in errors(validator, no_containers))


def test_embedded_serve_config_is_the_shipped_one_placed_on_the_workers():
    from ray.serve.schema import ServeDeploySchema
    from serve_graph.launch import DEFAULT_CONFIG
    from serve_graph.settings import ServiceSettings
    embedded = yaml.safe_load(rayservice()["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(embedded)  # Ray Serve's own check of a config file
    shipped = yaml.safe_load(DEFAULT_CONFIG.read_text())
    application, original = embedded["applications"][0], shipped["applications"][0]
    assert application["import_path"] == original["import_path"]
    assert application["args"]["model"] == original["args"]["model"]
    assert application["args"]["models"] == original["args"]["models"]
    ServiceSettings.from_args(application["args"])  # every arg is one the service knows
    deployments = {d["name"]: d for d in application["deployments"]}
    assert set(deployments) == {d["name"] for d in original["deployments"]}
    spec = ClusterSpec()
    assert deployments["Separate"]["num_replicas"] == spec.workers * spec.gpus
    assert deployments["Separate"]["ray_actor_options"]["num_gpus"] == 1
    assert deployments["Encode"]["num_replicas"] == spec.workers
    assert embedded["http_options"]["host"] == "0.0.0.0"


def test_worker_pods_ask_kubernetes_for_what_the_replicas_need():
    spec = ClusterSpec(workers=3, gpus=4, cpus=48, memory_gib=256)
    manifest = rayservice(spec)
    group = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 3
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits == {"cpu": "48", "memory": "256Gi", "nvidia.com/gpu": "4"}
    embedded = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    placed = {d["name"]: d for d in embedded["applications"][0]["deployments"]}
    per_pod_cpus = (4 * placed["Separate"]["ray_actor_options"]["num_cpus"]
                    + placed["Encode"]["ray_actor_options"]["num_cpus"]
                    + placed["Decode"]["ray_actor_options"]["num_cpus"]
                    + placed["Ingress"]["ray_actor_options"]["num_cpus"])
    assert per_pod_cpus <= 48  # the replicas of one pod fit its CPUs
    head = manifest["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # no replica lands on the head


def test_cli_writes_the_manifest(tmp_path):
    from serve_graph.__main__ import main
    output = tmp_path / "rayservice.yaml"
    assert main(["kuberay", "-o", str(output), "--workers", "4", "--gpus", "8"]) == 0
    manifest = yaml.safe_load(output.read_text())
    embedded = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    separate = next(d for d in embedded["applications"][0]["deployments"]
                    if d["name"] == "Separate")
    assert separate["num_replicas"] == 32
    assert serve_config(ClusterSpec(workers=4)) == embedded


def test_image_ray_lock_and_manifest_agree():
    """The Ray of deploy/Dockerfile's base image is the one uv.lock pins and the manifest's
    rayVersion; the image bakes the weights of every model serve_config.yaml serves."""
    import re
    import tomllib
    from serve_graph.launch import DEFAULT_CONFIG
    root = SHIPPED.parents[2]
    dockerfile = (root / "deploy" / "Dockerfile").read_text()
    base = re.search(r"^FROM rayproject/ray:([\d.]+)-py311-gpu$", dockerfile, re.M)
    lock = tomllib.loads((root / "uv.lock").read_text())
    locked_ray = next(p["version"] for p in lock["package"] if p["name"] == "ray")
    assert base and base.group(1) == locked_ray == ClusterSpec().ray_version
    assert rayservice()["spec"]["rayClusterConfig"]["rayVersion"] == locked_ray
    args = yaml.safe_load(DEFAULT_CONFIG.read_text())["applications"][0]["args"]
    baked = re.search(r'^ARG MODELS="([^"]+)"$', dockerfile, re.M).group(1).split()
    assert baked == [args["model"], *args["models"]]


def test_shipped_rayjob_is_generated_and_valid_against_kuberays_crd(job_validator):
    assert SHIPPED_JOB.read_text() == job_text(), (
        "deploy/kuberay/rayjob.yaml is stale: run `python -m serve_graph kuberay --job "
        f"{EXAMPLE_JOB[0]} {EXAMPLE_JOB[1]} --job-args '{EXAMPLE_JOB[2]}' -o {SHIPPED_JOB}`")
    assert errors(job_validator, yaml.safe_load(SHIPPED_JOB.read_text())) == []
    misspelt = rayjob(ClusterSpec(), "in", "out")
    misspelt["spec"]["shutdownAfterJobFinish"] = misspelt["spec"].pop("shutdownAfterJobFinishes")
    assert any("shutdownAfterJobFinish" in e for e in errors(job_validator, misspelt))


def test_rayjob_runs_the_batch_on_the_rayservices_cluster_placed_by_its_rules():
    """The RayJob's cluster is the RayService's (same head and worker groups); its entrypoint
    is a batch command the CLI's own parser takes, one model actor per GPU, the encoding
    threads of Encode's CPUs shared out, the user's options kept."""
    import shlex

    from serve_graph.__main__ import build_parser
    spec = ClusterSpec(workers=3, gpus=4, cpus=48)
    job = rayjob(spec, "s3://b/in", "s3://b/out", "--format flac --shifts 2")
    cluster = rayservice(spec)["spec"]["rayClusterConfig"]
    assert job["spec"]["rayClusterSpec"] == cluster
    assert job["spec"]["shutdownAfterJobFinishes"] and job["spec"]["backoffLimit"] > 0
    command = shlex.split(job["spec"]["entrypoint"])
    assert command[:3] == ["python", "-m", "serve_graph"]
    args = build_parser().parse_args(command[3:])
    assert (args.command, args.input, args.output) == ("batch", "s3://b/in", "s3://b/out")
    assert (args.device, args.actors, args.encode_threads) == ("cuda", 12, (48 - 4 - 2) // 4)
    assert (args.format, args.shifts, args.failed_songs_ok) == ("flac", 2, True)
