"""Batch mode, end to end: `python -m serve_graph batch` as a process on a real Ray Data pipeline
(its own local Ray) with the tiny model. Its stems equal `POST /separate`'s for the same options
and seed; bad files get their error rows and the batch goes on; a SIGKILLed run started again
runs only the unfinished songs and rewrites nothing; `--retry-failed` reruns only the failed."""
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import typing as tp
import zipfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import requests
import soundfile

from audio_files import encode, tone
from serve_graph.batch.output import BatchOutput
from serve_graph.procs import descendants, kill_all, wait_gone
from serve_process import run_python, tiny_service

pytestmark = pytest.mark.serve
ROOT = Path(__file__).resolve().parents[1]
OPTIONS = {"format": "wav", "wav_depth": "float32", "shifts": 2, "seed": 7}
GOOD = {"album/one": ("mp3", 6.0), "two": ("flac", 4.0), "deep/er/three": ("wav16", 3.0)}
SUFFIX = {"mp3": "mp3", "flac": "flac", "wav16": "wav"}


def flags(options: dict) -> list:
    return [item for key, value in options.items()
            for item in (f"--{key.replace('_', '-')}", str(value))]


def batch(source: Path, output: Path, repo: Path, *extra: str, wait: bool = True,
          timeout: float = 240, env: tp.Optional[dict] = None):
    """`python -m serve_graph batch` (its exit code and stderr), or the process itself."""
    command = [sys.executable, "-m", "serve_graph", "batch", str(source), str(output),
               "--model-repo", str(repo), *flags(OPTIONS), *extra]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True,
                               env=env)
    if not wait:
        return process
    try:
        _, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # its session: the driver and its Ray
        _, err = process.communicate()
        pytest.fail(f"the batch did not end in {timeout} s: {err[-3000:]}")
    return process.returncode, err


def manifest(output: Path) -> dict:
    rows = pq.read_table(output / "manifest.parquet").to_pylist()
    assert len({row["song_id"] for row in rows}) == len(rows), "a song listed twice"
    return {row["song_id"]: row for row in rows}


def write_song(folder: Path, song_id: str, fmt: str, seconds: float, seed: int) -> Path:
    path = folder / f"{song_id}.{SUFFIX[fmt]}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode(tone(seconds, 44100, 2, seed=seed), 44100, fmt))
    return path


def file_states(output: Path, song_ids) -> dict:
    """(inode, mtime_ns) of every file of the songs: a file rewritten changes them."""
    return {str(path): (path.stat().st_ino, path.stat().st_mtime_ns)
            for song_id in song_ids for path in sorted((output / song_id).iterdir())}


@pytest.fixture(scope="module")
def songs(tmp_path_factory) -> Path:
    """Three songs in folders, and four bad files: corrupt, empty, truncated, too long."""
    folder = tmp_path_factory.mktemp("batch_songs")
    for seed, (song_id, (fmt, seconds)) in enumerate(GOOD.items()):
        write_song(folder, song_id, fmt, seconds, seed)
    (folder / "corrupt.mp3").write_bytes(b"ID3 but no audio at all " * 40)
    (folder / "empty.wav").write_bytes(b"")
    whole = encode(tone(4.0, 44100, 2, seed=9), 44100, "flac")
    (folder / "truncated.flac").write_bytes(whole[:len(whole) // 8])
    write_song(folder, "long", "wav16", 12.0, 10)
    return folder


@pytest.fixture(scope="module")
def ray_tmpdir():
    """A RAY_TMPDIR (short: Ray's socket paths are limited) whose `ray_current_cluster` names
    a cluster long gone, as a `ray start` or a test's cluster on this machine leaves it: a
    bare `ray.init()` would try to join it."""
    folder = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))
    (folder / "ray").mkdir()
    (folder / "ray" / "ray_current_cluster").write_text("127.0.0.1:9\n")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def first_run(songs, tmp_path_factory, tiny_repo, ray_tmpdir):
    output = tmp_path_factory.mktemp("batch_out") / "stems"
    code, err = batch(songs, output, tiny_repo, "--max-audio-seconds", "10",
                      env={**os.environ, "RAY_TMPDIR": str(ray_tmpdir)})
    return code, err, output


