"""The Ray Serve graph on Modal GPU containers.

    modal deploy modal_deploy/app.py                        # the web endpoint, scale to zero
    modal serve modal_deploy/app.py                         # live reload while developing
    modal run modal_deploy/app.py song.mp3 --two-stems vocals   # writes song_stems.zip beside it
    SEPARATION_CLUSTER_SIZE=2 modal deploy modal_deploy/app.py  # adds cluster mode (below)

Settings come from the environment when this file is imported (deploy time), so nothing needs
editing: SEPARATION_GPU (default B200), SEPARATION_CPUS (16: Encode gets all but 3),
SEPARATION_TIMEOUT (600 s), SEPARATION_SCALEDOWN_WINDOW (60 s), SEPARATION_MIN_CONTAINERS
(0: scale to zero), SEPARATION_BUFFER_CONTAINERS (0: idle containers kept beyond those busy),
SEPARATION_MAX_CONTAINERS (10), SEPARATION_MODEL (htdemucs),
SEPARATION_MODELS (more models a request may name, comma-separated, e.g.
`htdemucs_ft,htdemucs_6s`; their weights are baked into the image too), SEPARATION_PRECISION
(fp32), SEPARATION_MAX_BATCH_SIZE (16), SEPARATION_API_KEYS_SECRET (none: open; else the name
of a Modal Secret holding `SERVE_GRAPH_API_KEYS=key1,key2`, e.g.
`modal secret create stem-separation-api-keys SERVE_GRAPH_API_KEYS=...`; the local entrypoint
then sends `SERVE_GRAPH_API_KEY` from your shell).

Cluster mode (`SeparationCluster`, only defined when SEPARATION_CLUSTER_SIZE is set): a
clustered Modal Server of SEPARATION_CLUSTER_SIZE containers, each taking every GPU of its host
(SEPARATION_CLUSTER_GPU, default `<SEPARATION_GPU>:8`) and SEPARATION_CLUSTER_CPUS (64), as one
Ray cluster whose head (rank 0) serves HTTP; SEPARATION_CLUSTER_MIN/MAX_CONTAINERS (0 and the
size) must be multiples of the size.

Every container runs `serve_graph.launch` on the same serve_config.yaml and graph as
`python -m serve_graph serve` does locally (one container: the graph built in the launcher;
the cluster's head: Serve's build task, as on any cluster), placed on its GPUs and CPUs by
`serve_graph.placement`.
"""
import os
import subprocess
import tempfile
import time
import typing as tp
import uuid
from pathlib import Path

import modal

ROOT = Path(__file__).resolve().parents[1]
PORT = 8000
MODEL_HOME = "/models"  # Demucs' weight caches inside the image


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


GPU = _env("SEPARATION_GPU", "B200")
TIMEOUT = int(_env("SEPARATION_TIMEOUT", "600"))
RETRIED_STATUSES = (429, 502, 503, 504)  # the client's calls are made again after these
CHUNK_BYTES = 1 << 20  # read at once from a download
SCALEDOWN_WINDOW = int(_env("SEPARATION_SCALEDOWN_WINDOW", "60"))
MIN_CONTAINERS = int(_env("SEPARATION_MIN_CONTAINERS", "0"))
# idle containers kept beyond those serving (started as load rises, before a request waits on
# a cold start); each is a GPU paid while idle
BUFFER_CONTAINERS = int(_env("SEPARATION_BUFFER_CONTAINERS", "0"))
MAX_CONTAINERS = int(_env("SEPARATION_MAX_CONTAINERS", "10"))
MODEL = _env("SEPARATION_MODEL", "htdemucs")
MODELS = [name for name in _env("SEPARATION_MODELS", "").split(",") if name.strip()]
PRECISION = _env("SEPARATION_PRECISION", "fp32")
MAX_BATCH_SIZE = int(_env("SEPARATION_MAX_BATCH_SIZE", "16"))
CPUS = int(_env("SEPARATION_CPUS", "16"))
RAY_PORT = 6379
# Cluster mode, off unless SEPARATION_CLUSTER_SIZE is set: Modal requires each clustered
# container to take all GPUs of its host, and container counts in multiples of the size
CLUSTER_SIZE = int(_env("SEPARATION_CLUSTER_SIZE", "0"))
CLUSTER_GPU = _env("SEPARATION_CLUSTER_GPU", f"{GPU}:8")
CLUSTER_CPUS = int(_env("SEPARATION_CLUSTER_CPUS", "64"))
CLUSTER_MIN_CONTAINERS = int(_env("SEPARATION_CLUSTER_MIN_CONTAINERS", "0"))
CLUSTER_MAX_CONTAINERS = int(_env("SEPARATION_CLUSTER_MAX_CONTAINERS", str(CLUSTER_SIZE)))
API_KEYS_SECRET = _env("SEPARATION_API_KEYS_SECRET", "")
# The service reads SERVE_GRAPH_API_KEYS (serve_graph/access.py) from the Secret's environment
SECRETS = [modal.Secret.from_name(API_KEYS_SECRET)] if API_KEYS_SECRET else []


