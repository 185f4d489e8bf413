"""The Modal definition, checked offline with the real `modal` package: no credentials, no
deploy. Values are read from the app's own objects (the function and image loaders)."""
import io
import json
import os
import subprocess
import sys
import zipfile

import pytest
import requests

from audio_files import encode, tone
from serve_process import ROOT, ServeProcess, free_port

INSPECT = r"""
import json, warnings, modal
warnings.simplefilter("ignore")  # App.registered_* is deprecated for modal 1.7 (pinned < 1.7)
from modal._utils.async_utils import synchronizer
import modal_deploy.app as deployed

def closure(obj):
    load = synchronizer._translate_in(obj)._load
    return dict(zip(load.__code__.co_freevars, (c.cell_contents for c in load.__closure__)))

function = closure(deployed.app.registered_functions["Separation.*"])
layers, image = [], function["image"]
while image is not None:
    spec = closure(image)
    build = spec.get("build_function")
    layers.append({
        "commands": (spec["dockerfile_function"]("2025.06").commands
                     if spec.get("dockerfile_function") else []),
        "build_function": synchronizer._translate_in(build)._raw_f.__qualname__ if build else None})
    bases = list(spec.get("base_images", {}).values()) or [spec.get("base_image")]
    image = bases[0]  # a mount layer names its parent base_image
cluster = None
if "SeparationCluster" in deployed.app.registered_functions:
    server = closure(deployed.app.registered_functions["SeparationCluster"])
    cluster = {key: server[key] for key in ("gpu", "cpu", "cluster_size", "min_containers",
                                            "max_containers", "is_server", "i6pn_enabled")}
    cluster["port"] = server["http_config"].port
    cluster["enter"] = [name for name, value in vars(server["info"].user_cls).items()
                        if type(value).__name__ == "PartialFunction"
                        and synchronizer._translate_in(value).flags & 4]  # ENTER_POST_SNAPSHOT
print(json.dumps({
    "gpu": function["gpu"], "cpu": function["cpu"], "timeout": function["timeout"],
    "cluster": cluster,
    "scaledown_window": function["scaledown_window"], "min_containers": function["min_containers"],
    "buffer_containers": function["buffer_containers"],
    "entrypoints": sorted(deployed.app.registered_entrypoints),
    "web_methods": sorted(function["method_definitions"]),
    "secrets": [repr(secret) for secret in function["secrets"]],
    "layers": layers[::-1]}))
"""


