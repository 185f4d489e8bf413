"""The batch mode's parts without Ray: INPUT resolved to songs (folder, glob, list, manifest),
windows batched across songs, and several songs separated at once equal to each one alone."""
import errno
import io
import time
import typing as tp
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile

from audio_files import encode, tone
from serve_graph.batch.songs import BatchInputError, list_songs
from serve_graph.engine import ModelRunner, SeparationOptions, load_model, separate_to_zip
from serve_graph.engine.pipeline import prepare
from serve_graph.engine.song_batches import batches_across, separate_songs


def touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def ids(songs):
    return [song.song_id for song in songs]


def test_a_folder_gives_every_audio_file_under_it_by_its_relative_path(tmp_path):
    for name in ("b/one.mp3", "a/two.FLAC", "three.wav", "notes.txt", "cover.jpg"):
        touch(tmp_path / name)
    songs = list_songs(str(tmp_path))
    assert ids(songs) == ["a/two", "b/one", "three"]
    assert songs[1].uri == f"file://{tmp_path}/b/one.mp3"


def test_two_files_of_one_name_keep_their_extensions(tmp_path):
    touch(tmp_path / "song.mp3")
    touch(tmp_path / "song.wav")
    touch(tmp_path / "other.wav")
    assert ids(list_songs(str(tmp_path))) == ["other", "song.mp3", "song.wav"]


def test_a_glob_a_list_and_manifests(tmp_path):
    for name in ("music/x/one.flac", "music/y/two.flac", "music/y/three.mp3"):
        touch(tmp_path / name)
    assert ids(list_songs(f"{tmp_path}/music/**/*.flac")) == ["x/one", "y/two"]
    listing = touch(tmp_path / "list.txt", "\n".join(
        ["# my songs", str(tmp_path / "music/x/one.flac"), "",
         str(tmp_path / "music/y/three.mp3")]).encode())
    assert ids(list_songs(str(listing))) == ["x/one", "y/three"]
    rows = {"song_id": ["first", "second"], "uri": ["s3://bucket/a.mp3", "/data/b.wav"]}
    touch(tmp_path / "songs.csv", b"song_id,uri\nfirst,s3://bucket/a.mp3\nsecond,/data/b.wav\n")
    pq.write_table(pa.table(rows), tmp_path / "songs.parquet")
    for name in ("songs.csv", "songs.parquet"):
        songs = list_songs(str(tmp_path / name))
        assert [tuple(song) for song in songs] == list(zip(rows["song_id"], rows["uri"]))


