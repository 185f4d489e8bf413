"""Asynchronous jobs over real HTTP: 202 and links, progress by polling and by Server-Sent
Events, the result, cancellation, failures recorded, API keys, expiry, and jobs that survive
the SIGKILL of the Ingress replica running them and of the job store."""
import io
import json
import os
import signal
import time
import typing as tp
import zipfile
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from audio_files import encode, tone
from serve_graph.engine import decode
from serve_graph.procs import actor_pids, alive, replica_pids
from serve_process import tiny_service
from web_servers import LosingProxy

pytestmark = pytest.mark.serve
KEYS = ("key-one", "key-two")
TTL = 12


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_repo):
    folder = tmp_path_factory.mktemp("jobs")
    (folder / "keys").write_text("\n".join(KEYS) + "\n")
    server = tiny_service(folder, tiny_repo, {"max_windows": 100_000, "job_ttl_s": TTL,
                                              "api_keys_file": str(folder / "keys"),
                                              "job_storage": str(folder / "storage")})
    server.storage = folder / "storage"
    yield server
    server.kill()


def auth(key: str = KEYS[0]) -> dict:
    return {"Authorization": f"Bearer {key}"}


def submit(url: str, song: bytes, key: str = KEYS[0], headers: tp.Optional[dict] = None,
           **fields) -> requests.Response:
    return requests.post(url + "/jobs", files={"audio_file": ("song.mp3", song)},
                         data={k: str(v) for k, v in fields.items()},
                         headers={**auth(key), **(headers or {})}, timeout=60)


def job_view(url: str, job_id: str) -> tp.Optional[dict]:
    """The job's view now; None while the HTTP front restarts (or answers other than 200)."""
    try:
        response = requests.get(f"{url}/jobs/{job_id}", headers=auth(), timeout=10)
    except requests.RequestException:
        return None
    return response.json() if response.status_code == 200 else None


FINAL_STATUSES = ("done", "failed", "cancelled")


