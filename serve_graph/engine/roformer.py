"""BS-RoFormer (Lu et al., arXiv 2309.02612) and Mel-Band RoFormer (Wang et al., arXiv
2310.01809), written here with the module layout, parameter names and config semantics of
MSST's `models/bs_roformer/{bs_roformer,mel_band_roformer}.py`, so that MSST's and UVR's
`.ckpt` state dicts load strictly.

A forward maps windows `[B, C, L]` (C = 2 for a stereo model, L samples at 44.1 kHz) to the
model's stems `[B, N, C, L']` (N = `num_stems`; L' = L for BS-RoFormer, the STFT's
`hop * (L // hop)` for Mel-Band RoFormer, as MSST's istft without a length gives it):

1. STFT per channel (Hann window of `stft_win_length`), real and imaginary parts as features;
   channels interleaved into the frequency axis (`(f s)`: bin-major, channel-minor);
2. band split: bands of bins (BS: consecutive `freqs_per_bands`; Mel: the supports of
   `num_bands` mel filters, which overlap), each RMS-normalised and projected to `dim`;
3. `depth` blocks of a time transformer (over frames, per band) then a frequency transformer
   (over bands, per frame), with rotary positions, gated attention and GELU feed-forwards;
4. per stem a mask estimator: one MLP per band (Tanh hidden layers, GLU out) giving a complex
   mask for the band's bins (Mel: masks of a bin averaged over the bands that hold it);
5. mask times the mixture's STFT, the DC bin zeroed (`zero_dc`), inverse STFT.

Inference only: the dropouts are identities (kept in place so that the indices of the
`nn.Sequential`s, and so the state dict's names, are MSST's). The config comes from
`roformer_config.RoformerConfig`; its keys are checked there.
"""
import math
import typing as tp
from fractions import Fraction

import numpy as np
import torch as th
import torch.nn.functional as F
from torch import nn

from .roformer_config import RoformerConfig


class RMSNorm(nn.Module):
    """`x / ||x|| * sqrt(dim) * gamma` over the last axis."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(th.ones(dim))

    def forward(self, x: th.Tensor) -> th.Tensor:
        return F.normalize(x, dim=-1) * self.scale * self.gamma


class Rotary(nn.Module):
    """Rotary position embedding over the sequence axis (-2) of `[..., n, d]`, rotating
    interleaved pairs `(x[2i], x[2i+1])` by `position * freqs[i]`, `freqs[i] = 10000^(-2i/d)`
    (rotary-embedding-torch's convention). `freqs` is in the state dict, as MSST saves it."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("freqs", 1. / (10000 ** (th.arange(0, dim, 2)[:dim // 2].float()
                                                      / dim)))

    def _cos_sin(self, length: int, device: th.device) -> tp.Tuple[th.Tensor, th.Tensor]:
        positions = th.arange(length, device=device, dtype=th.float32)
        angles = (positions[:, None] * self.freqs.float()[None]).repeat_interleave(2, -1)
        return angles.cos(), angles.sin()

    def forward(self, x: th.Tensor) -> th.Tensor:
        cos, sin = self._cos_sin(x.shape[-2], x.device)
        pairs = x.unflatten(-1, (-1, 2))
        rotated = th.stack((-pairs[..., 1], pairs[..., 0]), -1).flatten(-2)
        return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    """Pre-norm multi-head attention with rotary positions and a sigmoid gate per head:
    `[b, n, dim]` -> `[b, n, dim]`."""

    def __init__(self, dim: int, heads: int, dim_head: int, rotary: Rotary):
        super().__init__()
        self.heads = heads
        self.norm = RMSNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_gates = nn.Linear(dim, heads)
        self.to_out = nn.Sequential(nn.Linear(heads * dim_head, dim, bias=False), nn.Identity())
        self.rotary_embed = rotary

    def forward(self, x: th.Tensor) -> th.Tensor:
        x = self.norm(x)
        b, n, _ = x.shape
        q, k, v = self.to_qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(self.rotary_embed(q), self.rotary_embed(k), v)
        out = out * self.to_gates(x).transpose(1, 2)[..., None].sigmoid()
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class FeedForward(nn.Module):
    """Pre-norm GELU MLP, `dim -> 4 dim -> dim`."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(RMSNorm(dim), nn.Linear(dim, dim * mult), nn.GELU(),
                                 nn.Identity(), nn.Linear(dim * mult, dim), nn.Identity())

    def forward(self, x: th.Tensor) -> th.Tensor:
        return self.net(x)


class Transformer(nn.Module):
    """`depth` residual (attention, feed-forward) pairs, then an RMS norm (Mel-Band RoFormer)
    or none (BS-RoFormer, which normalises once after all blocks)."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, rotary: Rotary,
                 norm_output: bool):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([Attention(dim, heads, dim_head, rotary), FeedForward(dim)])
            for _ in range(depth))
        self.norm = RMSNorm(dim) if norm_output else nn.Identity()

    def forward(self, x: th.Tensor) -> th.Tensor:
        for attention, feed_forward in self.layers:
            x = attention(x) + x
            x = feed_forward(x) + x
        return self.norm(x)


