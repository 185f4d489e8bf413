"""The service over real HTTP: `serve run` of serve_config.yaml, real Ray Serve, tiny model."""
import io
import json
import re
import struct
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

import av
import numpy as np
import pytest
import requests
import soundfile
import torch as th

from audio_files import decoded, encode, tone
from bad_inputs import (Sentinels, callback_cases, float_wav, playlists, raw_cases,
                        url_cases)
from bad_inputs import upload_cases as upload_cases_for
from serve_process import UNCACHED, ServeProcess, free_port, listening_addresses
from serve_graph.launch import READY
from serve_graph.procs import descendants
from serve_graph.launch import write_config
from serve_graph.engine import ModelRunner, load_model, separate
from serve_graph.engine.output import prevent_clip

pytestmark = pytest.mark.serve
MAX_UPLOAD_MB, MAX_SECONDS, MAX_WINDOWS = 2, 20, 300
# served beside the default (tiny htdemucs): six sources, a bag of specialists, no weights,
# a BS-RoFormer
OTHER_MODELS = ("tiny6s", "tinyft", "nothere", "tinyroformer")


@pytest.fixture(scope="module")
def service_process(tmp_path_factory, tiny_repo):
    folder = tmp_path_factory.mktemp("service")
    port = free_port()
    config = write_config(
        folder / "serve_config.yaml", port=port, host="127.0.0.1",
        args={"max_upload_mb": MAX_UPLOAD_MB, "max_audio_seconds": MAX_SECONDS,
              "max_windows": MAX_WINDOWS, "models": list(OTHER_MODELS), **UNCACHED},
        deployments={"Separate": {"user_config": {"max_batch_size": 8,
                                                  "batch_wait_timeout_s": 0.05}}})
    # Ray's agents export metrics every second instead of every 10 s (its default), so that
    # test_metrics_move_with_a_request does not wait for an export
    server = ServeProcess(config, port, {"SERVE_GRAPH_MODEL_REPO": str(tiny_repo),
                                         "RAY_metrics_report_interval_ms": "1000"},
                          folder / "serve.log")
    yield server
    server.kill()


@pytest.fixture(scope="module")
def service(service_process):
    return service_process.url


@pytest.fixture(scope="module")
def song_mp3():
    return encode(tone(2.6, 48000, 2, seed=1), 48000, "mp3")


def post(url, data, **fields):
    files = {"audio_file": ("my song.mp3", data)} if data is not None else None
    return requests.post(url + "/separate", files=files,
                         data={k: str(v) for k, v in fields.items()}, timeout=300)


def stems_of(response) -> zipfile.ZipFile:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/zip"
    assert 'filename="my song_stems.zip"' in response.headers["content-disposition"]
    return zipfile.ZipFile(io.BytesIO(response.content))


def test_health(service):
    health = requests.get(service + "/", timeout=30).json()
    assert health["status"] == "ok" and health["model"] == "htdemucs"
    assert health["device"] == "cpu" and health["sample_rate"] == 44100
    assert health["sources"] == ["drums", "bass", "other", "vocals"]
    # chosen on the replica's machine; its memory tunables arrived with its process's start
    cpu = health["cpu_settings"]
    assert cpu["source"] == "auto" and cpu["attention"] == "sdpa" and cpu["omp_wait"] == "passive"
    assert cpu["memory"] == "keep" and cpu["memory_state"] == "kept from the process start"
    assert cpu["memory_in_effect"] and cpu["threads"] >= 1