def test_the_batch_starts_its_own_ray_beside_a_stale_cluster_file(first_run, ray_tmpdir):
    """Without RAY_ADDRESS the batch starts a new local Ray: the cluster named in
    `ray_current_cluster` (gone) is not joined."""
    code, err, output = first_run
    assert "3 separated, 4 failed" in err, err
    # no --device, no GPU in its Ray: the CPU, a window per forward, said before any song
    assert err.index("7 songs to run on 1 model actor(s), cpu, 1 window(s) per forward") < \
        err.index("songs 1/7"), err
    assert list((ray_tmpdir / "ray").glob("session_*")), "no Ray of its own was started"


def test_stems_equal_those_of_separate(first_run, songs, tiny_repo, tmp_path):
    """Each song's WAV stems from `batch` are `POST /separate`'s for the same options and
    seed, to -120 dB (float32 WAV; shifts seeded, so a rerun writes the same files)."""
    code, err, output = first_run
    server = tiny_service(tmp_path, tiny_repo)
    try:
        for song_id, (fmt, _) in GOOD.items():
            path = songs / f"{song_id}.{SUFFIX[fmt]}"
            answer = requests.post(server.url + "/separate", files={"audio_file": path.open("rb")},
                                   data={key: str(value) for key, value in OPTIONS.items()},
                                   timeout=120)
            assert answer.status_code == 200, answer.text
            served = zipfile.ZipFile(io.BytesIO(answer.content))
            assert sorted(served.namelist()) == sorted(p.name for p in (output / song_id).iterdir())
            for name in served.namelist():
                expected, _ = soundfile.read(io.BytesIO(served.read(name)), dtype="float32")
                got, _ = soundfile.read(output / song_id / name, dtype="float32")
                assert got.shape == expected.shape
                error = np.sum((got - expected) ** 2) / np.sum(expected ** 2)
                assert 10 * np.log10(max(error, 1e-30)) <= -120, (song_id, name)
    finally:
        server.kill()


def test_bad_files_get_their_error_rows_and_the_batch_goes_on(first_run):
    code, err, output = first_run
    assert code == 1, err  # some songs failed: their rows say why
    rows = manifest(output)
    assert set(rows) == set(GOOD) | {"corrupt", "empty", "truncated", "long"}
    for song_id, (_, seconds) in GOOD.items():
        row = rows[song_id]
        assert row["status"] == "done" and row["error"] is None, row
        assert row["audio_seconds"] == pytest.approx(seconds, abs=0.05)
        assert sorted(row["stems"]) == ["bass.wav", "drums.wav", "other.wav", "vocals.wav"]
        assert row["model"] == "htdemucs" and row["separate_seconds"] > 0
    for song_id in ("corrupt", "empty", "truncated"):
        assert rows[song_id]["status"] == "failed"
        assert (rows[song_id]["error"], rows[song_id]["status_code"]) == ("invalid_audio", 415)
        assert rows[song_id]["stems"] == [] and not (output / song_id).exists()
    assert (rows["long"]["error"], rows["long"]["status_code"]) == ("audio_too_long", 413)
    assert "songs 7/7 (4 failed)" in err and "3 separated, 4 failed" in err, err
    assert not list((output / "_batch" / "tmp").iterdir())


def test_retry_failed_reruns_only_the_failed(first_run, songs, tiny_repo):
    code, err, output = first_run
    done_before = file_states(output, GOOD)
    write_song(songs, "truncated", "flac", 3.0, 11)  # the file fixed in place
    code, err = batch(songs, output, tiny_repo, "--max-audio-seconds", "10")
    assert code == 1 and "0 separated, 0 failed, 7 done before" in err, err
    assert manifest(output)["truncated"]["status"] == "failed"  # not retried without the flag

    code, err = batch(songs, output, tiny_repo, "--max-audio-seconds", "10", "--retry-failed")
    assert code == 1 and "1 separated, 3 failed, 3 done before" in err, err
    rows = manifest(output)
    assert rows["truncated"]["status"] == "done" and len(rows["truncated"]["stems"]) == 4
    assert rows["long"]["error"] == "audio_too_long"
    assert file_states(output, GOOD) == done_before  # the done songs were not rewritten
    runs = BatchOutput(str(output)).runs()  # the first run, the one that ran nothing, this one
    assert [(run["separated"], run["failed"], run["done_before"]) for run in runs] == [
        (3, 4, 0), (0, 0, 7), (1, 3, 3)]
    assert runs[1]["setup_seconds"] is None  # nothing to run: Ray was not started
    assert 0 < runs[2]["setup_seconds"] < runs[2]["seconds"]
    assert runs[0]["actors"] == 1 and runs[0]["device"] == "cpu"
    assert 0 < runs[0]["model_busy"] < 1
    recorded = BatchOutput(str(output)).records()
    assert runs[0]["model_seconds"] == pytest.approx(  # the songs' shares sum to the whole
        sum(recorded[song_id]["model_seconds"] or 0 for song_id in GOOD))


