"""The Ray Serve graph on Modal GPU containers.

    modal deploy modal_deploy/app.py                        # the web endpoint, scale to zero
    modal serve modal_deploy/app.py                         # live reload while developing
    modal run modal_deploy/app.py song.mp3 --two-stems vocals   # writes song_stems.zip beside it
    modal run modal_deploy/app.py::serve_cluster            # optional: several GPU containers, one Ray cluster

Settings come from the environment when this file is imported (deploy time), so nothing needs
editing: SEPARATION_GPU (default B200), SEPARATION_TIMEOUT (600 s), SEPARATION_SCALEDOWN_WINDOW
(60 s), SEPARATION_MIN_CONTAINERS (0: scale to zero), SEPARATION_MAX_CONTAINERS (10),
SEPARATION_MODEL (htdemucs), SEPARATION_MODELS (more models a request may name, comma-separated,
e.g. `htdemucs_ft,htdemucs_6s`; their weights are baked into the image too), SEPARATION_PRECISION (fp32), SEPARATION_MAX_BATCH_SIZE (16),
SEPARATION_CLUSTER_SIZE (2, for serve_cluster), SEPARATION_API_KEYS_SECRET (none: open; else
the name of a Modal Secret holding `SERVE_GRAPH_API_KEYS=key1,key2`, e.g.
`modal secret create stem-separation-api-keys SERVE_GRAPH_API_KEYS=...`; the local entrypoint
then sends `SERVE_GRAPH_API_KEY` from your shell).

The container runs `serve_graph.launch` on the same serve_config.yaml and `build_app` as
`serve run serve_config.yaml` does locally, with the GPU count, precision and batching knobs
filled in.
"""
import os
import subprocess
import tempfile
import time
import typing as tp
from pathlib import Path

import modal

ROOT = Path(__file__).resolve().parents[1]
PORT = 8000
MODEL_HOME = "/models"  # Demucs' weight caches inside the image


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


GPU = _env("SEPARATION_GPU", "B200")
TIMEOUT = int(_env("SEPARATION_TIMEOUT", "600"))
SCALEDOWN_WINDOW = int(_env("SEPARATION_SCALEDOWN_WINDOW", "60"))
MIN_CONTAINERS = int(_env("SEPARATION_MIN_CONTAINERS", "0"))
MAX_CONTAINERS = int(_env("SEPARATION_MAX_CONTAINERS", "10"))
MODEL = _env("SEPARATION_MODEL", "htdemucs")
MODELS = [name for name in _env("SEPARATION_MODELS", "").split(",") if name.strip()]
PRECISION = _env("SEPARATION_PRECISION", "fp32")
MAX_BATCH_SIZE = int(_env("SEPARATION_MAX_BATCH_SIZE", "16"))
CLUSTER_SIZE = int(_env("SEPARATION_CLUSTER_SIZE", "2"))
API_KEYS_SECRET = _env("SEPARATION_API_KEYS_SECRET", "")
# The service reads SERVE_GRAPH_API_KEYS (serve_graph/access.py) from the Secret's environment
SECRETS = [modal.Secret.from_name(API_KEYS_SECRET)] if API_KEYS_SECRET else []


def download_model() -> None:
    """Image build step: fetch the weights of every model served through Demucs' own loader
    into the image's caches, so a cold start reads them from disk."""
    from serve_graph.engine import load_model
    for name in dict.fromkeys([MODEL, *MODELS]):
        load_model(name)


image = (
    modal.Image.debian_slim(python_version="3.11")
    # The project's own pyproject.toml: torch (CUDA 12.8+ wheels on Linux), demucs, ray[serve]...
    .uv_sync(str(ROOT), extras=["modal"], frozen=False)
    .env({"TORCH_HOME": f"{MODEL_HOME}/torch", "HF_HOME": f"{MODEL_HOME}/hf",
          "SERVE_GRAPH_MODEL": MODEL, "RAY_USAGE_STATS_ENABLED": "0"})
    .add_local_python_source("serve_graph", copy=True)
    .run_function(download_model)
    .env({"HF_HUB_OFFLINE": "1"})  # the weights are in the image: no hub round trip at start
    .add_local_file(ROOT / "serve_config.yaml", "/root/serve_config.yaml", copy=True)
    .add_local_python_source("modal_deploy")
)

app = modal.App("stem-separation", image=image)


def gpu_overrides(gpus: int, replicas: int = 1) -> tp.Dict[str, dict]:
    """Deployment overrides for `gpus` GPUs per Separate replica (0: CPU)."""
    if not gpus:  # CPU: serve_config.yaml's CPU shares as they are
        return {"Separate": {"num_replicas": replicas,
                             "ray_actor_options": {"num_gpus": 0, "num_cpus": 0.5}}}
    batching = {"max_batch_size": MAX_BATCH_SIZE, "batch_wait_timeout_s": 0.01}
    # MP3 encoding is the CPU work of a GPU box: Encode gets the cores the others leave
    encode_cpus = max(1, (os.cpu_count() or 4) - 2)
    return {"Separate": {"num_replicas": replicas,
                         "ray_actor_options": {"num_gpus": gpus, "num_cpus": 1},
                         "user_config": batching},
            "Encode": {"ray_actor_options": {"num_cpus": encode_cpus}}}