def test_openapi_describes_every_field(service):
    schema = requests.get(service + "/openapi.json", timeout=30).json()
    body = schema["paths"]["/separate"]["post"]["requestBody"]["content"]
    ref = body["multipart/form-data"]["schema"]["$ref"].rsplit("/", 1)[1]
    properties = schema["components"]["schemas"][ref]["properties"]
    from serve_graph.engine.options import request_fields
    assert set(properties) == {"audio_file", "audio_url"} | {
        field.name for field in request_fields()}
    assert schema["components"]["schemas"][ref]["oneOf"] == [{"required": ["audio_file"]},
                                                             {"required": ["audio_url"]}]
    assert properties["audio_url"]["pattern"] == "^https?://"
    for name, field in properties.items():
        assert field.get("description"), name
    assert properties["shifts"]["maximum"] == 20 and properties["mp3_bitrate"]["minimum"] == 128
    assert properties["format"]["enum"] == ["mp3", "wav", "flac", "m4a", "opus", "stems"]
    assert properties["aac_bitrate"]["maximum"] == 320 and properties["opus_bitrate"]["minimum"] == 32
    assert properties["clip"]["enum"] == ["rescale", "clamp", "none"]
    assert properties["mp3_quality"]["maximum"] == 9 and "vocals" in properties["remix"]["pattern"]
    at_most_one = schema["components"]["schemas"][ref]["not"]["anyOf"]
    assert [set(item["required"]) for item in at_most_one] == [
        {"two_stems", "stems"}, {"two_stems", "remix"}, {"stems", "remix"},
        {"format", "two_stems"}, {"format", "stems"}, {"format", "remix"}]
    assert all(item["properties"]["format"] == {"const": "stems"} for item in at_most_one[3:])
    assert requests.get(service + "/docs", timeout=30).status_code == 200


def test_four_stems_mp3_have_the_input_duration(service, song_mp3):
    archive = stems_of(post(service, song_mp3))
    assert archive.namelist() == ["drums.mp3", "bass.mp3", "other.mp3", "vocals.mp3"]
    length = decoded(song_mp3).shape[1]
    for name in archive.namelist():
        assert abs(decoded(archive.read(name)).shape[1] - length) <= 1152


def test_remix_answers_one_audio_file(service, song_mp3):
    """`remix`: the stems mixed at their gains, answered as the file itself (no ZIP)."""
    response = post(service, song_mp3, remix="vocals=-12,drums=-inf")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "audio/mpeg"
    assert 'filename="my song_remix.mp3"' in response.headers["content-disposition"]
    mixed = decoded(response.content)
    assert abs(mixed.shape[1] - decoded(song_mp3).shape[1]) <= 1152 and mixed.abs().max() > 0


def test_stems_format_answers_one_ni_stems_file(service, song_mp3):
    from serve_graph.engine import ni_stems
    response = post(service, song_mp3, format="stems")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "audio/mp4"
    assert 'filename="my song.stem.mp4"' in response.headers["content-disposition"]
    assert len(av.open(io.BytesIO(response.content)).streams.audio) == 5
    assert ni_stems.stem_box(response.content)["stems"][3]["name"] == "Vocals"
    six = post(service, song_mp3, format="stems", model="tiny6s")
    assert six.status_code == 422 and "four stems" in six.json()["detail"], six.text


def test_two_stems(service, song_mp3):
    archive = stems_of(post(service, song_mp3, two_stems="drums", mp3_bitrate=320))
    assert archive.namelist() == ["drums.mp3", "no_drums.mp3"]


def test_wav_stems_equal_the_engine(service, song_mp3, tiny_model):
    archive = stems_of(post(service, song_mp3, mp3="false", shifts=2, overlap=0.5))
    assert archive.namelist() == ["drums.wav", "bass.wav", "other.wav", "vocals.wav"]
    expected = separate(ModelRunner(tiny_model, "cpu"), decoded(song_mp3), shifts=2,
                        overlap=0.5, seed=0)
    for name, stem in zip(archive.namelist(), expected):
        got = decoded(archive.read(name))
        assert th.allclose(got, prevent_clip(stem), atol=2 / 2**15, rtol=0), name