def wait_for(url: str, job_id: str, statuses=FINAL_STATUSES,
             timeout: float = 240) -> dict:
    """Poll the job until it reaches one of `statuses`, riding out a restarting Ingress."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        view = job_view(url, job_id)
        if view is not None and view["status"] in statuses:
            return view
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not reach {statuses} in {timeout} s")


@pytest.fixture(scope="module")
def song():
    return encode(tone(6.0, 44100, 2, seed=3), 44100, "mp3")


@pytest.fixture(scope="module", autouse=True)
def expiring_job(service, song) -> dict:
    """A job done as the module starts: forgotten TTL s after it ended, which the module's
    last test checks, the others having run in the meantime."""
    return wait_for(service.url, submit(service.url, song).json()["id"])


def test_job_runs_to_a_zip_with_progress(service, song):
    answer = submit(service.url, song, two_stems="vocals")
    assert answer.status_code == 202, answer.text
    job = answer.json()
    assert job["status"] in ("queued", "running") and answer.headers["location"] == \
        job["status_url"] == f"/jobs/{job['id']}"
    done = wait_for(service.url, job["id"])
    assert done["status"] == "done" and done["progress"]["fraction"] == 1.0
    assert done["song"] == "song"  # its file's name, song.mp3, without the extension
    assert done["progress"]["windows_done"] == done["progress"]["windows_total"] > 0
    assert done["eta_seconds"] == 0 and done["expires_at"] > time.time()
    result = requests.get(service.url + done["result_url"], headers=auth(), timeout=60)
    assert result.status_code == 200 and result.headers["content-type"] == "application/zip"
    assert zipfile.ZipFile(io.BytesIO(result.content)).namelist() == ["vocals.mp3",
                                                                      "no_vocals.mp3"]
    assert result.headers["accept-ranges"] == "bytes"
    head, rest = (requests.get(service.url + done["result_url"], timeout=60,
                               headers={**auth(), "Range": value}) for value in
                  ("bytes=0-99", "bytes=100-"))  # a download cut off, then resumed
    assert head.status_code == rest.status_code == 206
    assert head.content + rest.content == result.content
    assert rest.headers["content-range"] == f"bytes 100-{len(result.content) - 1}/" \
                                            f"{len(result.content)}"


def test_a_remix_job_keeps_its_file_type(service, song):
    done = wait_for(service.url, submit(service.url, song, remix="vocals=-inf",
                                        format="wav").json()["id"])
    result = requests.get(service.url + done["result_url"], headers=auth(), timeout=60)
    assert result.status_code == 200 and result.headers["content-type"] == "audio/wav"
    assert 'filename="song_remix.wav"' in result.headers["content-disposition"]
    assert decode(result.content).shape[1] == decode(song).shape[1]
    stems = requests.get(service.url + done["stems_url"], headers=auth(), timeout=30)
    assert stems.status_code == 404 and stems.json()["error"] == "stem_not_found"
    assert "result_url" in stems.json()["detail"]
    # its one file has no stems listing: the job's view signs it, for an <audio> src
    assert requests.get(service.url + done["result_url"], timeout=30).status_code == 401
    signed = requests.get(service.url + done["result_signed_url"], timeout=60)  # no key sent
    assert signed.status_code == 200 and signed.content == result.content
    assert signed.headers["content-type"] == "audio/wav"
    listed = requests.get(service.url + "/jobs?status=done&limit=100", headers=auth(),
                          timeout=30).json()["jobs"]
    mine = next(job for job in listed if job["id"] == done["id"])
    assert requests.get(service.url + mine["result_signed_url"], timeout=60).content == \
        result.content


def test_a_done_job_answers_each_stem_alone_and_byte_ranges_of_it(service, song):
    """`GET /jobs/{id}/stems/{stem}`: one stem read out of the stored ZIP, and the byte ranges
    an `<audio>` element or a download manager asks for (RFC 9110)."""
    done = wait_for(service.url, submit(service.url, song, stems="drums,vocals").json()["id"])
    archive = zipfile.ZipFile(io.BytesIO(requests.get(
        service.url + done["result_url"], headers=auth(), timeout=60).content))
    listing = requests.get(service.url + done["stems_url"], headers=auth(), timeout=30).json()
    assert [(s["name"], s["file"], s["content_type"]) for s in listing["stems"]] == [
        ("drums", "drums.mp3", "audio/mpeg"), ("vocals", "vocals.mp3", "audio/mpeg")]
    for stem in listing["stems"]:
        whole = requests.get(service.url + stem["url"], headers=auth(), timeout=30)
        assert whole.status_code == 200 and whole.content == archive.read(stem["file"])
        assert stem["bytes"] == len(whole.content) > 1000
        assert whole.headers["content-type"] == "audio/mpeg"
        assert whole.headers["accept-ranges"] == "bytes"
        assert whole.headers["content-disposition"] == f'inline; filename="song_{stem["file"]}"'
    vocals, url = archive.read("vocals.mp3"), service.url + listing["stems"][1]["url"]

    def ranged(value: str, **more) -> requests.Response:
        return requests.get(url, headers={**auth(), "Range": value, **more}, timeout=30)

    part = ranged("bytes=100-1099")
    assert part.status_code == 206 and part.content == vocals[100:1100]
    assert part.headers["content-range"] == f"bytes 100-1099/{len(vocals)}"
    assert ranged("bytes=-500").content == vocals[-500:]
    assert ranged(f"bytes={len(vocals) - 10}-{len(vocals) + 99}").content == vocals[-10:]
    beyond = ranged(f"bytes={len(vocals)}-")
    assert beyond.status_code == 416 and beyond.json()["error"] == "range_not_satisfiable"
    assert beyond.headers["content-range"] == f"bytes */{len(vocals)}"
    # If-Range naming another version: the whole stem, as RFC 9110 says
    assert ranged("bytes=0-9", **{"If-Range": '"another"'}).content == vocals
    assert ranged("bytes=0-9", **{"If-Range": part.headers["etag"]}).content == vocals[:10]
    missing = requests.get(service.url + done["stems_url"] + "/bass", headers=auth(), timeout=30)
    assert missing.status_code == 404 and missing.json()["error"] == "stem_not_found"
    assert "drums, vocals" in missing.json()["detail"]
    other_key = requests.get(url, headers=auth(KEYS[1]), timeout=30)
    assert other_key.status_code == 404 and other_key.json()["error"] == "job_not_found"


def test_signed_urls_answer_a_job_s_files_without_the_key(service, song):
    """What a web page sets as an `<audio>` element's src: it cannot send the key."""
    done = wait_for(service.url, submit(service.url, song, stems="drums,vocals").json()["id"])
    listing = requests.get(service.url + done["stems_url"], headers=auth(), timeout=30).json()
    drums, vocals = listing["stems"]
    assert requests.get(service.url + vocals["url"], timeout=30).status_code == 401
    whole = requests.get(service.url + vocals["signed_url"], timeout=30)  # no key sent
    assert whole.status_code == 200 and len(whole.content) == vocals["bytes"]
    part = requests.get(service.url + vocals["signed_url"], headers={"Range": "bytes=10-19"},
                        timeout=30)
    assert part.status_code == 206 and part.content == whole.content[10:20]
    result = requests.get(service.url + listing["result_signed_url"], timeout=60)
    assert result.status_code == 200 and zipfile.ZipFile(io.BytesIO(result.content)).read(
        "vocals.mp3") == whole.content
    # HEAD, as a download manager asks the size first: GET's headers, no body
    for url, size in ((vocals["signed_url"], vocals["bytes"]),
                      (listing["result_signed_url"], len(result.content))):
        head = requests.head(service.url + url, timeout=30)
        assert head.status_code == 200 and head.content == b"", url
        assert int(head.headers["content-length"]) == size
        assert head.headers["accept-ranges"] == "bytes" and head.headers["etag"]
    head = requests.head(service.url + vocals["signed_url"], headers={"Range": "bytes=0-9"},
                         timeout=30)
    assert head.status_code == 206 and head.headers["content-range"] == \
        f"bytes 0-9/{vocals['bytes']}"
    signature = vocals["signed_url"].partition("?")[2]
    for refused in (drums["url"] + "?" + signature,  # another file
                    done["status_url"] + "?" + signature,  # not a file
                    vocals["signed_url"][:-1] + ("1" if signature[-1] != "1" else "2")):
        answer = requests.get(service.url + refused, timeout=30)
        assert answer.status_code == 401 and answer.json()["error"] == "unauthorized", refused


