"""Service settings: the `args` of the application in serve_config.yaml, with environment
overrides for the model, so one config serves any model repo."""
import functools
import os
import typing as tp
from dataclasses import dataclass, fields

from .engine.modes import modes_problem
from .engine.options import DEFAULT_MP3_QUALITY, MP3_QUALITIES

MODEL_ENV, REPO_ENV = "SERVE_GRAPH_MODEL", "SERVE_GRAPH_MODEL_REPO"
WEBHOOK_SECRET_ENV = "SERVE_GRAPH_WEBHOOK_SECRET"


@dataclass(frozen=True)
class ServiceSettings:
    model: str = "htdemucs"  # the default: requests that name no model get this one
    # more models a request may name (`model`): loaded on first use, up to
    # MODELS_PER_REPLICA per Separate replica (least recently used unloaded)
    models: tp.Tuple[str, ...] = ()
    model_repo: tp.Optional[str] = None  # local model repo folder; None: Demucs' caches
    device: str = "auto"  # auto: cuda if present, else cpu
    precision: str = "fp32"
    compile: str = "none"  # none | graphs | compile (CUDA graphs and torch.compile, at start)
    max_batch: int = 32  # windows per forward at most; on GPUs lowered to what fits in memory
    gpu_memory_fraction: float = 0.85  # of the free GPU memory, for a replica's batches
    group_norm: str = "fp32"  # fp32 | half: GroupNorm on bf16/fp16 activations (GPU lever)
    cudnn_benchmark: bool = True  # CUDA: cuDNN times its kernels for each window shape
    dconv: str = "torch"  # torch | triton: DConv branch tails as fused Triton kernels (GPU lever)
    max_upload_mb: float = 100.
    max_audio_seconds: float = 900.
    max_windows: int = 600  # model windows per request (duration x shifts / stride): the budget
    api_keys_file: tp.Optional[str] = None  # one key per line; also env SERVE_GRAPH_API_KEYS
    max_concurrent_per_client: int = 0  # separations in flight per key (or address); 0: no limit
    cors_origins: tp.Tuple[str, ...] = ()  # origins allowed to call from a browser; none: no CORS
    threads: int = 0  # torch intra-op threads in Separate; 0: as its CPU settings choose
    # windows of one song queued at Separate at a time: fairness across songs (CPU: 2; GPU:
    # enough to fill a batch, e.g. max_batch_size)
    windows_in_flight: int = 2
    encode_threads: int = 0  # MP3 encoding threads per Encode replica; 0: its num_cpus
    # LAME's quality (0 slowest .. 9 fastest) for requests that leave mp3_quality out
    mp3_quality: int = DEFAULT_MP3_QUALITY
    # helper processes per Decode replica that decode an MP3's later parts while it decodes
    # the first (0: one pass); a part each (1, 2 cores: 0.245 -> 0.19 s for a 216 s song)
    decode_helpers: int = 1
    retry_seconds: float = 60.  # how long a window or song is retried while replicas die
    job_ttl_s: float = 3600.  # how long a finished job's state and result are kept
    # where jobs keep uploads, results and records: a path or an fsspec URL (s3://...); unset:
    # a folder in Ray's session directory (survives a killed replica or store, not a restart)
    job_storage: tp.Optional[str] = None
    max_jobs: int = 100  # jobs queued and running, in all (0: no limit): over it, 429
    max_jobs_per_client: int = 10  # the same per API key (per address without keys)
    max_job_storage_mb: float = 10240.  # uploads and results on the job storage: over it, 507
    jobs_per_replica: int = 2  # jobs an Ingress replica runs at once; the others wait queued
    # bytes of uploads an Ingress replica takes in at once (POST /separate and /jobs being
    # received or separated, by their Content-Length): over it, 429 (0: no limit)
    max_upload_memory_mb: float = 1024.
    # songs by URL (`audio_url`) and job callbacks (`callback_url`) reach public addresses
    # only; these networks too (e.g. 10.0.0.0/8, 127.0.0.1/32): the only way to a private host
    url_allow_networks: tp.Tuple[str, ...] = ()
    url_timeout_s: float = 120.  # a song by URL is downloaded within this, or refused (422)
    # the secret webhooks are signed with (Standard Webhooks: `whsec_<base64>`); also env
    # SERVE_GRAPH_WEBHOOK_SECRET. Jobs created with an API key are signed with a secret
    # derived from that key instead (`webhooks.key_secret`)
    webhook_secret: tp.Optional[str] = None
    webhook_timeout_s: float = 10.  # one delivery attempt
    webhook_retry_s: float = 3600.  # a callback is retried, with backoff, for this long
    # results kept on this node's disk and answered again for the same audio bytes, model and
    # options (`X-Cache: hit`), least recently used evicted past this size; 0: no cache
    result_cache_mb: float = 2048.
    result_cache_dir: tp.Optional[str] = None  # None: a folder in Ray's session directory
    result_cache_shared: bool = False  # true: one key's cached result answers another key
    # a result is answered from the cache and kept on disk at most this long after it was
    # made (hits do not extend it); 0: no limit but `result_cache_mb`
    result_cache_ttl_s: float = 86400.
    # A missing model stops a local `serve run` at start with one clear message; false: the
    # service starts anyway and reports the model missing at GET / and /readyz (as on a cluster)
    require_model: bool = True
    # false: a local start keeps Ray's own ports (GCS, raylet, workers, dashboard) on 127.0.0.1;
    # true: Ray listens on the node's address so that other nodes can join (a real cluster)
    cluster: bool = False

    def __post_init__(self):
        from .webhooks import secret_bytes
        self.allowed_networks  # noqa: B018 - ValueError naming a malformed network
        if self.webhook_secret is not None:
            secret_bytes(self.webhook_secret)
        if not MP3_QUALITIES[0] <= self.mp3_quality <= MP3_QUALITIES[1]:
            raise ValueError(f"mp3_quality must be in {MP3_QUALITIES[0]}..{MP3_QUALITIES[1]}, "
                             f"got {self.mp3_quality}")
        problem = modes_problem(self.precision, self.compile, self.group_norm, self.dconv)
        if problem is not None:  # where the model runs is the replicas' (`preflight` checks it)
            raise ValueError(problem)
        if not isinstance(self.cudnn_benchmark, bool):  # YAML's true/false, not "yes"
            raise ValueError(f"cudnn_benchmark must be true or false, got "
                             f"{self.cudnn_benchmark!r}")

    @classmethod
    def from_args(cls, args: tp.Optional[dict] = None) -> "ServiceSettings":
        """From the application's `args`, the environment filling what they leave unset."""
        args = dict(args or {})
        unknown = set(args) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown application args: {sorted(unknown)}")
        if os.environ.get(MODEL_ENV) and "model" not in args:
            args["model"] = os.environ[MODEL_ENV]
        if os.environ.get(REPO_ENV) and not args.get("model_repo"):
            args["model_repo"] = os.environ[REPO_ENV]
        if os.environ.get(WEBHOOK_SECRET_ENV) and not args.get("webhook_secret"):
            args["webhook_secret"] = os.environ[WEBHOOK_SECRET_ENV]
        for name in ("cors_origins", "models", "url_allow_networks"):  # YAML lists
            if name in args:
                args[name] = tuple(args[name] or ())
        return cls(**args)

    @property
    def served_models(self) -> tp.Tuple[str, ...]:
        """The default model first, then the others configured."""
        return tuple(dict.fromkeys((self.model, *self.models)))

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    @property
    def job_limits(self):
        """The `JobLimits` of the job store."""
        from .jobs import JobLimits
        return JobLimits(self.max_jobs, self.max_jobs_per_client,
                         int(self.max_job_storage_mb * 2**20))

    @functools.cached_property
    def allowed_networks(self):
        """`url_allow_networks` parsed (`url_fetch.networks`), once."""
        from .url_fetch import networks
        return networks(self.url_allow_networks)

    @property
    def webhooks(self) -> dict:
        """What the job store needs to deliver callbacks (`webhooks.Sender`)."""
        return {"secret": self.webhook_secret, "timeout_s": self.webhook_timeout_s,
                "retry_s": self.webhook_retry_s, "allow": list(self.url_allow_networks)}

    def runner_options(self):
        """The `RunnerOptions` of the Separate replicas."""
        from .engine.modes import RunnerOptions
        return RunnerOptions(None if self.device == "auto" else self.device, self.precision,
                             self.compile, self.max_batch, self.gpu_memory_fraction,
                             group_norm=self.group_norm, cudnn_benchmark=self.cudnn_benchmark,
                             dconv=self.dconv)