def cluster_gpus_per_node(gpu: str) -> int:
    """The GPU count of a clustered container's spec ("B200:8"), which Modal requires to be
    all GPUs of a host: a spec without a count is refused rather than guessed."""
    kind, _, count = gpu.partition(":")
    if not count.isdigit() or int(count) < 1:
        raise ValueError(f"SEPARATION_CLUSTER_GPU={gpu!r}: a clustered container takes every "
                         f"GPU of its host; name them, e.g. {kind}:8")
    return int(count)


def check_cluster_containers(size: int, **counts: int) -> None:
    """Modal counts a cluster's containers one by one: min/max must be multiples of `size`."""
    for name, count in counts.items():
        if count % size:
            raise ValueError(f"SEPARATION_CLUSTER_{name.upper()}={count} is not a multiple of "
                             f"the cluster size {size}")


if CLUSTER_SIZE:
    CLUSTER_GPUS_PER_NODE = cluster_gpus_per_node(CLUSTER_GPU)
    check_cluster_containers(CLUSTER_SIZE, min_containers=CLUSTER_MIN_CONTAINERS,
                             max_containers=CLUSTER_MAX_CONTAINERS)


def download_model() -> None:
    """Image build step: fetch the weights of every model served through Demucs' own loader
    into the image's caches, so a cold start reads them from disk."""
    from serve_graph.engine import load_model
    for name in dict.fromkeys([MODEL, *MODELS]):
        load_model(name)


image = (
    modal.Image.debian_slim(python_version="3.11")
    # The project's own pyproject.toml: torch (CUDA 12.8+ wheels on Linux), demucs, ray[serve]...
    # exactly uv.lock; .pyc written at build: a cold start then compiles none of Ray's,
    # FastAPI's or pydantic's sources, in any of its Ray processes (~1.3 s each)
    .uv_sync(str(ROOT), extras=["modal"], frozen=True, extra_options="--compile-bytecode")
    .env({"TORCH_HOME": f"{MODEL_HOME}/torch", "HF_HOME": f"{MODEL_HOME}/hf",
          "SERVE_GRAPH_MODEL": MODEL, "RAY_USAGE_STATS_ENABLED": "0"})
    .add_local_python_source("serve_graph", copy=True)
    .run_function(download_model)
    .env({"HF_HUB_OFFLINE": "1"})  # the weights are in the image: no hub round trip at start
    .add_local_file(ROOT / "serve_config.yaml", "/root/serve_config.yaml", copy=True)
    .add_local_python_source("modal_deploy")
)

app = modal.App("stem-separation", image=image)


def start_service(port: int = PORT, gpus: tp.Optional[int] = None, cpus: int = CPUS,
                  nodes: int = 1, config: Path = ROOT / "serve_config.yaml",
                  env: tp.Optional[dict] = None, **popen) -> subprocess.Popen:
    """What a container runs: serve_config.yaml placed on `nodes` nodes of `gpus` GPUs
    (default: this container's) and `cpus` CPUs (`serve_graph.placement`), through the same
    launcher and graph as `python -m serve_graph serve`. Returns the launcher's process."""
    from serve_graph.launch import launch, write_config
    from serve_graph.placement import NodeShape, application_args, deployment_overrides
    if gpus is None:
        import torch
        gpus = torch.cuda.device_count()
    shape = NodeShape(gpus=gpus, cpus=cpus, nodes=nodes)
    folder = Path(tempfile.mkdtemp(prefix="serve_config_"))
    path = write_config(folder / "serve_config.yaml", config, port=port, host="0.0.0.0",
                        args={"model": MODEL, "models": MODELS, "precision": PRECISION,
                              **application_args(shape, MAX_BATCH_SIZE)},
                        deployments=deployment_overrides(shape, MAX_BATCH_SIZE))
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
        time.sleep(0.1)  # polled often: the first request waits for it
    raise RuntimeError(f"the service was not ready within {timeout:.0f} s")