def test_models_lists_each_model_with_its_state_and_stems(service):
    listing = requests.get(service + "/models", timeout=60).json()
    assert listing["default"] == "htdemucs"
    models = {entry["name"]: entry for entry in listing["models"]}
    assert list(models) == ["htdemucs", *OTHER_MODELS]
    assert models["htdemucs"]["state"] == "loaded" and models["htdemucs"]["default"]
    assert models["tiny6s"]["state"] in ("available", "loaded")
    assert models["tiny6s"]["sources"][-2:] == ["guitar", "piano"]
    assert models["tinyft"]["models_in_bag"] == 4
    assert models["nothere"]["state"] == "missing"
    assert "nothere.yaml" in models["nothere"]["detail"]  # the file it needs
    health = requests.get(service + "/", timeout=60).json()
    assert health["status"] == "ok" and health["models"]["nothere"]["state"] == "missing"
    schema = requests.get(service + "/openapi.json", timeout=30).json()
    body = schema["components"]["schemas"]["Body_separate_separate_post"]
    assert body["properties"]["model"]["enum"] == ["htdemucs", *OTHER_MODELS]


def test_model_chosen_per_request_equals_the_engine(service, song_mp3, tiny_repo):
    """A six-source model through the same service: its six stems, as the engine makes them;
    the default model's requests keep working beside it."""
    response = post(service, song_mp3, model="tiny6s", format="wav", stems="vocals,guitar")
    archive = stems_of(response)
    assert response.headers["x-model"] == "tiny6s"
    assert archive.namelist() == ["vocals.wav", "guitar.wav"]
    runner = ModelRunner(load_model("tiny6s", tiny_repo), "cpu")
    expected = separate(runner, decoded(song_mp3), shifts=1, overlap=0.25, seed=0)
    for name in archive.namelist():
        stem = expected[runner.geometry.sources.index(name[:-4])]
        got = decoded(archive.read(name))
        assert th.allclose(got, prevent_clip(stem), atol=2 / 2**15, rtol=0), name
    assert len(stems_of(post(service, song_mp3, model="tiny6s")).namelist()) == 6
    assert stems_of(post(service, song_mp3)).namelist()[-1] == "vocals.mp3"


def test_a_roformer_per_request_beside_demucs_equals_the_engine(service, song_mp3, tiny_repo):
    """A BS-RoFormer checkpoint (MSST's files) served per request: its target and the
    instrumental, as the engine's MSST windowing makes them, while Demucs requests run beside
    it (each model's windows batched apart)."""
    listing = {entry["name"]: entry for entry in
               requests.get(service + "/models", timeout=60).json()["models"]}
    assert listing["tinyroformer"]["sources"] == ["vocals", "instrumental"]
    assert listing["tinyroformer"]["family"] == "roformer"
    with ThreadPoolExecutor(2) as pool:
        roformer = pool.submit(post, service, song_mp3, model="tinyroformer", format="wav")
        demucs = pool.submit(post, service, song_mp3, format="wav")
        response = roformer.result()
        assert stems_of(demucs.result()).namelist()[-1] == "vocals.wav"
    archive = stems_of(response)
    assert archive.namelist() == ["vocals.wav", "instrumental.wav"]
    assert response.headers["x-model"] == "tinyroformer"
    runner = ModelRunner(load_model("tinyroformer", tiny_repo), "cpu")
    expected = separate(runner, decoded(song_mp3), shifts=1, seed=0)
    for name, stem in zip(archive.namelist(), expected):
        got = decoded(archive.read(name))
        assert th.allclose(got, prevent_clip(stem), atol=2 / 2**15, rtol=0), name
    refused = post(service, song_mp3, model="tinyroformer", shifts=2)
    assert refused.status_code == 422 and "RoFormer" in refused.json()["detail"]