def without_credentials(**env) -> dict:
    """This environment without Modal's or the app's settings (`env` added): no credentials,
    the app's defaults."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MODAL_", "SEPARATION_"))}
    return {**clean, "MODAL_CONFIG_PATH": os.devnull, **env}


def inspect_app(**env) -> dict:
    """Import modal_deploy.app in a fresh interpreter without credentials and read its objects."""
    proc = subprocess.run([sys.executable, "-c", INSPECT], cwd=ROOT,
                          env=without_credentials(**env),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_defaults_read_from_the_app():
    spec = inspect_app()
    assert spec["gpu"] == "B200" and spec["cpu"] == 16
    assert spec["timeout"] == 600 and spec["scaledown_window"] == 60
    assert spec["cluster"] is None  # cluster mode only when asked for
    assert spec["min_containers"] == 0 and not spec["buffer_containers"]
    assert spec["entrypoints"] == ["main"]
    assert "web" in spec["web_methods"]


def test_environment_changes_the_endpoint():
    spec = inspect_app(SEPARATION_GPU="H100", SEPARATION_TIMEOUT="900",
                       SEPARATION_SCALEDOWN_WINDOW="120", SEPARATION_MIN_CONTAINERS="1",
                       SEPARATION_BUFFER_CONTAINERS="2")
    assert spec["gpu"] == "H100"
    assert spec["timeout"] == 900 and spec["scaledown_window"] == 120
    assert spec["min_containers"] == 1 and spec["buffer_containers"] == 2


def test_cluster_mode_follows_modal_cluster_rules():
    """Each clustered container takes every GPU of its host, the cluster is a Server (HTTP to
    rank 0; clustered web functions are not supported) and container counts are multiples of
    the size."""
    spec = inspect_app(SEPARATION_CLUSTER_SIZE="4", SEPARATION_CLUSTER_MAX_CONTAINERS="8")
    cluster = spec["cluster"]
    assert cluster["gpu"] == "B200:8" and cluster["cpu"] == 64
    assert cluster["cluster_size"] == 4 and cluster["is_server"] and cluster["i6pn_enabled"]
    assert cluster["min_containers"] == 0 and cluster["max_containers"] == 8
    assert cluster["port"] == 8000 and cluster["enter"] == ["start"]
    assert spec["gpu"] == "B200" and "web" in spec["web_methods"]  # the default endpoint stays
    spec = inspect_app(SEPARATION_CLUSTER_SIZE="2", SEPARATION_CLUSTER_GPU="H100:8",
                       SEPARATION_CLUSTER_CPUS="96")
    assert spec["cluster"]["gpu"] == "H100:8" and spec["cluster"]["cpu"] == 96
    assert spec["cluster"]["max_containers"] == 2


@pytest.mark.parametrize("env, message", [
    ({"SEPARATION_CLUSTER_GPU": "B200"}, "takes every GPU of its host"),
    ({"SEPARATION_CLUSTER_MAX_CONTAINERS": "3"}, "not a multiple of the cluster size 2"),
    ({"SEPARATION_CLUSTER_MIN_CONTAINERS": "1"}, "not a multiple of the cluster size 2")])
def test_cluster_mode_refuses_what_modal_forbids(env, message):
    proc = subprocess.run([sys.executable, "-c", "import modal_deploy.app"], cwd=ROOT,
                          env=without_credentials(SEPARATION_CLUSTER_SIZE="2", **env),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]


def test_cluster_placement_puts_a_separate_replica_on_every_gpu():
    """What rank 0 deploys on 2 nodes of 8 GPUs and 64 CPUs (serve_graph.placement)."""
    from serve_graph.placement import NodeShape, application_args, deployment_overrides
    shape = NodeShape(gpus=8, cpus=64, nodes=2)
    placed = deployment_overrides(shape, max_batch_size=16)
    assert placed["Separate"]["num_replicas"] == 16
    assert placed["Separate"]["max_replicas_per_node"] == 8
    assert placed["Separate"]["ray_actor_options"] == {"num_gpus": 1, "num_cpus": 1}
    for name in ("Decode", "Encode"):
        assert placed[name]["num_replicas"] == 2 and placed[name]["max_replicas_per_node"] == 1
    # per node: 8 CPUs for Separate, 2 kept for Ingress/Decode/Serve/Ray, the rest encodes
    assert placed["Encode"]["ray_actor_options"]["num_cpus"] == 64 - 8 - 2
    assert application_args(shape, 16) == {"encode_threads": 0, "windows_in_flight": 16,
                                           "cluster": True}
    single = deployment_overrides(NodeShape(gpus=1, cpus=16))
    assert "max_replicas_per_node" not in single["Separate"]
    assert single["Encode"]["ray_actor_options"]["num_cpus"] == 13


def test_cluster_nodes_join_the_head_on_their_private_addresses():
    from modal_deploy.app import ray_start_command
    head = ray_start_command(["--head", "--port=6379"], "10.0.0.1", 8, 64)
    worker = ray_start_command(["--address=10.0.0.1:6379"], "10.0.0.2", 8, 64)
    assert head[1:4] == ["-m", "ray.scripts.scripts", "start"] and "--head" in head
    assert "--address=10.0.0.1:6379" in worker and "--node-ip-address=10.0.0.2" in worker
    assert {"--num-gpus=8", "--num-cpus=64"} <= set(worker)
    help_text = subprocess.run(head[:4] + ["--help"], capture_output=True, text=True,
                               timeout=120).stdout
    for flag in ("--node-ip-address", "--num-gpus", "--num-cpus", "--disable-usage-stats",
                 "--address", "--port"):
        assert flag in help_text, flag


def test_api_keys_come_from_a_modal_secret():
    assert inspect_app()["secrets"] == []  # open by default
    spec = inspect_app(SEPARATION_API_KEYS_SECRET="stem-separation-api-keys")
    assert spec["secrets"] == ["modal.Secret.from_name('stem-separation-api-keys')"]


def test_image_installs_the_project_from_pyproject_and_bakes_the_weights():
    layers = inspect_app()["layers"]
    commands = [command for layer in layers for command in layer["commands"]]
    uv_sync = [c for c in commands if "uv sync" in c]
    assert uv_sync and "--extra=modal" in uv_sync[0]
    assert "--frozen" in uv_sync[0]  # exactly what uv.lock pins
    assert any("uv.lock" in c and c.startswith("COPY") for c in commands)
    assert any("pyproject.toml" in c and c.startswith("COPY") for c in commands)
    # no second, hand-kept list of the project's dependencies anywhere in the recipe
    for dependency in ("torch", "demucs", "ray", "lameenc", " av"):
        assert not any(dependency in c and "install" in c for c in commands), dependency
    build_steps = [layer["build_function"] for layer in layers if layer["build_function"]]
    assert build_steps == ["download_model"]
    weights_at = next(i for i, layer in enumerate(layers) if layer["build_function"])
    uv_at = next(i for i, layer in enumerate(layers) if any("uv sync" in c for c in
                                                             layer["commands"]))
    assert uv_at < weights_at


def test_download_step_goes_through_the_real_loader(monkeypatch, tiny_repo):
    import modal_deploy.app as deployed
    monkeypatch.setenv("SERVE_GRAPH_MODEL_REPO", str(tiny_repo))
    calls = []
    import serve_graph.engine as engine
    original = engine.load_model
    monkeypatch.setattr(engine, "load_model",
                        lambda name: calls.append(name) or original(name, tiny_repo))
    deployed.download_model()
    assert calls == ["htdemucs"]


@pytest.mark.serve
def test_container_start_up_serves_separate_over_http(tmp_path, tiny_repo):
    """The container's start-up function, run here on CPU with the tiny model."""
    from modal_deploy.app import start_service, wait_ready
    port = free_port()
    server = ServeProcess(
        tmp_path, port, {"SERVE_GRAPH_MODEL_REPO": str(tiny_repo)}, tmp_path / "serve.log",
        start=lambda _, env, **popen: start_service(port=port, gpus=0, env=env, **popen))
    try:
        wait_ready(server._proc, port)
        assert requests.get(server.url + "/readyz", timeout=30).status_code == 200
        assert requests.get(server.url + "/", timeout=30).json()["device"] == "cpu"
        song = encode(tone(1.5, 44100, 2), 44100, "wav16")
        response = requests.post(server.url + "/separate", files={"audio_file": ("a.wav", song)},
                                 data={"two_stems": "bass"}, timeout=300)
        assert response.status_code == 200, response.text
        names = zipfile.ZipFile(io.BytesIO(response.content)).namelist()
        assert names == ["bass.mp3", "no_bass.mp3"]
    finally:
        server.stop()