def start_service(port: int = PORT, gpus: tp.Optional[int] = None, replicas: int = 1,
                  config: Path = ROOT / "serve_config.yaml",
                  env: tp.Optional[dict] = None, **popen) -> subprocess.Popen:
    """What a container runs: serve_config.yaml with this container's GPUs, through the same
    launcher and `build_app` as `serve run serve_config.yaml`. Returns the `serve run` process."""
    from serve_graph.launch import launch, write_config
    if gpus is None:
        import torch
        gpus = 1 if torch.cuda.is_available() else 0
    folder = Path(tempfile.mkdtemp(prefix="serve_config_"))
    path = write_config(folder / "serve_config.yaml", config, port=port, host="0.0.0.0",
                        args={"model": MODEL, "models": MODELS, "precision": PRECISION,
                              "windows_in_flight": MAX_BATCH_SIZE if gpus else 2},
                        deployments=gpu_overrides(gpus, replicas))
    return launch(path, env, **popen)


def wait_ready(process: subprocess.Popen, port: int = PORT, timeout: float = 300.) -> None:
    """Block until the service's `/readyz` answers 200 (the model is loaded), so that Modal
    routes no request to a container that cannot serve it; raise if `serve run` exits first
    (a missing model ends it with its message) or the time runs out."""
    import requests
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the service exited with status {process.returncode} before "
                               f"it was ready; its message is above")
        try:
            if requests.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the service was not ready within {timeout:.0f} s")


@app.cls(gpu=GPU, timeout=TIMEOUT, scaledown_window=SCALEDOWN_WINDOW,
         min_containers=MIN_CONTAINERS, max_containers=MAX_CONTAINERS, secrets=SECRETS)
@modal.concurrent(max_inputs=64)
class Separation:
    """One GPU container: Ray + the Serve graph; Modal routes HTTP to its port."""

    @modal.web_server(PORT, startup_timeout=300)
    def web(self) -> None:
        self.process = start_service()
        wait_ready(self.process)  # readiness: the model is loaded before traffic comes


@app.function(gpu=GPU, timeout=TIMEOUT, secrets=SECRETS)
@modal.clustered(size=CLUSTER_SIZE)
def serve_cluster() -> None:
    """Multi-node mode: CLUSTER_SIZE GPU containers form one Ray cluster; rank 0 runs the Serve
    graph with one Separate replica per container and is reachable through a tunnel."""
    info = modal.experimental.get_cluster_info()
    head = info.container_ips[0]
    if info.rank != 0:
        subprocess.run(["ray", "start", f"--address={head}:6379", "--block"], check=True)
        return
    subprocess.run(["ray", "start", "--head", f"--node-ip-address={head}", "--port=6379"],
                   check=True)
    process = start_service(gpus=1, replicas=len(info.container_ips),
                            env={"RAY_ADDRESS": f"{head}:6379"})
    with modal.forward(PORT) as tunnel:
        print(f"stem separation cluster of {len(info.container_ips)} GPUs at {tunnel.url}")
        process.wait()


def with_option_arguments(entrypoint):
    """`entrypoint(audio_file, **options)` with one typed argument per field of
    `SeparationOptions` (`--two-stems`, `--shifts`, `--format`...), for Modal's CLI; a field
    left out is "" (not sent)."""
    import inspect
    from serve_graph.engine.options import request_fields

    def kind(field):  # choices as a Literal, which Modal's CLI offers as choices
        return tp.Literal[field.choices] if field.choices else field.kind
    audio_file = inspect.Parameter("audio_file", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                   annotation=str)
    options = [inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY,
                                 annotation=kind(field),
                                 default="" if field.default is None else field.default)
               for field in request_fields()]
    entrypoint.__signature__ = inspect.Signature([audio_file, *options])
    # Modal reads the types from the annotations (typing.get_type_hints), not the signature
    entrypoint.__annotations__ = {p.name: p.annotation for p in [audio_file, *options]}
    return entrypoint


@app.local_entrypoint()
@with_option_arguments
def main(audio_file: str, **options) -> None:
    """Send a song to the endpoint as a job (`POST /jobs`: no web request runs past Modal's
    150 s limit, however long the song or the queue), follow its progress and write
    `<song>_stems.zip` beside it."""
    song = Path(audio_file)
    url = Separation().web.get_web_url()
    fields = {name: str(value).lower() if isinstance(value, bool) else value
              for name, value in options.items() if value != ""}
    start = time.perf_counter()
    key = os.environ.get("SERVE_GRAPH_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    archive = run_job(url, song, fields, headers)
    output = song.with_name(song.stem + "_stems.zip")
    output.write_bytes(archive)
    print(f"wrote {output} in {time.perf_counter() - start:.1f} s")


def run_job(url: str, song: Path, fields: dict, headers: dict, poll: float = 1.) -> bytes:
    """Submit `song` as a job, print its progress until it ends, return its ZIP."""
    import requests
    with song.open("rb") as audio:
        answer = requests.post(f"{url}/jobs", files={"audio_file": (song.name, audio)},
                               data=fields, headers=headers, timeout=120)
    if answer.status_code != 202:
        raise SystemExit(f"{answer.status_code}: {answer.text}")
    job = answer.json()
    while job["status"] not in ("done", "failed", "cancelled"):
        time.sleep(poll)
        job = requests.get(url + job["status_url"], headers=headers, timeout=60).json()
        progress = job["progress"]
        print(f"\r{job['stage']}: {progress['windows_done']}/{progress['windows_total'] or '?'}"
              f" windows", end="", flush=True)
    print()
    if job["status"] != "done":
        raise SystemExit(f"job {job['status']}: {job['error']}")
    result = requests.get(url + job["result_url"], headers=headers, timeout=TIMEOUT)
    result.raise_for_status()
    return result.content