def test_stem_subset_of_a_bag_runs_only_its_specialists(service, song_mp3, tiny_repo):
    whole = post(service, song_mp3, model="tinyft", format="wav")
    vocals = post(service, song_mp3, model="tinyft", format="wav", stems="vocals")
    assert stems_of(vocals).namelist() == ["vocals.wav"]
    assert int(vocals.headers["x-windows"]) * 4 == int(whole.headers["x-windows"])
    # equal but for the last bit (batches of other sizes round differently)
    assert th.allclose(decoded(stems_of(vocals).read("vocals.wav")),
                       decoded(stems_of(whole).read("vocals.wav")), atol=2 / 2**15, rtol=0)


@pytest.mark.parametrize("model, status, error, words", [
    ("nothere", 404, "model_missing", "nothere.yaml"),
    ("htdemucs_ft", 422, "invalid_parameter", "tiny6s"),  # not served: the choices named
    ("../models", 422, "invalid_parameter", "model"),
])
def test_unavailable_models_are_refused_with_the_reason(service, song_mp3, model, status,
                                                        error, words):
    response = post(service, song_mp3, model=model)
    assert response.status_code == status, response.text
    assert response.json()["error"] == error and words in response.json()["detail"]


def test_stems_are_those_of_the_model_asked_for(service, song_mp3):
    refused = post(service, song_mp3, stems="guitar")  # htdemucs has no guitar
    assert refused.status_code == 422 and "guitar" in refused.json()["detail"]
    assert stems_of(post(service, song_mp3, model="tiny6s", two_stems="guitar")).namelist() \
        == ["guitar.mp3", "no_guitar.mp3"]


def scrape(url: str) -> dict:
    """`{(metric sample name, sorted labels): value}` from /metrics, Prometheus' text format."""
    from prometheus_client.parser import text_string_to_metric_families
    answer = requests.get(url + "/metrics", timeout=30)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(answer.text)
            for sample in family.samples}


def total(samples: dict, name: str, **labels) -> float:
    return sum(value for (sample, tags), value in samples.items()
               if sample == name and set(labels.items()) <= set(tags))


# what one separation moves on /metrics: {what: (sample name, labels)}
MOVED_BY_A_SEPARATION = {
    "requests": ("ray_serve_graph_requests_total", {"route": "/separate", "status": "200"}),
    "audio": ("ray_serve_graph_audio_seconds_total", {"model": "htdemucs"}),
    "billed": ("ray_serve_graph_client_audio_seconds_total", {"client": "none",
                                                             "answer": "separated"}),
    "windows": ("ray_serve_graph_windows_total", {}),
    "batches": ("ray_serve_graph_batch_size_count", {}),
    "stage": ("ray_serve_graph_stage_seconds_count", {"stage": "total"}),
    "serve": ("ray_serve_num_http_requests_total", {})}


def test_metrics_move_with_a_request(service, song_mp3):
    """Ray Serve's metrics and ours, as Prometheus scrapes them, count a separation (Ray's
    agents export the replicas' metrics every second here: polled)."""
    before = scrape(service)
    seconds = float(post(service, song_mp3).headers["x-audio-seconds"])
    moved = {}
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        after = scrape(service)
        moved = {what: total(after, name, **labels) - total(before, name, **labels)
                 for what, (name, labels) in MOVED_BY_A_SEPARATION.items()}
        if all(value > 0 for value in moved.values()):
            break
        time.sleep(0.5)
    assert all(value > 0 for value in moved.values()), moved
    assert moved["audio"] >= seconds - 1e-3 and moved["billed"] >= seconds - 1e-3


def test_concurrent_songs_share_forward_passes(service):
    songs = [encode(tone(3.0, 44100, 2, seed=s), 44100, "flac") for s in range(4)]
    before = requests.get(service + "/stats", timeout=30).json()
    with ThreadPoolExecutor(len(songs)) as pool:
        responses = list(pool.map(lambda data: post(service, data), songs))
    for response in responses:
        assert len(stems_of(response).namelist()) == 4
    after = requests.get(service + "/stats", timeout=30).json()
    assert after["multi_request_batches"] > before["multi_request_batches"]
    assert after["max_requests_in_batch"] >= 2
    assert max(int(size) for size in after["batch_sizes"]) > 1