@app.cls(gpu=GPU, cpu=CPUS, timeout=TIMEOUT, scaledown_window=SCALEDOWN_WINDOW,
         min_containers=MIN_CONTAINERS, max_containers=MAX_CONTAINERS,
         buffer_containers=BUFFER_CONTAINERS or None, secrets=SECRETS)
@modal.concurrent(max_inputs=64)
class Separation:
    """One GPU container: Ray + the Serve graph; Modal routes HTTP to its port."""

    @modal.web_server(PORT, startup_timeout=300)
    def web(self) -> None:
        self.process = start_service()
        wait_ready(self.process)  # readiness: the model is loaded before traffic comes


def start_cluster_node(rank: int, ips: tp.Sequence[str], gpus: int, cpus: int,
                       timeout: float = 300.) -> tp.Optional[subprocess.Popen]:
    """One node of a cluster of `len(ips)` (rank 0 the head): join Ray; on the head, once
    every node has joined, start the graph placed on all of them and wait until it is ready.
    Returns the head's `serve run` process (None on the other nodes)."""
    head = f"{ips[0]}:{RAY_PORT}"
    role = ["--head", f"--port={RAY_PORT}"] if rank == 0 else [f"--address={head}"]
    subprocess.run(ray_start_command(role, ips[rank], gpus, cpus), check=True)
    if rank != 0:
        return None
    wait_for_nodes(head, len(ips), timeout)
    process = start_service(gpus=gpus, cpus=cpus, nodes=len(ips), env={"RAY_ADDRESS": head})
    wait_ready(process, timeout=timeout)
    return process


def ray_start_command(role: tp.Sequence[str], node_ip: str, gpus: int,
                      cpus: int) -> tp.List[str]:
    """`ray start` for a cluster node on its private address, with its GPUs and CPUs."""
    import sys
    return [sys.executable, "-m", "ray.scripts.scripts", "start", *role,
            f"--node-ip-address={node_ip}", f"--num-gpus={gpus}", f"--num-cpus={cpus}",
            "--disable-usage-stats"]


def wait_for_nodes(address: str, nodes: int, timeout: float) -> None:
    """Block until `nodes` nodes are alive in the Ray cluster at `address`."""
    import ray
    ray.init(address=address, logging_level="warning")
    try:
        deadline = time.monotonic() + timeout
        while (alive := sum(node["Alive"] for node in ray.nodes())) < nodes:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {alive} of {nodes} nodes joined the Ray cluster "
                                   f"within {timeout:.0f} s")
            time.sleep(1)
    finally:
        ray.shutdown()


if CLUSTER_SIZE:
    @app.server(gpu=CLUSTER_GPU, cpu=CLUSTER_CPUS, port=PORT, startup_timeout=600,
                min_containers=CLUSTER_MIN_CONTAINERS, max_containers=CLUSTER_MAX_CONTAINERS,
                scaledown_window=SCALEDOWN_WINDOW, secrets=SECRETS)
    @modal.clustered(size=CLUSTER_SIZE)
    class SeparationCluster:
        """Cluster mode: CLUSTER_SIZE containers, each with all GPUs of its host, form one Ray
        cluster; rank 0 is the head and serves HTTP (Modal routes a Server's requests to rank 0
        only), with one Separate replica per GPU and a Decode and an Encode replica per node."""

        @modal.enter()
        def start(self) -> None:
            cluster = modal.Cluster.from_context()
            self.process = start_cluster_node(cluster.container_rank(),
                                              cluster.container_ips(family="ipv4"),
                                              CLUSTER_GPUS_PER_NODE, CLUSTER_CPUS)


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
    `<song>_stems.zip` beside it (with `--remix`: `<song>_remix.<format>`)."""
    from serve_graph.engine.options import SeparationOptions
    song = Path(audio_file)
    url = SeparationCluster.get_url() if CLUSTER_SIZE else Separation().web.get_web_url()
    fields = {name: str(value).lower() if isinstance(value, bool) else value
              for name, value in options.items() if value != ""}
    start = time.perf_counter()
    key = os.environ.get("SERVE_GRAPH_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    archive = run_job(url, song, fields, headers)
    output = song.with_name(SeparationOptions.parse(**fields).result_name(song.stem))
    output.write_bytes(archive)
    print(f"wrote {output} in {time.perf_counter() - start:.1f} s")


class Transient(Exception):
    """A call's failure that the next attempt may not meet (no answer, a cut transfer, 429,
    502, 503, 504: a container starting or replaced); `wait`: the seconds the answer asked
    for (Retry-After), None for the back-off's."""

    def __init__(self, problem: str, wait: tp.Optional[float] = None):
        super().__init__(problem)
        self.wait = wait


