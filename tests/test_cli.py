"""`python -m serve_graph separate`, the local twin of POST /separate, run as a process."""
import os
import subprocess
import sys
import zipfile

import torch as th

from audio_files import decoded, encode, tone
from serve_graph.engine import ModelRunner, load_model, separate
from serve_graph.engine.output import prevent_clip


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "serve_graph", "separate", *map(str, args),
                           "--no-progress"], capture_output=True, text=True, timeout=300,
                          env=env)


def test_four_stems_mp3(tmp_path, tiny_repo):
    song = tmp_path / "song.mp3"
    song.write_bytes(encode(tone(2.5, 48000, 2), 48000, "mp3"))
    proc = run_cli(song, "--model-repo", tiny_repo)
    assert proc.returncode == 0, proc.stderr
    archive = zipfile.ZipFile(tmp_path / "song_stems.zip")
    assert archive.namelist() == ["drums.mp3", "bass.mp3", "other.mp3", "vocals.mp3"]
    expected = decoded(song.read_bytes()).shape[1]
    for name in archive.namelist():
        assert decoded(archive.read(name)).shape[1] == expected


def test_two_stems_wav_equals_engine(tmp_path, tiny_repo, tiny_model):
    song = tmp_path / "song.flac"
    song.write_bytes(encode(tone(1.7, 44100, 2, seed=5), 44100, "flac"))
    out = tmp_path / "stems.zip"
    proc = run_cli(song, "--model-repo", tiny_repo, "--two-stems", "vocals", "--wav",
                   "--shifts", "2", "--overlap", "0.5", "-o", out)
    assert proc.returncode == 0, proc.stderr
    archive = zipfile.ZipFile(out)
    assert archive.namelist() == ["vocals.wav", "no_vocals.wav"]
    stems = separate(ModelRunner(tiny_model, "cpu"), decoded(song.read_bytes()), shifts=2,
                     overlap=0.5, seed=0)
    vocals = decoded(archive.read("vocals.wav"))
    no_vocals = decoded(archive.read("no_vocals.wav"))
    assert th.allclose(vocals, prevent_clip(stems[3]), atol=2 / 2**15, rtol=0)
    assert th.allclose(no_vocals, prevent_clip(stems[0] + stems[1] + stems[2]), atol=3 / 2**15,
                       rtol=0)


def test_bad_input_and_bad_parameter_exit_2(tmp_path, tiny_repo):
    text = tmp_path / "notes.txt"
    text.write_text("not audio")
    proc = run_cli(text, "--model-repo", tiny_repo)
    assert proc.returncode == 2 and "not an audio file" in proc.stderr
    song = tmp_path / "song.wav"
    song.write_bytes(encode(tone(0.5, 44100, 2), 44100, "wav16"))
    proc = run_cli(song, "--model-repo", tiny_repo, "--mp3-bitrate", "999")
    assert proc.returncode == 2 and "mp3_bitrate" in proc.stderr


def test_model_arguments_that_cannot_run_exit_2_with_the_reason(tmp_path, tiny_repo):
    """--dconv triton on a CPU outside Triton's interpreter: one line saying why, exit 2, no
    archive written (the other refused combinations take the same path: `_runner_options`,
    and RunnerOptions' own tests in test_fused_dconv.py)."""
    song = tmp_path / "song.wav"
    song.write_bytes(encode(tone(0.5, 44100, 2), 44100, "wav16"))
    no_interpreter = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = run_cli(song, "--model-repo", tiny_repo, "--dconv", "triton", "--device", "cpu",
                   env=no_interpreter)
    assert proc.returncode == 2, proc.stderr
    assert "error: dconv 'triton' needs a CUDA device" in proc.stderr
    assert "Traceback" not in proc.stderr and not list(tmp_path.glob("*.zip"))


def test_six_source_model_stem_subset(tmp_path, tiny_repo):
    """The CLI takes its stem choices from the loaded model: a six-source model's guitar and
    piano, in the model's order, equal to the engine's stems."""
    song = tmp_path / "song.wav"
    song.write_bytes(encode(tone(1.5, 44100, 2, seed=3), 44100, "wav16"))
    out = tmp_path / "stems.zip"
    proc = run_cli(song, "--model", "tiny6s", "--model-repo", tiny_repo, "--stems",
                   "piano,guitar", "--format", "wav", "--wav-depth", "float32", "-o", out)
    assert proc.returncode == 0, proc.stderr
    archive = zipfile.ZipFile(out)
    assert archive.namelist() == ["guitar.wav", "piano.wav"]
    stems = separate(ModelRunner(load_model("tiny6s", tiny_repo), "cpu"),
                     decoded(song.read_bytes()), seed=0)
    for name, index in (("guitar.wav", 4), ("piano.wav", 5)):
        assert th.allclose(decoded(archive.read(name)), prevent_clip(stems[index]), atol=1e-6,
                           rtol=0), name
    refused = run_cli(song, "--model-repo", tiny_repo, "--stems", "guitar", "-o", out)
    assert refused.returncode == 2 and "guitar" in refused.stderr


def test_a_roformer_karaoke_remix_is_the_engines_instrumental(tmp_path, tiny_repo):
    """A RoFormer checkpoint by name from the model repo: the remix without its target is the
    instrumental (mix - vocals), as the engine makes it."""
    song = tmp_path / "song.wav"
    song.write_bytes(encode(tone(2.2, 44100, 2, seed=4), 44100, "wav16"))
    out = tmp_path / "karaoke.wav"
    proc = run_cli(song, "--model", "tinyroformer", "--model-repo", tiny_repo, "--remix",
                   "vocals=-inf", "--format", "wav", "--wav-depth", "float32", "--clip", "none",
                   "-o", out)
    assert proc.returncode == 0, proc.stderr
    stems = separate(ModelRunner(load_model("tinyroformer", tiny_repo), "cpu"),
                     decoded(song.read_bytes()))
    assert th.allclose(decoded(out.read_bytes()), stems[1], atol=1e-6, rtol=0)