@pytest.fixture(scope="module")
def upload_cases(song_mp3):
    return upload_cases_for(song_mp3, MAX_UPLOAD_MB, MAX_SECONDS)


@pytest.mark.parametrize("case", list(upload_cases_for(b"", MAX_UPLOAD_MB, MAX_SECONDS)))
def test_bad_input_gets_4xx_json_and_service_keeps_answering(service, song_mp3, upload_cases,
                                                            case):
    data, fields = upload_cases[case]
    response = post(service, data, **fields)
    assert_refused(response, case)
    good = post(service, song_mp3, two_stems="vocals")
    assert stems_of(good).namelist() == ["vocals.mp3", "no_vocals.mp3"]


def assert_refused(response, case):
    """A 4xx with the documented `{"error", "detail"}` body."""
    assert 400 <= response.status_code < 500, (case, response.status_code, response.text)
    body = response.json()
    assert body["error"] and body["detail"], body


@pytest.mark.parametrize("case", list(raw_cases()))
def test_malformed_requests_get_4xx_json(service, song_mp3, case):
    response = requests.post(service + "/separate", timeout=60, **raw_cases()[case])
    assert_refused(response, case)
    assert stems_of(post(service, song_mp3, two_stems="bass")).namelist() == [
        "bass.mp3", "no_bass.mp3"]


@pytest.mark.parametrize("case", list(url_cases()))
def test_songs_by_url_inside_the_network_are_refused(service, case):
    response = requests.post(service + "/separate", data={"audio_url": url_cases()[case]},
                             timeout=60)
    assert_refused(response, case)
    assert response.status_code == 422 and response.json()["error"] == "url_refused", case


@pytest.mark.parametrize("case", list(callback_cases()))
def test_callbacks_inside_the_network_are_refused(service, song_mp3, case):
    response = requests.post(service + "/jobs", files={"audio_file": ("a.mp3", song_mp3)},
                             data={"callback_url": callback_cases()[case]}, timeout=60)
    assert_refused(response, case)
    assert response.status_code == 422 and response.json()["error"] == "url_refused", case


def test_the_result_cache_is_off_with_one_setting(service, song_mp3):
    """This service runs with `result_cache_mb: 0`: the same request runs the model again."""
    before = requests.get(service + "/stats", timeout=30).json()["windows"]
    for _ in range(2):
        answer = post(service, song_mp3, two_stems="bass")
        assert answer.status_code == 200 and "x-cache" not in answer.headers
    assert requests.get(service + "/stats", timeout=30).json()["windows"] >= before + 2


def test_bad_input_corpus_has_sixty_kinds():
    kinds = (len(upload_cases_for(b"", MAX_UPLOAD_MB, MAX_SECONDS)) + len(raw_cases()) +
             len(playlists("/x", 1)) + len(url_cases()) + len(callback_cases()))
    assert kinds >= 60, kinds


def test_playlists_never_make_ffmpeg_open_files_or_connections(service, song_mp3, tmp_path):
    """HLS, ffconcat, M3U and SDP files naming a local file (a FIFO: opening it for reading is
    seen by a writer blocked on it) and a listening socket: each is refused, and neither the file
    nor the socket is ever opened."""
    opened = Sentinels(tmp_path / "sentinel.wav")
    try:
        for name, text in playlists(str(opened.fifo), opened.port).items():
            assert_refused(post(service, text.encode()), name)
        assert stems_of(post(service, song_mp3, two_stems="drums"))
    finally:
        hits = opened.close()
    assert hits == [], hits


