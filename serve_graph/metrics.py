"""The service's own Prometheus metrics, beside Ray Serve's: defined through `ray.util.metrics`,
so that every deployment's replicas report them to their node's Ray metrics agent, which serves
them in Prometheus' text format together with Ray Serve's (`serve_num_http_requests`,
`serve_deployment_processing_latency_ms`, queue lengths...) and Ray's node metrics (CPU, memory,
and GPU utilisation where a GPU is present). `GET /metrics` on the service relays the agent of
the Ingress replica's node; on a multi-node cluster, point Prometheus at every node's agent.

Names as Prometheus shows them: Ray prefixes `ray_` to each.
"""
import functools
import typing as tp
import urllib.request

import ray
from ray.util import metrics

BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64, 128]
STAGE_SECONDS = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]


@functools.lru_cache(maxsize=None)
def _metric(kind: type, name: str, description: str, tags: tp.Tuple[str, ...] = (),
            boundaries: tp.Optional[tp.Tuple[float, ...]] = None):
    """One metric object per process (created in the replica that records it)."""
    if boundaries is not None:
        return kind(name, description, boundaries=list(boundaries), tag_keys=tags)
    return kind(name, description, tag_keys=tags)


def request_done(route: str, method: str, status: int) -> None:
    _metric(metrics.Counter, "serve_graph_requests", "HTTP requests answered, by route "
            "(template), method and status", ("route", "method", "status")).inc(
        1, {"route": route, "method": method, "status": str(status)})


def song_done(model: str, audio_seconds: float, stages: tp.Dict[str, float]) -> None:
    """A separation finished: its audio seconds and each stage's seconds."""
    _metric(metrics.Counter, "serve_graph_audio_seconds", "seconds of audio separated, by "
            "model", ("model",)).inc(audio_seconds, {"model": model})
    histogram = _metric(metrics.Histogram, "serve_graph_stage_seconds", "seconds per stage "
                        "of a separation (decode, windows, overlap_add, encode, finish, zip, "
                        "total)", ("stage",), tuple(STAGE_SECONDS))
    for stage, seconds in stages.items():
        histogram.observe(seconds, {"stage": stage})


def client_audio(client: tp.Optional[str], model: str, audio_seconds: float,
                 answer: str) -> None:
    """A song answered to API key `client` (its id, `jobs.key_id`; None without keys):
    `answer` is "separated" or "cached" (from the result cache). What a client is billed by."""
    _metric(metrics.Counter, "serve_graph_client_audio_seconds", "seconds of audio answered, "
            "by API key id (none without keys), model, and whether separated or cached",
            ("client", "model", "answer")).inc(
        audio_seconds, {"client": client or "none", "model": model, "answer": answer})


def cache_answer(outcome: str) -> None:
    """A separation request looked up in the result cache: "hit" or "miss"."""
    _metric(metrics.Counter, "serve_graph_result_cache", "separation requests answered from "
            "the result cache (hit) or separated (miss)", ("outcome",)).inc(
        1, {"outcome": outcome})


def batch_run(model: str, size: int, seconds: float, fp32_redone: int = 0) -> None:
    """Separate ran one forward pass of `size` windows, `fp32_redone` of them again in fp32
    (their bf16/fp16 stems were not finite)."""
    _metric(metrics.Histogram, "serve_graph_batch_size", "windows per forward pass",
            ("model",), tuple(BATCH_SIZES)).observe(size, {"model": model})
    _metric(metrics.Counter, "serve_graph_windows", "model windows run, by model",
            ("model",)).inc(size, {"model": model})
    _metric(metrics.Counter, "serve_graph_model_seconds", "seconds spent in forward passes, "
            "by model", ("model",)).inc(seconds, {"model": model})
    if fp32_redone:
        _metric(metrics.Counter, "serve_graph_windows_redone_fp32", "windows whose bf16/fp16 "
                "stems were not finite (overflow), run again in fp32, by model",
                ("model",)).inc(fp32_redone, {"model": model})


def windows_waiting(count: int) -> None:
    """Windows an Encode replica has sent to Separate and not yet got back."""
    _metric(metrics.Gauge, "serve_graph_windows_waiting", "windows sent to Separate and not "
            "yet returned, per Encode replica").set(count)


def node_metrics_text(timeout: float = 5.) -> str:
    """The Prometheus text of this node's Ray metrics agent (Ray Serve's metrics, Ray's and
    ours)."""
    node_id = ray.get_runtime_context().get_node_id()
    node = next(n for n in ray.nodes() if n["NodeID"] == node_id)
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    with urllib.request.urlopen(url, timeout=timeout) as answer:
        return answer.read().decode()