def test_other_options_on_the_same_output_are_refused(first_run, songs, tiny_repo):
    _, _, output = first_run
    code, err = batch(songs, output, tiny_repo, "--format", "flac")  # the last --format counts
    assert code == 2 and "other settings (options" in err and "'format': 'wav'" in err, err
    assert "resume" in err


def test_a_dry_run_says_what_would_run_and_writes_nothing(first_run, songs, tiny_repo):
    """Before a week-long run: how many songs, how many done and failed, which would run."""
    _, _, output = first_run
    written = {str(path): path.stat().st_mtime_ns for path in output.rglob("*")}
    rows = manifest(output)
    failed = sorted(song_id for song_id, row in rows.items() if row["status"] == "failed")
    code, err = batch(songs, output, tiny_repo, "--max-audio-seconds", "10", "--dry-run")
    assert code == 0, err
    assert f"dry run: 7 songs in INPUT; in OUTPUT {7 - len(failed)} done, {len(failed)} " \
           f"failed (run again with --retry-failed); 0 to run" in err, err
    code, err = batch(songs, output, tiny_repo, "--max-audio-seconds", "10", "--dry-run",
                      "--retry-failed")
    assert code == 0 and f"; {len(failed)} to run: {', '.join(failed)}" in err, err
    code, err = batch(songs, output, tiny_repo, "--dry-run", "--format", "flac")
    assert code == 2 and "other settings" in err, err  # as the run itself would refuse
    fresh = output.parent / "not_yet"
    code, err = batch(songs, fresh, tiny_repo, "--dry-run")
    assert code == 0 and "in OUTPUT 0 done, 0 failed; 7 to run: album/one, corrupt" in err
    assert not fresh.exists()
    assert {str(path): path.stat().st_mtime_ns for path in output.rglob("*")} == written


def started_until_recorded(folder: Path, output: Path, repo: Path, records: int
                           ) -> tp.Tuple[subprocess.Popen, tp.List[int]]:
    """A batch of `folder` started, once OUTPUT holds more than `records` song records: its
    process and its descendants' PIDs."""
    process = batch(folder, output, repo, "--songs-per-call", "1", wait=False)
    rows_folder = output / "_batch" / "rows"
    deadline = time.monotonic() + 180
    while len(list(rows_folder.iterdir()) if rows_folder.exists() else []) <= records:
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    return process, descendants(process.pid)