def test_ray_listens_on_loopback_only(service_process):
    """Started locally (`cluster: false`), none of Ray's ports (GCS, raylet, workers,
    dashboard, Serve's proxy) is reachable from another machine."""
    pids = [service_process.pid] + descendants(service_process.pid)
    found = listening_addresses(pids)
    assert len({port for _, _, port in found}) >= 5, found  # GCS, raylets, workers, HTTP...
    exposed = [entry for entry in found if entry[1] not in ("127.0.0.1", "::1")]
    assert not exposed, exposed


@pytest.fixture(scope="module")
def loud_song():
    """A float WAV whose stems (from the tiny model) go well past full scale, so that the clip
    modes give different files."""
    return float_wav(80 * tone(2.6, 44100, 2, seed=1).T)


@pytest.fixture(scope="module")
def engine_stems(loud_song, tiny_model):
    """What the engine makes of `loud_song` at shifts=2, overlap=0.5: `{source: [C, T]}`,
    before any clip handling."""
    stems = separate(ModelRunner(tiny_model, "cpu"), decoded(loud_song), shifts=2, overlap=0.5,
                     seed=0)
    assert max(float(stem.abs().max()) for stem in stems) > 1.2  # the clip modes differ
    return dict(zip(["drums", "bass", "other", "vocals"], stems))


@pytest.mark.parametrize("fields,suffix,tolerance,clip", [
    ({"format": "flac"}, "flac", 2 / 2**15, "rescale"),
    ({"format": "wav", "wav_depth": "int24"}, "wav", 1e-6, "rescale"),  # float32 sums
    ({"format": "wav", "wav_depth": "float32", "clip": "none"}, "wav", 1e-6, "none"),
    ({"format": "wav", "wav_depth": "float32", "clip": "clamp"}, "wav", 1e-6, "clamp"),
    ({"mp3": "false", "stems": "vocals,drums"}, "wav", 2 / 2**15, "rescale"),
], ids=["flac", "wav-int24", "float32-unclipped", "float32-clamped", "subset-legacy-wav"])
def test_formats_clip_modes_and_stem_subsets(service, loud_song, engine_stems, fields, suffix,
                                             tolerance, clip):
    """Each output format and clip mode decodes to the engine's stems handled as Demucs'
    `save_audio` does (`rescale`, `clamp`, `none`); a subset comes in the model's order."""
    archive = stems_of(post(service, loud_song, shifts=2, overlap=0.5, **fields))
    wanted = fields.get("stems", "drums,bass,other,vocals").split(",")
    names = [name for name in engine_stems if name in wanted]
    assert archive.namelist() == [f"{name}.{suffix}" for name in names]
    for name in names:
        got = decoded(archive.read(f"{name}.{suffix}"))
        stem = engine_stems[name]
        expected = {"rescale": prevent_clip(stem), "clamp": stem.clamp(-1, 1), "none": stem}[clip]
        assert th.allclose(got, expected, atol=tolerance, rtol=0), name


@pytest.mark.parametrize("fmt,bitrate_field,kbps", [("m4a", "aac_bitrate", 224),
                                                     ("opus", "opus_bitrate", 128)])
def test_aac_and_opus_stems_over_http(service, loud_song, engine_stems, fmt, bitrate_field,
                                      kbps):
    """`format=m4a|opus`: a ZIP of AAC/Opus stems as long as the song, at the bitrate asked
    for; AAC decodes to the engine's stems (rescaled as Demucs does). Opus is not compared:
    it keeps nothing above 20 kHz, where the tiny random model puts much of its output
    (tests/test_stream.py compares it on a sweep)."""
    archive = stems_of(post(service, loud_song, shifts=2, overlap=0.5, format=fmt,
                            **{bitrate_field: kbps}))
    assert archive.namelist() == [f"{name}.{fmt}" for name in engine_stems]
    for name, stem in engine_stems.items():
        data = archive.read(f"{name}.{fmt}")
        got, expected = decoded(data), prevent_clip(stem)
        assert abs(got.shape[-1] - expected.shape[-1]) <= 2048, name
        length = min(got.shape[-1], expected.shape[-1])
        error = float((got[:, :length] - expected[:, :length]).pow(2).mean().sqrt())
        if fmt == "m4a":
            assert error < 0.2 * max(float(expected.pow(2).mean().sqrt()), 1e-3), (name, error)
        seconds = expected.shape[-1] / 44100
        # a short file (headers weigh) of broadband noise, where libopus' VBR spends more
        assert len(data) * 8 / seconds / 1000 < kbps * 2, name