def retried(attempt: tp.Callable[[], tp.Any], attempts: int = 5) -> tp.Any:
    """`attempt()`'s answer, calling it again after each `Transient` failure (after its `wait`,
    else 1, 2, 4... s; at most 30 s), at most `attempts` times; the last failure ends the client
    saying why. Any other failure ends it at once."""
    for number in range(1, attempts + 1):
        try:
            return attempt()
        except Transient as exc:
            problem = str(exc)
            print(f"attempt {number} of {attempts}: {problem}")
            if number < attempts:
                time.sleep(min(exc.wait if exc.wait is not None else 2. ** (number - 1), 30.))
    raise SystemExit(problem)


def answered(answer, expected: int = 200) -> dict:
    """The JSON of `answer` (a `requests.Response`) when its status is `expected`; raises
    `Transient` for a status worth another attempt, else ends the client with the answer."""
    if answer.status_code == expected:
        return answer.json()
    problem = f"{answer.status_code}: {answer.text[:1000]}"
    if answer.status_code in RETRIED_STATUSES:
        raise Transient(problem, retry_after(answer.headers.get("Retry-After")))
    raise SystemExit(problem)


def retry_after(value: tp.Optional[str]) -> tp.Optional[float]:
    """Retry-After's seconds; None when absent or an HTTP date (the back-off's wait then)."""
    try:
        return None if value is None else max(0., float(value))
    except ValueError:
        return None


def submit_job(url: str, song: Path, fields: dict, headers: dict, attempts: int = 5) -> dict:
    """`POST /jobs` of `song` under one `Idempotency-Key`, sent again when its answer is lost
    or is a 429, 502, 503 or 504 (`retried`): a retry gets the job the first attempt made,
    never a second one. The job's view."""
    import requests
    headers = {**headers, "Idempotency-Key": str(uuid.uuid4())}

    def post() -> dict:
        try:
            with song.open("rb") as audio:
                answer = requests.post(f"{url}/jobs", files={"audio_file": (song.name, audio)},
                                       data=fields, headers=headers, timeout=120)
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise Transient(f"no answer: {exc}") from exc
        return answered(answer, 202)
    return retried(post, attempts)


POLL_ATTEMPTS = 8  # of one status poll: ~1.5 min of back-off, a container's replacement


def job_view(url: str, headers: dict) -> dict:
    """`GET` of a job's status URL, asked again through a lost answer or a 502 (`retried`)."""
    import requests

    def get() -> dict:
        try:
            answer = requests.get(url, headers=headers, timeout=60)
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise Transient(f"no answer: {exc}") from exc
        return answered(answer)
    return retried(get, POLL_ATTEMPTS)


def run_job(url: str, song: Path, fields: dict, headers: dict, poll: float = 1.) -> bytes:
    """Submit `song` as a job (`submit_job`), print its progress until it ends, return its
    ZIP."""
    job = submit_job(url, song, fields, headers)
    while job["status"] not in ("done", "failed", "cancelled"):
        time.sleep(poll)
        job = job_view(url + job["status_url"], headers)
        progress = job["progress"]
        print(f"\r{job['stage']}: {progress['windows_done']}/{progress['windows_total'] or '?'}"
              f" windows", end="", flush=True)
    print()
    if job["status"] != "done":
        raise SystemExit(f"job {job['status']}: {job['error']}")
    return download(url + job["result_url"], headers)


def download(url: str, headers: dict, attempts: int = 5) -> bytes:
    """The file at `url`; a transfer cut off is resumed where it stopped (a byte range), one
    answered 429/502/503/504 asked again (`retried`)."""
    import requests
    import urllib3
    data = bytearray()

    def get() -> bytes:
        asked = {**headers, "Range": f"bytes={len(data)}-"} if data else headers
        try:
            with requests.get(url, headers=asked, stream=True, timeout=TIMEOUT) as answer:
                if answer.status_code not in (200, 206):
                    answered(answer)  # raises: Transient (asked again) or SystemExit
                if answer.status_code == 200:
                    data.clear()  # the whole file again
                # each piece as it arrives: what came before a cut is kept
                while chunk := answer.raw.read1(CHUNK_BYTES):
                    data.extend(chunk)
            return bytes(data)
        except (requests.ConnectionError, requests.Timeout,
                urllib3.exceptions.HTTPError) as exc:
            raise Transient(f"download cut off at {len(data)} bytes: {exc}") from exc
    return retried(get, attempts)