class BandSplit(nn.Module):
    """Features `[b, t, sum(widths)]` -> `[b, t, bands, dim]`: each band's slice normalised
    and projected."""

    def __init__(self, dim: int, widths: tp.Sequence[int]):
        super().__init__()
        self.widths = list(widths)
        self.to_features = nn.ModuleList(nn.Sequential(RMSNorm(width), nn.Linear(width, dim))
                                         for width in widths)

    def forward(self, x: th.Tensor) -> th.Tensor:
        return th.stack([project(part) for part, project in
                         zip(x.split(self.widths, dim=-1), self.to_features)], dim=-2)


def mlp(dim_in: int, dim_out: int, dim_hidden: int, hidden_layers: int) -> nn.Sequential:
    """Linear layers with Tanh between them: `hidden_layers` hidden layers of `dim_hidden`."""
    dims = (dim_in, *(dim_hidden,) * hidden_layers, dim_out)
    layers: tp.List[nn.Module] = []
    for index, (width_in, width_out) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(width_in, width_out))
        if index < len(dims) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


class MaskEstimator(nn.Module):
    """`[b, t, bands, dim]` -> `[b, t, sum(widths)]`: per band an MLP to twice its width and
    a GLU."""

    def __init__(self, dim: int, widths: tp.Sequence[int], hidden_layers: int,
                 expansion: int):
        super().__init__()
        self.to_freqs = nn.ModuleList(
            nn.Sequential(mlp(dim, 2 * width, dim * expansion, hidden_layers), nn.GLU(dim=-1))
            for width in widths)

    def forward(self, x: th.Tensor) -> th.Tensor:
        return th.cat([estimate(band) for band, estimate in
                       zip(x.unbind(dim=-2), self.to_freqs)], dim=-1)


def mel_band_support(num_bands: int, n_fft: int, samplerate: int) -> np.ndarray:
    """`[num_bands, n_fft // 2 + 1]` bool: the STFT bins where each filter of a Slaney mel
    filter bank (librosa's `filters.mel` defaults: 0 Hz to Nyquist, Slaney scale) is positive,
    with the first bin in the first band and the last in the last (as MSST forces them).
    Float64 throughout, as librosa computes the filters (`tests/test_roformer.py` holds the
    two equal)."""
    bins = np.fft.rfftfreq(n=n_fft, d=1. / samplerate)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.), _hz_to_mel(samplerate / 2.), num_bands + 2))
    widths = np.diff(edges)
    ramps = np.subtract.outer(edges, bins)
    support = np.zeros((num_bands, len(bins)), dtype=bool)
    for band in range(num_bands):
        rising, falling = -ramps[band] / widths[band], ramps[band + 2] / widths[band + 1]
        support[band] = np.minimum(rising, falling) > 0
    support[0, 0] = support[-1, -1] = True
    return support


_MEL_LINEAR_STEP = 200. / 3  # Hz per mel below 1 kHz (Slaney)
_MEL_LOG_STEP = math.log(6.4) / 27.  # log-Hz per mel above it