def test_unknown_route_and_method_answer_json(service):
    missing = requests.get(service + "/nothing-here", timeout=30)
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    wrong = requests.get(service + "/separate", timeout=30)
    assert wrong.status_code == 405 and wrong.json()["error"] == "method_not_allowed"


def test_chunked_upload_is_refused_once_past_the_limit(service):
    """No Content-Length to refuse it by: the service stops reading at the limit and answers
    413 while the client is still sending, instead of spooling the whole body."""
    import select
    import socket
    from urllib.parse import urlparse
    address = urlparse(service)
    boundary = "b0undary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"audio_file\"; "
            f"filename=\"big.wav\"\r\nContent-Type: audio/wav\r\n\r\n").encode()
    sent = 0
    with socket.create_connection((address.hostname, address.port), timeout=60) as sock:
        sock.sendall((f"POST /separate HTTP/1.1\r\nHost: {address.netloc}\r\n"
                      f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                      f"Transfer-Encoding: chunked\r\n\r\n").encode())
        chunk = head + b"\0" * (256 * 1024 - len(head))
        while sent < 200 * 2**20:
            try:
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
            chunk = b"\0" * (256 * 1024)
            if select.select([sock], [], [], 0.005)[0]:  # paced: an answer can come back
                break
        sock.settimeout(30)
        reader = sock.makefile("rb")
        status = reader.readline()
        headers = {}
        for line in iter(reader.readline, b"\r\n"):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        body = reader.read(int(headers["content-length"]))
    assert b" 413 " in status, (status, headers)
    assert json.loads(body)["error"] == "upload_too_large", body
    # what the client got into the socket before the answer (kernel buffers and the proxy's
    # queue hold some): far less than the 200 MB it would have sent if the body were read
    assert sent < 100 * 2**20, f"{sent / 2**20:.0f} MB were sent before the answer"


def store_bytes(url: str) -> int:
    return requests.get(url + "/stats", timeout=30).json()["object_store"]["bytes_used"]


def test_object_store_returns_to_its_baseline_after_songs(service):
    """Nothing keeps a finished song's mix in the object store: Serve's batch loop holds its
    last batch's arguments until the next batch, so Separate releases the mix refs it gets.
    The songs are longer than any other in this module, so a mix held back would show."""
    baseline = store_bytes(service)
    song = encode(tone(15., 44100, 2, seed=4), 44100, "mp3")
    with ThreadPoolExecutor(3) as pool:
        assert all(r.status_code == 200 for r in pool.map(lambda _: post(service, song),
                                                            range(3)))
    mix_bytes = 15 * 44100 * 2 * 4
    deadline = time.monotonic() + 60
    while store_bytes(service) > baseline + mix_bytes // 2 and time.monotonic() < deadline:
        time.sleep(1)
    assert store_bytes(service) <= baseline + mix_bytes // 2


def test_every_replica_logs_when_it_is_ready(service_process):
    """The line the cold-start benchmark times each replica by (`launch.READY`), with the
    replica's age: one per deployment."""
    text = service_process.log_path.read_text(errors="replace")
    for name in ("Ingress", "Decode", "Encode", "Separate"):
        found = re.search(rf"ServeReplica:separation:{name} .*{READY}, ([0-9.]+) s after its "
                          rf"process started", text)
        assert found and 0 < float(found.group(1)) < 300, name