@pytest.mark.parametrize("rows, message", [
    ({"id": ["a"], "uri": ["a.mp3"]}, "lacks the column(s) song_id"),
    ({"song_id": ["a", "a"], "uri": ["a.mp3", "b.mp3"]}, "names both"),
    ({"song_id": ["../escape"], "uri": ["a.mp3"]}, "is not a relative path"),
    ({"song_id": ["/abs"], "uri": ["a.mp3"]}, "is not a relative path"),
    ({"song_id": ["_batch/x"], "uri": ["a.mp3"]}, "is not a relative path"),
])
def test_a_bad_manifest_is_refused_with_the_reason(tmp_path, rows, message):
    pq.write_table(pa.table(rows), tmp_path / "songs.parquet")
    with pytest.raises(BatchInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        list_songs(str(tmp_path / "songs.parquet"))


def test_nothing_to_separate_is_refused(tmp_path):
    touch(tmp_path / "notes.txt")
    with pytest.raises(BatchInputError, match="names no audio files"):
        list_songs(str(tmp_path / "empty_folder_glob*.mp3"))
    with pytest.raises(BatchInputError, match="is not a folder"):
        list_songs(str(tmp_path / "missing"))


@pytest.fixture(scope="module")
def runner(tiny_model):
    return ModelRunner(tiny_model)


def planned(runner, options, lengths):
    return [prepare(encode(tone(seconds, 44100, 2, seed=i), 44100, "wav16"), runner.geometry,
                    options) for i, seconds in enumerate(lengths)]


def test_windows_are_batched_across_songs_in_full_batches(runner):
    songs = planned(runner, SeparationOptions(shifts=2), [3.0, 7.5, 1.0])
    batches = list(batches_across(songs, 5))
    taken = [(index, window.index) for batch in batches for index, window in batch]
    assert sorted(taken) == sorted((index, window.index) for index, song in enumerate(songs)
                                   for window in song.plan.windows)
    assert all(len(batch) == 5 for batch in batches[:-1]) and 0 < len(batches[-1]) <= 5
    assert any(len({index for index, _ in batch}) > 1 for batch in batches)  # across songs
    assert [index for index, _ in (pair for batch in batches for pair in batch)] == sorted(
        index for batch in batches for index, _ in batch)  # song after song


@pytest.mark.parametrize("fields", [{"format": "wav", "wav_depth": "float32", "shifts": 2},
                                    {"format": "flac", "stems": "vocals,bass"},
                                    {"format": "wav", "remix": "vocals=-inf"}])
def test_songs_separated_together_equal_each_alone(runner, fields):
    """`separate_songs` (the model actor's loop) writes each song's files as the one-song
    recipe (`separate_to_zip`, the CLI's) does: float32 WAV to -120 dB, 16-bit files to one
    step of 16 bits (batches of other sizes round float32's last bits otherwise)."""
    assert_together_equals_alone(runner, SeparationOptions(model="htdemucs", **fields),
                                 [3.0, 5.5, 2.0])


def test_roformer_songs_separated_together_equal_each_alone(tiny_repo):
    """A RoFormer's windows batched across songs (MSST's windowing, the reflected borders of
    each song) write what each song alone does."""
    runner = ModelRunner(load_model("tinyroformer", tiny_repo))
    options = SeparationOptions(model="tinyroformer", format="wav", wav_depth="float32")
    assert_together_equals_alone(runner, options, [2.5, 0.7, 4.0])


class Recorded:
    """Stands in for `ModelRunner` (its forwards timed, the `forward_fails_at`-th failing) and
    wraps `SongWriter.add` (timed and slowed down, or failing at its `fail_at`-th call)."""

    def __init__(self, runner, add, fail_at=None, forward_fails_at=None):
        self.runner, self.add, self.fail_at = runner, add, fail_at
        self.forward_fails_at = forward_fails_at
        self.forwards, self.adds, self.songs = [], [], []  # each add's time and song

    def __call__(self, *args):
        if len(self.forwards) == self.forward_fails_at:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        self.forwards.append(time.monotonic())
        return self.runner(*args)

    def slow_add(self, writer, *args):
        start = time.monotonic()
        if len(self.adds) == self.fail_at:
            raise OSError("disk gone")
        time.sleep(0.05)
        self.add(writer, *args)
        self.adds.append((start, time.monotonic()))
        self.songs.append(writer.song)

    def spans(self, song):
        """(start, end) of each add of `song`'s windows."""
        return [span for span, added in zip(self.adds, self.songs) if added is song]


def recording(runner, monkeypatch, **failures) -> Recorded:
    """A `Recorded` of `runner`, with `SongWriter.add` slowed (and failing) through it."""
    from serve_graph.engine.pipeline import SongWriter
    recorded = Recorded(runner, SongWriter.add, **failures)
    monkeypatch.setattr(SongWriter, "add", lambda writer, *args: recorded.slow_add(writer, *args))
    return recorded


def test_the_model_runs_the_next_forward_while_the_last_outputs_are_added(
        runner, monkeypatch):
    """The actor's loop overlap-adds on a thread of its own: the forward after a batch starts
    before that batch's windows are all added (a slowed `SongWriter.add`)."""
    recorded = recording(runner, monkeypatch)
    options = SeparationOptions(model="htdemucs", format="flac")
    songs = planned(runner, options, [3.0, 2.0])
    with ThreadPoolExecutor(2) as pool:
        assert sorted(dict(separate_songs(recorded, songs, options, pool, 2, 2))) == [0, 1]
    first_song = recorded.spans(songs[0])
    assert len(first_song) == len(songs[0].plan.windows) >= 2
    first_added = first_song[1][1]  # the first batch: the first song's first 2 windows
    assert len(recorded.forwards) >= 3 and recorded.forwards[1] < first_added


def test_the_songs_of_a_batch_are_added_side_by_side(runner, monkeypatch):
    """Each song's windows are added on a thread of its own: with one batch holding both
    songs' windows, the adds of the second run while the first's go on (one song waiting for
    its encoders does not hold up the next)."""
    recorded = recording(runner, monkeypatch)
    options = SeparationOptions(model="htdemucs", format="flac")
    songs = planned(runner, options, [3.0, 3.0])
    with ThreadPoolExecutor(2) as pool:
        assert sorted(dict(separate_songs(recorded, songs, options, pool, 2, 100))) == [0, 1]
    spans = [recorded.spans(song) for song in songs]
    assert len(spans[0]) == len(songs[0].plan.windows) and len(spans[1]) >= 2
    assert spans[1][0][0] < spans[0][-1][1]  # the second song began before the first ended


def test_a_failing_forward_still_gives_the_songs_finished_before_it(runner, monkeypatch):
    """The forward after the one that completed a song fails: that song, added on the other
    thread meanwhile, still comes out with its files before the error does."""
    options = SeparationOptions(model="htdemucs", format="wav")
    songs = planned(runner, options, [1.0, 3.0])
    first = len(songs[0].plan.windows)
    recorded = recording(runner, monkeypatch, forward_fails_at=1)
    finished = []
    with ThreadPoolExecutor(2) as pool, pytest.raises(RuntimeError, match="illegal memory"):
        for index, files in separate_songs(recorded, songs, options, pool, 2, first):
            finished.append((index, sorted(files)))
    assert finished == [(0, ["bass.wav", "drums.wav", "other.wav", "vocals.wav"])]


def test_a_failing_add_fails_the_call_and_leaves_no_spill_files(runner, monkeypatch, tmp_path):
    """An error while adding a batch (a full disk) comes out of `separate_songs`; the songs'
    spill files are removed, those of the song being written too."""
    from serve_graph.engine import output
    monkeypatch.setattr(output, "SPILL_ROOT", tmp_path)
    recorded = recording(runner, monkeypatch, fail_at=3)
    options = SeparationOptions(model="htdemucs", format="wav")
    songs = planned(runner, options, [3.0, 2.0])
    with ThreadPoolExecutor(2) as pool, pytest.raises(OSError, match="disk gone"):
        list(separate_songs(recorded, songs, options, pool, 2, 2))
    assert len(recorded.adds) >= 3  # the songs' other lanes may have gone on meanwhile
    assert [path for path in tmp_path.rglob("*") if path.is_file()] == []


def assert_together_equals_alone(runner, options, lengths):
    songs = planned(runner, options, lengths)
    with ThreadPoolExecutor(2) as pool:
        together = dict(separate_songs(runner, songs, options, pool, 2, batch_size=4))
    assert sorted(together) == [0, 1, 2]
    for index, seconds in enumerate(lengths):
        alone = separate_to_zip(encode(tone(seconds, 44100, 2, seed=index), 44100, "wav16"),
                                runner, options, batch_size=1, threads=2)
        if options.one_file:
            expected = {"remix.wav": alone}
        else:
            archive = zipfile.ZipFile(io.BytesIO(alone))
            expected = {name: archive.read(name) for name in archive.namelist()}
        assert sorted(together[index]) == sorted(expected)
        for name, data in expected.items():
            got, want = samples(together[index][name]), samples(data)
            assert got.shape == want.shape
            if soundfile.info(io.BytesIO(data)).subtype == "FLOAT":
                assert relative_db(got, want) <= -120, name
            else:
                assert np.max(np.abs(got - want)) <= 1 / 2**15, name


def samples(data: bytes) -> np.ndarray:
    return soundfile.read(io.BytesIO(data), dtype="float64")[0]


def relative_db(got: np.ndarray, expected: np.ndarray) -> float:
    error = np.sum((got - expected) ** 2) / max(np.sum(expected ** 2), 1e-30)
    return 10 * np.log10(max(error, 1e-30))


def actor_with_songs(folder, repo, names) -> tp.Tuple[tp.Any, tp.Dict[str, np.ndarray]]:
    """A `SeparateSongs` writing to `folder/out` (called here without Ray), and the batch of
    the songs `folder/in/<name>.wav` decoded, as Ray Data hands it one."""
    from serve_graph.batch.stages import BatchSettings, SeparateSongs, decode_song
    settings = BatchSettings(str(folder / "out"), "htdemucs", str(repo), 44100, 2, 60., 2**30)
    decoded = [decode_song({"song_id": name, "uri": str(folder / "in" / f"{name}.wav")},
                           settings) for name in names]
    actor = SeparateSongs(settings, SeparationOptions(model="htdemucs", format="wav").model_dump())
    return actor, {key: np.array([row[key] for row in decoded], dtype=object)
                   for key in decoded[0]}


def test_the_actor_yields_each_song_once_written_and_a_song_it_cannot_write_fails(
        tmp_path, tiny_repo):
    """`SeparateSongs` (called here without Ray): a song's row comes once its files and record
    are on OUTPUT; a song whose folder cannot be made gets `storage_full` (507) and its record,
    and the call goes on."""
    from serve_graph.batch.output import BatchOutput
    for name in ("good", "blocked"):
        touch(tmp_path / "in" / f"{name}.wav", encode(tone(3.0, 44100, 2, seed=1), 44100, "wav16"))
    touch(tmp_path / "out" / "blocked", b"a file where the song's folder would go")
    actor, batch = actor_with_songs(tmp_path, tiny_repo, ("good", "blocked"))
    frames = list(actor(batch))
    rows = {frame.iloc[0]["song_id"]: frame.iloc[0] for frame in frames}
    assert len(frames) == 2 and rows["good"]["status"] == "done"
    assert sorted(p.name for p in (tmp_path / "out" / "good").iterdir()) == [
        "bass.wav", "drums.wav", "other.wav", "vocals.wav"]
    assert (rows["blocked"]["status"], rows["blocked"]["error"],
            rows["blocked"]["status_code"]) == ("failed", "storage_full", 507)
    assert "cannot write its stems" in rows["blocked"]["detail"]
    records = BatchOutput(str(tmp_path / "out")).records()
    assert records["blocked"]["error"] == "storage_full" and records["good"]["status"] == "done"


def test_a_full_output_stops_the_call_and_records_no_song(tmp_path, tiny_repo, monkeypatch):
    """OUTPUT that refuses every write (no space left): the actor's call raises
    `OutputUnwritableError` (the run stops, `pipeline.run`) instead of recording each song as
    failed, so that a rerun once there is room separates them; a song that failed to decode
    is not recorded either."""
    import errno

    from serve_graph.batch.output import BatchOutput, OutputUnwritableError
    touch(tmp_path / "in" / "good.wav", encode(tone(3.0, 44100, 2, seed=1), 44100, "wav16"))
    touch(tmp_path / "in" / "bad.wav", b"not audio")
    actor, batch = actor_with_songs(tmp_path, tiny_repo, ("bad", "good"))

    def full(path, data, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(actor.output.fs, "pipe_file", full)
    with pytest.raises(OutputUnwritableError, match="No space left on device") as stopped:
        list(actor(batch))
    assert stopped.value.status_code == 507 and str(tmp_path / "out") in stopped.value.detail
    actor.writer.shutdown(wait=True)  # the writes already queued meet the full disk too
    monkeypatch.undo()
    assert BatchOutput(str(tmp_path / "out")).records() == {}
    assert not (tmp_path / "out" / "good").exists()


@pytest.mark.parametrize("cause, exit_code", [
    (OSError(errno.ENOSPC, "No space left on device"), 3), (KeyboardInterrupt(), 130)])
def test_a_run_stopped_while_it_writes_the_manifest_says_it_stopped(tmp_path, monkeypatch,
                                                                    cause, exit_code):
    """Every song recorded, then the manifest's write meets a full OUTPUT (errno 28, ENOSPC)
    or Ctrl-C: `RunStopped` with its exit code (3, 130), as while songs run, not a traceback
    or "could not start"; no half-written manifest."""
    from serve_graph.batch.output import BatchOutput
    from serve_graph.batch.pipeline import BatchJob, RunStopped, run
    touch(tmp_path / "in" / "song.wav")
    job = BatchJob(str(tmp_path / "in"), str(tmp_path / "out"), SeparationOptions())
    output = BatchOutput(job.output)
    output.start(job.record)
    output.record({"song_id": "song", "status": "done"})
    refusals, write = [], output.fs.pipe_file

    def refused(path, data, **kwargs):  # a full disk stays full; Ctrl-C is pressed once
        if isinstance(cause, OSError) or not refusals:
            refusals.append(path)
            raise cause
        return write(path, data, **kwargs)
    monkeypatch.setattr(output.fs, "pipe_file", refused)
    with pytest.raises(RunStopped) as stopped:
        run(job, (44100, 2))
    monkeypatch.undo()
    assert stopped.value.exit_code == exit_code and refusals
    assert not (tmp_path / "out" / "manifest.parquet").exists()
    runs = output.runs()  # the stopped run's record, where OUTPUT took it
    assert [record.get("stopped") for record in runs] == ([] if exit_code == 3 else ["Ctrl-C"])


def test_a_song_by_url_is_fetched_as_the_service_fetches_one_and_again_after_a_failure(
        monkeypatch):
    """An http(s) song goes through `url_fetch`, as `audio_url` does: a loopback address is
    refused (`url_refused`) unless allowed (`--url-allow-networks`); allowed, a song whose
    first two GETs answer 503 is read on the third, one that always does fails
    `url_fetch_failed` after three, saying so; a 404 after one."""
    from serve_graph.__main__ import batch_job, batch_runner, build_parser
    from serve_graph.batch import stages
    from serve_graph.batch.pipeline import settings_for
    from serve_graph.batch.stages import decode_song, read_song
    from serve_graph.engine.errors import SeparationError
    from web_servers import song_server
    monkeypatch.setattr(stages, "READ_BACKOFF_S", 0.01)
    song = encode(tone(1.0, 44100, 2, seed=3), 44100, "wav16")
    server = song_server({"flaky.wav": song, "down.wav": song},
                         unavailable={"flaky.wav": 2, "down.wav": 100})
    here = ("127.0.0.1/32",)
    try:
        with pytest.raises(SeparationError, match="loopback") as refused:
            read_song(f"{server.url}/flaky.wav", 2**30)
        assert refused.value.error == "url_refused" and server.gets == {}
        assert read_song(f"{server.url}/flaky.wav", 2**30, here) == song
        assert server.gets["flaky.wav"] == 3
        with pytest.raises(SeparationError, match="HTTP 503") as down:
            read_song(f"{server.url}/down.wav", 2**30, here)
        assert down.value.error == "url_fetch_failed" and server.gets["down.wav"] == 3
        with pytest.raises(SeparationError, match="HTTP 404") as missing:
            read_song(f"{server.url}/missing.wav", 2**30, here)
        assert missing.value.error == "url_fetch_failed" and server.gets["missing.wav"] == 1
        with pytest.raises(SeparationError, match="larger than the limit") as large:
            read_song(f"{server.url}/flaky.wav", 100, here)
        assert large.value.error == "upload_too_large" and server.gets["flaky.wav"] == 4
        # `batch --url-allow-networks`, through the job and the settings the decode tasks get
        args = build_parser().parse_args(["batch", "in", "out", "--url-allow-networks",
                                          "127.0.0.1/32, 10.0.0.0/8"])
        job = batch_job(args, SeparationOptions(model="htdemucs"), batch_runner(args))
        settings = settings_for(job, 44100, 2)
        assert settings.url_allow_networks == ("127.0.0.1/32", "10.0.0.0/8")
        row = decode_song({"song_id": "flaky", "uri": f"{server.url}/flaky.wav"}, settings)
        assert row["error"] is None and len(row["pcm"]) == 44100 * 2 * 4
    finally:
        server.close()


def test_a_bucket_s_song_is_read_again_after_a_failure_and_a_local_one_once(tmp_path,
                                                                            monkeypatch):
    """A song on a remote filesystem (fsspec's memory filesystem stands in for a bucket) whose
    first two reads fail (a connection reset) is read on the third; a missing local file is
    tried once, `unreadable` saying why."""
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    from serve_graph.batch import stages
    from serve_graph.batch.stages import UnreadableError, read_song
    monkeypatch.setattr(stages, "READ_BACKOFF_S", 0.01)
    fsspec.filesystem("memory").pipe_file("/bucket/song.wav", b"RIFF song")
    reads, failing = [], [2]  # the reads made; how many more fail
    whole = MemoryFileSystem.cat_file

    def resetting(fs, path, *args, **kwargs):
        reads.append(path)
        if failing[0]:
            failing[0] -= 1
            raise ConnectionResetError(104, "Connection reset by peer")
        return whole(fs, path, *args, **kwargs)
    monkeypatch.setattr(MemoryFileSystem, "cat_file", resetting)
    assert read_song("memory://bucket/song.wav", 2**30) == b"RIFF song" and len(reads) == 3
    reads.clear()
    failing[0] = 100
    with pytest.raises(UnreadableError, match="Connection reset by peer"):
        read_song("memory://bucket/song.wav", 2**30)
    assert len(reads) == 3
    fsspec.filesystem("memory").rm("/bucket", recursive=True)
    monkeypatch.setattr(stages, "READ_BACKOFF_S", 30.)  # a second attempt would be seen
    start = time.monotonic()
    with pytest.raises(UnreadableError, match="No such file or directory"):
        read_song(str(tmp_path / "missing.wav"), 2**30)
    assert time.monotonic() - start < 10


def test_the_command_s_model_options_reach_each_actor_s_runner(tiny_repo):
    """`batch --precision --compile --group-norm --dconv --batch-size`, through the job and
    the settings sent to the actors, to the `RunnerOptions` of the actor's model (the fused
    DConv kernels: Triton's interpreter here, conftest.py)."""
    from serve_graph.__main__ import batch_job, batch_runner, build_parser
    from serve_graph.batch.pipeline import on_cluster, settings_for
    from serve_graph.batch.stages import SeparateSongs
    from serve_graph.engine.modes import RunnerOptions
    args = build_parser().parse_args([
        "batch", "in", "out", "--model-repo", str(tiny_repo), "--device", "cpu", "--precision",
        "bf16", "--compile", "graphs", "--group-norm", "half", "--dconv", "triton",
        "--batch-size", "3"])
    job = batch_job(args, SeparationOptions(model="htdemucs"), batch_runner(args))
    job = on_cluster(job, {"CPU": 16., "GPU": 2.})  # --device cpu: whatever the cluster has
    actor = SeparateSongs(settings_for(job, 44100, 2), job.options.model_dump())
    assert actor.runner.options == RunnerOptions("cpu", "bf16", "graphs", max_batch=3,
                                                 group_norm="half", dconv="triton")


@pytest.mark.parametrize("resources, device, windows, actors", [
    ({"CPU": 2.}, "cpu", 1, 1),
    ({"CPU": 32., "GPU": 2.}, "cuda", 8, 2)])
def test_without_device_the_model_actors_run_where_the_cluster_has_gpus(
        resources, device, windows, actors):
    """`batch` without `--device` from a driver without a GPU (this machine; on a cluster, its
    head node): the model actors go on the cluster's GPUs where it has some, one per GPU, 8
    windows per forward; else the CPU, 1 window. `--batch-size` holds on either."""
    from serve_graph.__main__ import batch_job, batch_runner, build_parser
    from serve_graph.batch.pipeline import actor_count, actor_env, on_cluster
    options = SeparationOptions(model="htdemucs")
    args = build_parser().parse_args(["batch", "in", "out"])
    job = batch_job(args, options, batch_runner(args))
    assert job.runner.device is None  # chosen on the cluster, not on the driver
    ran = on_cluster(job, resources)
    assert (ran.runner.device, ran.runner.max_batch, ran.cuda) == (device, windows,
                                                                  device == "cuda")
    assert actor_count(ran, resources) == actors
    assert ("GLIBC_TUNABLES" in actor_env(ran)) == (device == "cpu")
    args = build_parser().parse_args(["batch", "in", "out", "--batch-size", "3"])
    assert on_cluster(batch_job(args, options, batch_runner(args)),
                      resources).runner.max_batch == 3


def test_model_actors_start_with_the_cpu_settings_of_separates_replicas():
    """On the CPU the actor's process gets what serve_config.yaml gives Separate (glibc keeps
    freed memory, one arena: the model runs on one of the actor's threads); on CUDA nothing."""
    import yaml

    from serve_graph.batch.pipeline import BatchJob, actor_env
    from serve_graph.engine.cpu_settings import KEEP_TUNABLES
    from serve_graph.engine.modes import RunnerOptions
    from serve_graph.launch import DEFAULT_CONFIG
    options = SeparationOptions(model="htdemucs")
    env = actor_env(BatchJob("in", "out", options, runner=RunnerOptions("cpu")))
    assert set(KEEP_TUNABLES) <= set(env["GLIBC_TUNABLES"].split(":"))
    deployments = yaml.safe_load(DEFAULT_CONFIG.read_text())["applications"][0]["deployments"]
    separate = next(d for d in deployments if d["name"] == "Separate")
    shipped = separate["ray_actor_options"]["runtime_env"]["env_vars"]
    assert {name: env[name] for name in shipped} == shipped  # the tunables, OpenMP's wait
    assert actor_env(BatchJob("in", "out", options, runner=RunnerOptions("cuda"))) == {}


def test_durations_read_as_a_person_writes_them():
    from serve_graph.batch.progress import duration
    assert [duration(s) for s in (-1, 42.4, 59.6, 185, 239.6, 3599.7, 7620)] == [
        "0 s", "42 s", "1 min 00 s", "3 min 05 s", "4 min 00 s", "1 h 00 min", "2 h 07 min"]


def test_the_model_busy_share_after_the_first_song_leaves_out_the_start(monkeypatch):
    from serve_graph.batch import progress
    clock = [0.]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    runs = progress.Progress(total=5, skipped=0, out=io.StringIO())
    clock[0] = 10.
    runs.pipeline_started(actors=1)  # Ray's start: 10 s
    clock[0] = 11.
    runs.song({"status": "failed", "model_seconds": None})  # did not decode: no model time
    clock[0] = 20.  # the actor loaded its model, then separated the first song in 2 s
    runs.song({"status": "done", "audio_seconds": 60., "model_seconds": 2., "finished_at": 119.})
    assert runs.model_busy == pytest.approx(2 / 10)
    assert runs.model_busy_after_first_song is None  # one song: no time after it yet
    clock[0] = 30.  # two songs ended 10 s after it by the actor's clock, their rows came late
    runs.song({"status": "done", "audio_seconds": 60., "model_seconds": 7., "finished_at": 127.})
    runs.song({"status": "done", "audio_seconds": 60., "model_seconds": 2., "finished_at": 129.})
    assert runs.model_busy == pytest.approx(11 / 20)
    assert runs.model_busy_after_first_song == pytest.approx(9 / 10)
    assert runs.record()["model_busy_after_first_song"] == pytest.approx(9 / 10)


def test_records_on_an_object_store_are_read_many_at_once(tmp_path, monkeypatch):
    """OUTPUT on an asynchronous fsspec filesystem (s3fs and gcsfs are; here fsspec's own
    wrapper of the local disk, each read taking 20 ms as a request does): a rerun reads the
    songs' records many at a time (`READ_AT_ONCE` a call: 16 here), not one request after the
    other; the runs' records too."""
    import asyncio
    import types

    import fsspec
    from fsspec.asyn import AsyncFileSystem
    from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

    from serve_graph.batch.output import BatchOutput

    class SlowStore(AsyncFileSystemWrapper):
        """The wrapper's methods run the local disk's on threads; `cat` of many paths is
        fsspec's asynchronous one (as s3fs has it), over a `cat_file` that waits first."""
        protocol = "slowstore"
        in_flight = most = 0

        def __init__(self, *args, **kwargs):
            super().__init__(fsspec.filesystem("file"), *args, **kwargs)
            self._cat = types.MethodType(AsyncFileSystem._cat, self)
            self._read_file, self._cat_file = self._cat_file, self._slow_cat_file

        async def _slow_cat_file(self, path, *args, **kwargs):
            SlowStore.in_flight += 1
            SlowStore.most = max(SlowStore.most, SlowStore.in_flight)
            try:
                await asyncio.sleep(0.02)
                return await self._read_file(path, *args, **kwargs)
            finally:
                SlowStore.in_flight -= 1

    fsspec.register_implementation("slowstore", SlowStore, clobber=True)
    from serve_graph.batch import output as output_module
    monkeypatch.setattr(output_module, "READ_AT_ONCE", 16)
    output = BatchOutput(f"file://{tmp_path}")
    output.start({"options": {}})
    for index in range(40):
        output.record({"song_id": f"album/{index}", "status": "done"})
    output.record_run({"started_at": 1.0})
    output.record_run({"started_at": 2.0})
    store = BatchOutput(f"slowstore://{tmp_path}")
    assert sorted(store.records()) == sorted(f"album/{index}" for index in range(40))
    assert SlowStore.most >= 8
    assert [run["started_at"] for run in store.runs()] == [1.0, 2.0]