def test_wait_ready_fails_when_the_service_exits():
    from modal_deploy.app import wait_ready
    exited = subprocess.Popen(["true"])
    exited.wait()
    with pytest.raises(RuntimeError, match="exited with status 0"):
        wait_ready(exited, free_port(), timeout=30)


CLIENT_OPTIONS = r"""
import json, warnings
warnings.simplefilter("ignore")
import modal_deploy.app as deployed
from modal.cli.run import _get_click_command_for_local_entrypoint
command = _get_click_command_for_local_entrypoint(deployed.app,
                                                  deployed.app.registered_entrypoints["main"])
print(json.dumps({p.name: getattr(p.type, "choices", None) for p in command.params}))
"""


def test_client_arguments_are_the_request_fields():
    """`modal run modal_deploy/app.py song.mp3 --format flac ...`: Modal's own CLI built from
    the entrypoint offers every field of SeparationOptions, with its choices."""
    from serve_graph.engine.options import request_fields
    proc = subprocess.run([sys.executable, "-c", CLIENT_OPTIONS], cwd=ROOT, text=True,
                          env=without_credentials(), capture_output=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    options = json.loads(proc.stdout.strip().splitlines()[-1])
    fields = request_fields()
    assert set(options) == {"audio_file"} | {field.name for field in fields}
    for field in fields:
        if field.choices:
            assert options[field.name] == list(field.choices), field.name