def test_events_stream_the_progress_until_the_end(service, song):
    job = submit(service.url, song, shifts=3, format="wav").json()
    events = []
    with requests.get(service.url + job["events_url"], headers=auth(), stream=True,
                      timeout=240) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        for line in stream.iter_lines(decode_unicode=True):
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: "):]))
    assert events[-1]["status"] == "done" and events[-1]["result_signed_url"]
    assert all(e["result_signed_url"] is None for e in events[:-1])
    separating = [e for e in events if e["stage"] == "separating"]
    assert separating, [e["stage"] for e in events]
    done = [e["progress"]["windows_done"] for e in events]
    assert done == sorted(done) and len(set(done)) > 2  # windows done counted up live
    assert any(e["eta_seconds"] for e in separating)


def test_cancel_stops_the_work(service, song):
    long_song = encode(tone(20.0, 44100, 2, seed=5), 44100, "mp3")
    job = submit(service.url, long_song, shifts=8).json()
    running = wait_for(service.url, job["id"], statuses=("running",), timeout=60)
    while running["progress"]["windows_done"] < 2:
        running = requests.get(service.url + job["status_url"], headers=auth(), timeout=10).json()
        time.sleep(0.2)
    cancelled = requests.delete(service.url + job["status_url"], headers=auth(), timeout=10)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    time.sleep(2)
    windows = requests.get(service.url + "/stats", headers=auth(), timeout=10).json()["windows"]
    time.sleep(2)
    assert requests.get(service.url + "/stats", headers=auth(),
                        timeout=10).json()["windows"] == windows  # no more work for it
    for route in (job["result_url"], job["stems_url"], job["stems_url"] + "/vocals"):
        result = requests.get(service.url + route, headers=auth(), timeout=10)
        assert result.status_code == 409 and result.json()["error"] == "job_not_done", route
        assert result.json()["job_status"] == "cancelled", route


