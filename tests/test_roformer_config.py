"""RoFormer configs as MSST/UVR ship them (`<name>.yaml` beside `<name>.ckpt`): read safely
(`!!python/tuple` only), every model flag honoured, accepted as training-only or refused by
name, the sections checked against each other. The YAMLs here are written for the tests in the
shape of the published ones (viperx's BS-RoFormer ep_317, Kim's Mel-Band RoFormer vocals)."""
import pytest

from serve_graph.engine.roformer_config import RoformerConfigError, read_config

# viperx BS-RoFormer ep_317's band layout: 62 bands over the 1025 bins of a 2048-point STFT
VIPERX_BANDS = [2] * 24 + [4] * 12 + [12] * 8 + [24] * 8 + [48] * 8 + [128, 129]


def bs_yaml(extra_model: str = "", bands=VIPERX_BANDS, training: str = None) -> str:
    tuple_lines = "\n".join(f"    - {width}" for width in bands)
    training = training or "  instruments:\n  - vocals\n  - other\n  target_instrument: vocals\n"
    return f"""audio:
  chunk_size: 352800
  num_channels: 2
  sample_rate: 44100
model:
  dim: 512
  depth: 12
  stereo: true
  num_stems: 1
  time_transformer_depth: 1
  freq_transformer_depth: 1
  linear_transformer_depth: 0
  freqs_per_bands: !!python/tuple
{tuple_lines}
  dim_head: 64
  heads: 8
  attn_dropout: 0.1
  ff_dropout: 0.1
  flash_attn: true
  dim_freqs_in: 1025
  stft_n_fft: 2048
  stft_hop_length: 441
  stft_win_length: 2048
  stft_normalized: false
  mask_estimator_depth: 2
  multi_stft_resolution_loss_weight: 1.0
  multi_stft_resolutions_window_sizes: !!python/tuple
  - 4096
  - 2048
  multi_stft_hop_size: 147
  multi_stft_normalized: False
{extra_model}training:
{training}inference:
  batch_size: 4
  num_overlap: 2
"""


MEL_YAML = """audio:
  chunk_size: 352800
  num_channels: 2
  sample_rate: 44100
model:
  dim: 384
  depth: 6
  stereo: true
  num_stems: 1
  time_transformer_depth: 1
  freq_transformer_depth: 1
  num_bands: 60
  dim_head: 64
  heads: 8
  attn_dropout: 0
  ff_dropout: 0
  flash_attn: True
  dim_freqs_in: 1025
  sample_rate: 44100
  stft_n_fft: 2048
  stft_hop_length: 441
  stft_win_length: 2048
  stft_normalized: False
  mask_estimator_depth: 2
training:
  instruments:
  - vocals
  - other
  target_instrument: vocals
inference:
  num_overlap: 4
"""