def _hz_to_mel(hz: tp.Union[float, np.ndarray]) -> np.ndarray:
    hz = np.asanyarray(hz, dtype=np.float64)
    mel = hz / _MEL_LINEAR_STEP
    high = hz >= 1000.
    return np.where(high, 1000. / _MEL_LINEAR_STEP
                    + np.log(np.maximum(hz, 1000.) / 1000.) / _MEL_LOG_STEP, mel)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    low_mels = 1000. / _MEL_LINEAR_STEP
    return np.where(mel >= low_mels, 1000. * np.exp(_MEL_LOG_STEP * (mel - low_mels)),
                    _MEL_LINEAR_STEP * mel)


class Roformer(nn.Module):
    """A BS-RoFormer or Mel-Band RoFormer as `config` describes it (`config.family`):
    `forward(windows [B, C, L]) -> stems [B, N, C, L']` (see the module's docstring)."""

    def __init__(self, config: RoformerConfig):
        super().__init__()
        arch = config.architecture
        self.config = config
        self.mel = config.family == "mel_band_roformer"
        self.channels = config.channels
        dim, heads, dim_head = config.dim, arch["heads"], arch["dim_head"]
        self.layers = nn.ModuleList()
        rotaries = (Rotary(dim_head), Rotary(dim_head))  # time, frequency: shared by depth
        for _ in range(arch["depth"]):
            self.layers.append(nn.ModuleList(
                Transformer(dim, arch[key], heads, dim_head, rotary, norm_output=self.mel)
                for key, rotary in zip(("time_transformer_depth", "freq_transformer_depth"),
                                       rotaries)))
        if not self.mel:
            self.final_norm = RMSNorm(dim)
        self.stft = dict(n_fft=arch["stft_n_fft"], hop_length=arch["stft_hop_length"],
                         win_length=arch["stft_win_length"], normalized=arch["stft_normalized"])
        self.register_buffer("window", th.hann_window(arch["stft_win_length"]),
                             persistent=False)
        widths = self._band_widths(arch)
        self.band_split = BandSplit(dim, widths)
        # MSST's BS-RoFormer MLP has depth - 1 hidden layers, its Mel-Band RoFormer's depth
        hidden_layers = arch["mask_estimator_depth"] - (0 if self.mel else 1)
        self.mask_estimators = nn.ModuleList(
            MaskEstimator(dim, widths, hidden_layers, arch["mlp_expansion_factor"])
            for _ in range(arch["num_stems"]))
        self.zero_dc, self.skip_connection = arch["zero_dc"], arch["skip_connection"]

    def _band_widths(self, arch: tp.Mapping[str, tp.Any]) -> tp.List[int]:
        """Features per band (real and imaginary parts of each bin of each channel). For Mel,
        registers which `(f s)` rows each band reads (`freq_indices`) and how many bands hold
        each bin (`bands_per_bin`)."""
        if not self.mel:
            return [2 * count * self.channels for count in arch["freqs_per_bands"]]
        support = th.from_numpy(mel_band_support(arch["num_bands"], arch["stft_n_fft"],
                                                 arch["sample_rate"]))
        bins = th.arange(support.shape[1]).expand_as(support)[support]
        rows = (bins[:, None] * self.channels + th.arange(self.channels)).flatten()
        self.register_buffer("freq_indices", rows, persistent=False)
        self.register_buffer("bands_per_bin", support.sum(0), persistent=False)
        return [2 * int(count) * self.channels for count in support.sum(1)]

    def window_gflop(self, length: int) -> float:
        """GFLOP of the matrix products of one forward on a window of `length` samples (what
        `torch.utils.flop_counter` counts: 2 per multiply-add; the STFTs, norms and
        element-wise work left out), from the shapes alone."""
        arch, dim = self.config.architecture, self.config.dim
        frames = length // arch["stft_hop_length"] + 1
        widths = self.band_split.widths
        bands, inner = len(widths), arch["heads"] * arch["dim_head"]
        tokens = bands * frames  # both transformers see every (band, frame) once
        layers = {key: arch["depth"] * arch[key]
                  for key in ("time_transformer_depth", "freq_transformer_depth")}
        per_token = dim * (3 * inner + arch["heads"]) + inner * dim + 8 * dim * dim
        macs = sum(layers.values()) * tokens * per_token
        macs += 2 * tokens * inner * (layers["time_transformer_depth"] * frames
                                      + layers["freq_transformer_depth"] * bands)
        macs += frames * dim * sum(widths)  # band split
        for estimator in self.mask_estimators:
            macs += frames * sum(layer.in_features * layer.out_features
                                 for band in estimator.to_freqs for layer in band[0]
                                 if isinstance(layer, nn.Linear))
        return 2 * macs / 1e9

    def forward(self, audio: th.Tensor) -> th.Tensor:
        batch, channels, length = audio.shape
        spec = th.stft(audio.reshape(batch * channels, length), **self.stft,
                       window=self.window.to(audio.dtype), return_complex=True)
        spec = spec.view(batch, channels, *spec.shape[1:]).transpose(1, 2).flatten(1, 2)
        features = spec[:, self.freq_indices] if self.mel else spec  # [b, (f s), t]
        x = self.band_split(th.view_as_real(features).permute(0, 2, 1, 3).flatten(2))
        x = self._blocks(x)
        if not self.mel:
            x = self.final_norm(x)
        masks = th.stack([estimate(x) for estimate in self.mask_estimators], dim=1)
        masks = th.view_as_complex(masks.unflatten(-1, (-1, 2)).float().contiguous())
        masks = masks.transpose(2, 3)  # [b, n, rows, t]
        if self.mel:
            masks = self._average_over_bands(masks, spec.shape[1])
        out = (spec[:, None] * masks).unflatten(2, (-1, channels))  # [b, n, f, s, t]
        out = out.transpose(2, 3).flatten(0, 2)  # [(b n s), f, t]
        if self.zero_dc:
            out = out.index_fill(1, th.tensor(0, device=out.device), 0.)
        audio_out = th.istft(out, **self.stft, window=self.window.to(audio.dtype),
                             length=None if self.mel else length)
        return audio_out.view(batch, -1, channels, audio_out.shape[-1])

    def _blocks(self, x: th.Tensor) -> th.Tensor:
        """The axial transformer blocks on `[b, t, bands, d]`."""
        batch, frames, bands, dim = x.shape
        outputs: tp.List[th.Tensor] = []
        for time_transformer, freq_transformer in self.layers:
            if self.skip_connection:
                for earlier in outputs:
                    x = x + earlier
            x = x.transpose(1, 2).reshape(batch * bands, frames, dim)
            x = time_transformer(x).view(batch, bands, frames, dim).transpose(1, 2)
            x = freq_transformer(x.reshape(batch * frames, bands, dim))
            x = x.view(batch, frames, bands, dim)
            if self.skip_connection:
                outputs.append(x)
        return x

    def _average_over_bands(self, masks: th.Tensor, rows: int) -> th.Tensor:
        """Band masks `[b, n, band rows, t]` -> the mask of each `(f s)` row `[b, n, rows, t]`:
        the mean of the bands' masks that cover it."""
        index = self.freq_indices[None, None, :, None].expand_as(masks)
        summed = masks.new_zeros((*masks.shape[:2], rows, masks.shape[-1]))
        summed.scatter_add_(2, index, masks)
        per_row = self.bands_per_bin.repeat_interleave(self.channels).clamp(min=1)
        return summed / per_row[:, None]


class RoformerSeparator(nn.Module):
    """A `Roformer` as the engine runs models (Demucs' interface): windows `[B, C, L]` ->
    stems `[B, S, C, L]` in the order of `sources` (`RoformerConfig.sources`). A one-target
    model's second stem is the rest, `instrumental` = window - target, as MSST's
    `--extract_instrumental` gives mix - target; overlap-added with the same weights, it is
    the mix minus the target's estimate."""

    def __init__(self, roformer: Roformer):
        super().__init__()
        config = roformer.config
        self.roformer = roformer
        self.sources = list(config.sources)
        self.samplerate, self.audio_channels = config.samplerate, config.channels
        self.segment = Fraction(config.chunk_size, config.samplerate)

    @property
    def config(self) -> RoformerConfig:
        return self.roformer.config

    def forward(self, mix: th.Tensor) -> th.Tensor:
        stems = self.roformer(mix)
        if stems.shape[1] < len(self.sources):
            stems = th.cat([stems, mix[:, None].to(stems.dtype) - stems], dim=1)
        return stems