def test_deleting_an_ended_job_forgets_it_and_deletes_its_result_now(service, song):
    """A client's "delete my files": DELETE on a job that has ended forgets it at once, as
    its expiry would (before: a 200 that did nothing, the ZIP kept for job_ttl_s)."""
    done = wait_for(service.url, submit(service.url, song, stems="vocals").json()["id"])

    def stored() -> list:
        return [path.name for kind in ("results", "records")
                for path in (service.storage / kind).iterdir() if done["id"] in path.name]
    assert len(stored()) == 2  # its ZIP and its record
    forgotten = requests.delete(service.url + done["status_url"], headers=auth(), timeout=10)
    assert forgotten.status_code == 200 and forgotten.json()["status"] == "done"
    assert forgotten.json()["expires_at"] <= time.time()
    assert stored() == []
    for route in (done["status_url"], done["result_url"], done["stems_url"]):
        gone = requests.get(service.url + route, headers=auth(), timeout=10)
        assert gone.status_code == 404 and gone.json()["error"] == "job_not_found", route
    again = requests.delete(service.url + done["status_url"], headers=auth(), timeout=10)
    assert again.status_code == 404


def test_bad_request_is_refused_before_a_job_and_bad_audio_fails_the_job(service, song):
    """Bad fields and files that are not audio are refused before the 202; audio that only
    its decoding shows to be broken (a WAV cut in half) fails the job."""
    refused = submit(service.url, song, shifts=99)
    assert refused.status_code == 422 and refused.json()["error"] == "invalid_parameter"
    not_audio = submit(service.url, b"not audio at all" * 100)
    assert not_audio.status_code == 415 and not_audio.json()["error"] == "invalid_audio"
    wav = encode(tone(3.0, 44100, 2, seed=4), 44100, "wav16")
    job = submit(service.url, wav[:len(wav) // 2]).json()
    failed = wait_for(service.url, job["id"])
    assert failed["status"] == "failed"
    assert failed["error"]["status"] == 415 and failed["error"]["error"] == "invalid_audio"


def test_a_job_request_sent_again_under_its_idempotency_key_gets_the_same_job(service,
                                                                               song):
    """A client that lost the 202 (a dropped connection) sends the request again: one job,
    not two, whether the first had ended or was still being taken in."""
    retry = {"Idempotency-Key": f"order-{time.time_ns()}"}
    first, again = (submit(service.url, song, headers=retry, stems="vocals") for _ in "12")
    assert first.status_code == again.status_code == 202, again.text
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    other = submit(service.url, song, headers=retry, stems="drums")  # the key, another request
    assert other.status_code == 422 and other.json()["error"] == "idempotency_key_reused"
    assert first.json()["id"] in other.json()["detail"]
    at_once = {"Idempotency-Key": f"twice-{time.time_ns()}"}
    with ThreadPoolExecutor(2) as pool:
        twins = list(pool.map(lambda _: submit(service.url, song, headers=at_once), "12"))
    assert [twin.status_code for twin in twins] == [202, 202]
    assert twins[0].json()["id"] == twins[1].json()["id"]
    assert sorted(twin.headers.get("idempotent-replayed", "") for twin in twins) == ["", "true"]
    for bad in ("", "x" * 256, "two words", "caf\xe9"):
        refused = submit(service.url, song, headers={"Idempotency-Key": bad})
        assert refused.status_code == 422, bad
        assert refused.json()["error"] == "invalid_parameter", bad
    for job in (first.json(), twins[0].json()):
        assert wait_for(service.url, job["id"])["status"] == "done"


def test_a_job_is_visible_only_to_its_key(service, song):
    job = submit(service.url, song).json()
    for method in (requests.get, requests.delete):
        other = method(service.url + job["status_url"], headers=auth(KEYS[1]), timeout=10)
        assert other.status_code == 404 and other.json()["error"] == "job_not_found"
    assert requests.get(service.url + job["status_url"], timeout=10).status_code == 401
    assert wait_for(service.url, job["id"])["status"] == "done"


def test_a_client_lists_its_own_jobs_newest_first_a_page_at_a_time(service, song):
    key = KEYS[1]  # no other test makes jobs with it

    def listed(query: str) -> dict:
        answer = requests.get(service.url + query, headers=auth(key), timeout=30)
        assert answer.status_code == 200, answer.text
        return answer.json()

    ids = [submit(service.url, song, key=key, stems="vocals").json()["id"] for _ in range(3)]
    first = listed("/jobs?limit=2")
    assert [job["id"] for job in first["jobs"]] == ids[::-1][:2]
    assert first["jobs"][0]["status_url"] == f"/jobs/{ids[2]}"
    last = listed(first["next_url"])
    assert [job["id"] for job in last["jobs"]] == ids[:1] and last["next_url"] is None
    others = requests.get(service.url + "/jobs?limit=100", headers=auth(), timeout=30).json()
    assert not set(ids) & {job["id"] for job in others["jobs"]}  # another key's: not listed
    deadline, listed_done = time.monotonic() + 120, set()
    while not set(ids) <= listed_done:  # each seen done once (TTL s later it is forgotten)
        assert time.monotonic() < deadline, listed("/jobs")
        listed_done |= {job["id"] for job in listed("/jobs?status=done")["jobs"]}
        time.sleep(0.3)
    assert listed("/jobs?status=queued") == {"jobs": [], "next_url": None}
    for query in ("limit=0", "limit=101", "status=lost", "before=-1", "before=soon"):
        refused = requests.get(f"{service.url}/jobs?{query}", headers=auth(key), timeout=30)
        assert refused.status_code == 422, query
        assert refused.json()["error"] == "invalid_parameter", query
    assert requests.get(service.url + "/jobs", timeout=30).status_code == 401


def test_job_survives_the_loss_of_its_ingress_replica(service, song):
    long_song = encode(tone(15.0, 44100, 2, seed=6), 44100, "mp3")
    job = submit(service.url, long_song, shifts=4).json()
    wait_for(service.url, job["id"], statuses=("running",), timeout=60)
    victim = replica_pids(service.pid)["Ingress"]
    os.kill(victim, signal.SIGKILL)
    done = wait_for(service.url, job["id"], timeout=300)
    assert done["status"] == "done", done
    assert replica_pids(service.pid)["Ingress"] != victim
    result = requests.get(service.url + done["result_url"], headers=auth(), timeout=60)
    assert len(zipfile.ZipFile(io.BytesIO(result.content)).namelist()) == 4


def test_no_job_is_lost_when_the_job_store_is_killed(service, song):
    """SIGKILL the store while one job runs and one waits: the restarted store reads their
    records back from the job storage, and both finish with their ZIPs."""
    long_song = encode(tone(12.0, 44100, 2, seed=7), 44100, "mp3")
    retry = {"Idempotency-Key": f"kept-{time.time_ns()}"}
    jobs = [submit(service.url, long_song, headers=retry if n == 2 else None,
                   shifts=3).json() for n in range(3)]
    wait_for(service.url, jobs[0]["id"], statuses=("running",), timeout=60)
    store, = actor_pids(service.pid, "JobStore")
    os.kill(store, signal.SIGKILL)
    again = submit(service.url, long_song, headers=retry, shifts=3)  # its key read back too
    assert again.status_code == 202 and again.json()["id"] == jobs[2]["id"], again.text
    finished = results_as_they_end(service.url, [job["id"] for job in jobs], timeout=300)
    assert [job["status"] for job, _ in finished] == ["done"] * 3, finished
    assert not alive(store) and actor_pids(service.pid, "JobStore") != [store]
    for _, result in finished:
        assert result.status_code == 200, result.text
        assert len(zipfile.ZipFile(io.BytesIO(result.content)).namelist()) == 4


def results_as_they_end(url: str, job_ids: tp.List[str], timeout: float
                        ) -> tp.List[tp.Tuple[dict, tp.Optional[requests.Response]]]:
    """Each job's final view and its result's answer (None unless done), the result fetched
    as soon as the job is seen done: the module's jobs are forgotten `TTL` s after they end,
    and on a slow machine the last of several may end longer than that after the first."""
    ended: tp.Dict[str, tp.Tuple[dict, tp.Optional[requests.Response]]] = {}
    deadline = time.monotonic() + timeout
    while len(ended) < len(job_ids):
        assert time.monotonic() < deadline, f"jobs not ended in {timeout} s: {ended}"
        for job_id in [job_id for job_id in job_ids if job_id not in ended]:
            view = job_view(url, job_id)
            if view is None or view["status"] not in FINAL_STATUSES:
                continue
            result = (requests.get(url + view["result_url"], headers=auth(), timeout=60)
                      if view["status"] == "done" else None)
            ended[job_id] = view, result
        time.sleep(0.3)
    return [ended[job_id] for job_id in job_ids]


def test_modal_client_runs_a_song_as_a_job_and_a_lost_answer_makes_no_second_job(
        service, song, tmp_path):
    """The Modal local entrypoint's client half (`run_job`) against this service, through a
    proxy that loses the answer to its first POST and cuts its first download half-way: the
    client sends the POST again under the same Idempotency-Key and follows the job the first
    one made, and resumes the download from where it stopped (a byte range). Its status
    polls, answered 502 twice (a load balancer while a container is replaced), ask again; a
    404 ends the client at once, saying so."""
    from modal_deploy.app import job_view, run_job
    path = tmp_path / "song.mp3"
    path.write_bytes(song)
    proxy = LosingProxy(service.url, cut=1)
    try:
        archive = run_job(proxy.url, path, {"two_stems": "drums"}, auth(), poll=0.2)
    finally:
        proxy.close()
    assert zipfile.ZipFile(io.BytesIO(archive)).namelist() == ["drums.mp3", "no_drums.mp3"]
    first_half, rest = proxy.ranges
    assert first_half is None and rest == f"bytes={len(archive) // 2}-"
    (status, body), = proxy.lost
    first = json.loads(body)["id"]
    assert status == 202 and wait_for(service.url, first)["status"] == "done"
    mine = requests.get(service.url + "/jobs?limit=100", headers=auth(), timeout=30).json()
    assert [job["id"] for job in mine["jobs"]].count(first) == 1
    assert mine["jobs"][0]["id"] == first  # the newest: no second job after it

    replaced = LosingProxy(service.url, lose=0, bad_gateway=2)
    try:
        assert job_view(f"{replaced.url}/jobs/{first}", auth())["status"] == "done"
        assert replaced.bad_gateways == [f"/jobs/{first}"] * 2
        with pytest.raises(SystemExit, match="^404: .*job_not_found"):
            job_view(f"{replaced.url}/jobs/no-such-job", auth())
    finally:
        replaced.close()


def test_a_finished_job_is_forgotten_after_its_ttl(service, expiring_job):
    """Last in this module: its job ended as the module started (`expiring_job`)."""
    assert expiring_job["status"] == "done"
    assert expiring_job["expires_at"] == pytest.approx(expiring_job["updated_at"] + TTL, abs=1)
    time.sleep(max(0., expiring_job["expires_at"] + 1 - time.time()))
    gone = requests.get(service.url + expiring_job["status_url"], headers=auth(), timeout=10)
    assert gone.status_code == 404 and gone.json()["error"] == "job_not_found"