def test_a_stopped_or_killed_run_started_again_runs_only_the_unfinished(tmp_path, tiny_repo):
    """SIGTERM the driver once a song is recorded (`ray job stop`, Kubernetes): it stops,
    saying so, exit 143, its Ray gone, the run's record kept. Then SIGKILL the next run once
    it recorded one more; the same command again runs the rest, leaves the finished files as
    they were, and the manifest lists every song once."""
    folder, output = tmp_path / "songs", tmp_path / "out"
    ids = [f"song{index}" for index in range(6)]
    for index, song_id in enumerate(ids):
        write_song(folder, song_id, "wav16", 4.0, index)
    process, started = started_until_recorded(folder, output, tiny_repo, 0)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    left = wait_gone(started, 20.)
    kill_all(left)
    assert process.returncode == 143 and "batch stopped (SIGTERM) after " in err, err[-3000:]
    assert "the same command again goes on from the songs recorded" in err and left == []
    (run,) = BatchOutput(str(output)).runs()
    assert run["stopped"] == "SIGTERM" and run["songs"] == len(ids)

    rows_folder = output / "_batch" / "rows"
    process, started = started_until_recorded(folder, output, tiny_repo,
                                              len(list(rows_folder.iterdir())))
    os.kill(process.pid, signal.SIGKILL)
    process.communicate()
    kill_all(wait_gone(started, 20.))  # its Ray, should any of it outlive the driver
    committed = [json.loads(path.read_text())["song_id"] for path in rows_folder.iterdir()]
    assert 1 < len(committed) < len(ids), "the run was not killed midway"
    before = file_states(output, committed)

    code, err = batch(folder, output, tiny_repo, "--songs-per-call", "1")
    assert code == 0, err
    assert f"{len(ids) - len(committed)} separated, 0 failed, {len(committed)} done before" in err
    rows = manifest(output)
    assert sorted(rows) == ids and all(row["status"] == "done" for row in rows.values())
    assert file_states(output, committed) == before
    assert all(len(list((output / song_id).iterdir())) == 4 for song_id in ids)
    assert not list((output / "_batch" / "tmp").iterdir())


ROWS_AS_WRITTEN = '''
import json, sys, time
from pathlib import Path
import pandas as pd
import ray.data
from serve_graph.batch.output import OutputUnwritableError
from serve_graph.batch.pipeline import start_ray

received = Path(sys.argv[1])  # the driver has the first row


class ThreeSongs:  # a model actor's call of three songs, the last ending after the first's row
    def __call__(self, batch):
        yield pd.DataFrame([{"song": 1, "waited": False}])
        yield pd.DataFrame([{"song": 2, "waited": False}])
        deadline = time.monotonic() + 30
        while not received.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        yield pd.DataFrame([{"song": 3, "waited": received.exists()}])


start_ray()
rows = ray.data.from_items([{"song_id": "a"}]).map_batches(
    ThreeSongs, batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=1))
for row in rows.iter_rows():
    if row["song"] == 1:
        received.touch()
    print(json.dumps({"song": int(row["song"]), "waited": bool(row["waited"])}), flush=True)


class FullOutput:  # a model actor whose OUTPUT has no space left
    def __call__(self, batch):
        raise OutputUnwritableError("cannot write to s3://bucket/out: No space left on device")


full = ray.data.from_items([{"song_id": "a"}]).map_batches(
    FullOutput, batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=1))
try:
    for row in full.iter_rows():
        pass
except OutputUnwritableError as exc:  # as `pipeline.run` catches it
    print(json.dumps({"stopped": exc.detail, "status_code": exc.status_code}), flush=True)
'''


@pytest.fixture(scope="module")
def ray_data_answers(tmp_path_factory) -> tp.Tuple[tp.List[dict], str]:
    """What the driver of `ROWS_AS_WRITTEN` printed (one JSON a line), and its stderr."""
    out, err = run_python(ROWS_AS_WRITTEN, str(tmp_path_factory.mktemp("rows") / "got"))
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")], err


def test_a_songs_row_reaches_the_driver_before_its_call_ends(ray_data_answers):
    """The batch's Ray Data (as `pipeline.start_ray` sets it up): a song's row that a model
    actor's call yields reaches the driver while the call goes on, once the call yields the
    next (Ray Data sends a task's block on when the task goes on to the next), so progress
    moves song by song; at Ray Data's default block size a call's rows came together when it
    ended."""
    rows, err = ray_data_answers
    assert rows[:3] == [{"song": 1, "waited": False}, {"song": 2, "waited": False},
                        {"song": 3, "waited": True}], err[-3000:]


def test_a_full_output_in_a_model_actor_reaches_the_driver_as_itself(ray_data_answers):
    """A model actor's `OutputUnwritableError` comes out of the driver's rows as one (its
    detail and code kept), which `pipeline.run` turns into a stop, not a crash (by default
    Ray Data wraps it in a UserCodeException that has lost it)."""
    rows, err = ray_data_answers
    assert rows[3:] == [{"stopped": "cannot write to s3://bucket/out: No space left on device",
                         "status_code": 507}], err[-3000:]