def write(tmp_path, text, name="model.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_bs_roformer_config_reads_with_msst_defaults_filled_in(tmp_path):
    config = read_config(write(tmp_path, bs_yaml()))
    assert (config.family, config.dim, config.chunk_size, config.samplerate) == (
        "bs_roformer", 512, 352800, 44100)
    arch = config.architecture
    assert arch["depth"] == 12 and arch["freqs_per_bands"] == tuple(VIPERX_BANDS)
    assert arch["zero_dc"] is True and arch["skip_connection"] is False  # MSST's defaults
    assert arch["mlp_expansion_factor"] == 4 and arch["stft_hop_length"] == 441
    assert config.sources == ("vocals", "instrumental") and config.num_overlap == 2
    assert config.channels == 2


def test_a_mel_band_roformer_config_reads(tmp_path):
    config = read_config(write(tmp_path, MEL_YAML))
    assert config.family == "mel_band_roformer" and config.architecture["num_bands"] == 60
    assert config.architecture["sample_rate"] == 44100 and config.num_overlap == 4
    assert "freqs_per_bands" not in config.architecture


def test_a_multi_stem_model_gives_its_instruments(tmp_path):
    training = ("  instruments:\n  - bass\n  - drums\n  - other\n  - vocals\n"
                "  target_instrument: null\n")
    text = bs_yaml(training=training).replace("num_stems: 1", "num_stems: 4")
    assert read_config(write(tmp_path, text)).sources == ("bass", "drums", "other", "vocals")
    with pytest.raises(RoformerConfigError, match="num_stems 4 but training.instruments names 2"):
        two = "  instruments:\n  - vocals\n  - other\n"
        read_config(write(tmp_path, bs_yaml(training=two).replace("num_stems: 1",
                                                                  "num_stems: 4")))


def test_python_tags_other_than_tuple_are_refused_unrun(tmp_path):
    marker = tmp_path / "ran"
    text = bs_yaml(f"  evil: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(RoformerConfigError, match="not a config this project reads safely"):
        read_config(write(tmp_path, text))
    assert not marker.exists()


@pytest.mark.parametrize("extra,message", [
    ("  sage_attention: true\n", "keys this project does not know for bs_roformer: "
                                 "sage_attention"),
    ("  num_bands: 60\n", "exactly one of freqs_per_bands"),
])
def test_unknown_or_contradictory_model_keys_are_refused_by_name(tmp_path, extra, message):
    with pytest.raises(RoformerConfigError, match=message):
        read_config(write(tmp_path, bs_yaml(extra)))


@pytest.mark.parametrize("old,new,message", [
    ("linear_transformer_depth: 0", "linear_transformer_depth: 1",
     "linear_transformer_depth: 1` is not supported"),
    ("stft_normalized: false", "stft_normalized: false\n  use_pope: true",
     "use_pope: True` is not supported"),
    ("dim_freqs_in: 1025", "dim_freqs_in: 1024", "dim_freqs_in 1024 is not"),
    ("num_channels: 2", "num_channels: 1", "num_channels 1 but model.stereo is True"),
    ("  depth: 12\n", "", "lacks depth"),
    ("dim: 512", "dim: wide", "dim must be an integer"),
    ("sample_rate: 44100", "sample_rate: 48000", "sample rate must be 44100 Hz"),
    ("stereo: true", "stereo: false", "stereo: False` is not supported"),
    ("  num_overlap: 2", "  num_overlap: 2\n  normalize: true", "normalize: True` is not"),
    ("  target_instrument: vocals", "  target_instrument: vocals\n  x: 1", None),
])
def test_what_this_project_would_run_wrongly_is_refused_by_name(tmp_path, old, new, message):
    text = bs_yaml()
    assert old in text
    if message is None:  # the training section's other keys are MSST's business
        read_config(write(tmp_path, text.replace(old, new, 1)))
        return
    with pytest.raises(RoformerConfigError, match=message):
        read_config(write(tmp_path, text.replace(old, new, 1)))


def test_bands_must_cover_the_stft_bins_and_a_target_must_be_named(tmp_path):
    with pytest.raises(RoformerConfigError, match="add up to 1024, not the STFT's 1025 bins"):
        read_config(write(tmp_path, bs_yaml(bands=VIPERX_BANDS[:-1] + [128])))
    with pytest.raises(RoformerConfigError, match="needs training.target_instrument"):
        read_config(write(tmp_path, bs_yaml(training="  instruments:\n  - vocals\n")))
    with pytest.raises(RoformerConfigError, match="num_stems 2 with training.target_instrument"):
        read_config(write(tmp_path, bs_yaml().replace("num_stems: 1", "num_stems: 2")))
    with pytest.raises(RoformerConfigError, match="chunk_size 352801 is not a multiple of "):
        read_config(write(tmp_path, MEL_YAML.replace("352800", "352801")))
    inference_chunk = MEL_YAML.replace("  num_overlap: 4", "  num_overlap: 4\n  chunk_size: 44100")
    assert read_config(write(tmp_path, inference_chunk)).chunk_size == 44100
    with pytest.raises(RoformerConfigError, match="cannot read it"):
        read_config(tmp_path / "absent.yaml")
