"""How a batch of windows goes through the model on an accelerator.

- `HTDemucsCore`: HTDemucs' inner network (normalisation, encoders, cross-transformer, decoders)
  on real tensors of a fixed shape, split from the spectral transforms, which stay eager and
  in float32. This is what `torch.compile` compiles (the STFT's complex tensors stay outside).
- `Spectral`: HTDemucs' STFT and iSTFT without host round trips, the same on CPU and CUDA.
- `SplitForward`: STFT -> core -> iSTFT, the same function as `HTDemucs.forward` in eval.
- `CudaGraphs`: the core captured once per batch size ("bucket": 1, 2, 4, multiples of 8 to
  64, of 32 beyond) at start-up and replayed; a batch is cut into bucket-sized pieces, the
  last padded up to its bucket, so no request ever waits on a capture.
- `BatchLimit`: the largest batch that fits in device memory, measured at start-up, halved when
  an out-of-memory error happens anyway (the batch is then retried in smaller pieces).

Shapes: windows `[B, C, L]` (C audio channels, L samples at the model rate) -> stems
`[B, S, C, L]` (S sources), float32.
"""
import logging
import math
import typing as tp

import torch as th
import torch.nn.functional as F
from demucs.htdemucs import HTDemucs
from demucs.transformer import create_2d_sin_embedding

logger = logging.getLogger(__name__)



class HalfGroupNorm(th.nn.Module):
    """`nn.GroupNorm` for autocast: a half-precision input is normalised in its own dtype
    (PyTorch's group-norm kernels accumulate the mean and variance in fp32 for bf16/fp16 input)
    and stays half, where autocast would upcast it to fp32 and hand fp32 to the GELU/GLU and
    the next convolution (which casts it back). In HTDemucs' DConv branches (1x1 conv to 96
    channels, GroupNorm(1, 96), GELU/GLU, LayerScale) those fp32 copies are most of the bytes.
    An fp32 input is `nn.GroupNorm`'s own computation: bit-identical. Shapes: `[B, C, ...]`."""

    def __init__(self, norm: th.nn.GroupNorm):
        super().__init__()
        self.norm = norm

    def forward(self, x: th.Tensor) -> th.Tensor:
        norm = self.norm
        if x.dtype == th.float32:
            return norm(x)
        with th.autocast(x.device.type, enabled=False):
            weight = None if norm.weight is None else norm.weight.to(x.dtype)
            bias = None if norm.bias is None else norm.bias.to(x.dtype)
            return F.group_norm(x, norm.num_groups, weight, bias, norm.eps)


def use_half_group_norm(model: th.nn.Module) -> int:
    """Wrap every `nn.GroupNorm` of `model` (exactly that class: Demucs' transformer norms,
    which transpose first, stay) in `HalfGroupNorm`; returns how many."""
    count = 0
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is th.nn.GroupNorm:
                setattr(module, name, HalfGroupNorm(child))
                count += 1
    return count


def graph_safe(model: th.nn.Module) -> bool:
    """True when every forward of `model` computes the same function, so that a captured or
    compiled forward may stand for it: an HTDemucs in eval whose cross-transformer draws no
    random positional shift (`t_sin_random_shift == 0`, as in every pretrained htdemucs)."""
    if not isinstance(model, HTDemucs) or model.training or not model.use_train_segment:
        return False
    transformer = model.crosstransformer
    return transformer is None or getattr(transformer, "sin_random_shift", 0) == 0


class HTDemucsCore(th.nn.Module):
    """The real-valued inner network of an HTDemucs in eval, lines 540-626 and 657 of
    `demucs.htdemucs.HTDemucs.forward`: `(mag [B, 2C, F, T], mix [B, C, L])` ->
    `(spectrogram estimate [B, S, 2C, F, T], waveform estimate [B, S, C, L])`."""

    def __init__(self, model: HTDemucs):
        super().__init__()
        self.model = model
        self._embeddings: tp.Dict[tuple, th.Tensor] = {}

    def forward(self, mag: th.Tensor, mix: th.Tensor) -> tp.Tuple[th.Tensor, th.Tensor]:
        m = self.model
        B, _, Fq, T = mag.shape
        mean = mag.mean(dim=(1, 2, 3), keepdim=True)
        std = mag.std(dim=(1, 2, 3), keepdim=True)
        x = (mag - mean) / (1e-5 + std)
        meant = mix.mean(dim=(1, 2), keepdim=True)
        stdt = mix.std(dim=(1, 2), keepdim=True)
        xt = (mix - meant) / (1e-5 + stdt)
        saved, saved_t, lengths, lengths_t = [], [], [], []
        for idx, encode in enumerate(m.encoder):
            lengths.append(x.shape[-1])
            inject = None
            if idx < len(m.tencoder):
                lengths_t.append(xt.shape[-1])
                tenc = m.tencoder[idx]
                xt = tenc(xt)
                if not tenc.empty:
                    saved_t.append(xt)
                else:
                    inject = xt
            x = encode(x, inject)
            if idx == 0 and m.freq_emb is not None:
                frs = th.arange(x.shape[-2], device=x.device)
                emb = m.freq_emb(frs).t()[None, :, :, None].expand_as(x)
                x = x + m.freq_emb_scale * emb
            saved.append(x)
        if m.crosstransformer:
            x, xt = self._cross(x, xt)
        for idx, decode in enumerate(m.decoder):
            x, pre = decode(x, saved.pop(-1), lengths.pop(-1))
            offset = m.depth - len(m.tdecoder)
            if idx >= offset:
                tdec = m.tdecoder[idx - offset]
                length_t = lengths_t.pop(-1)
                if tdec.empty:
                    xt, _ = tdec(pre[:, :, 0], None, length_t)
                else:
                    xt, _ = tdec(xt, saved_t.pop(-1), length_t)
        S = len(m.sources)
        x = x.view(B, S, -1, Fq, T).float() * std[:, None] + mean[:, None]
        xt = xt.view(B, S, -1, mix.shape[-1]).float() * stdt[:, None] + meant[:, None]
        return x, xt

    def _cross(self, x: th.Tensor, xt: th.Tensor) -> tp.Tuple[th.Tensor, th.Tensor]:
        m = self.model
        if m.bottom_channels:
            b, c, f, t = x.shape
            x = m.channel_upsampler(x.reshape(b, c, f * t)).reshape(b, -1, f, t)
            xt = m.channel_upsampler_t(xt)
        x, xt = self._crosstransformer(x, xt)
        if m.bottom_channels:
            b, c, f, t = x.shape
            x = m.channel_downsampler(x.reshape(b, c, f * t)).reshape(b, -1, f, t)
            xt = m.channel_downsampler_t(xt)
        return x, xt

    def _crosstransformer(self, x: th.Tensor, xt: th.Tensor) -> tp.Tuple[th.Tensor, th.Tensor]:
        """`CrossTransformerEncoder.forward` (demucs/transformer.py) with its 2-D positional
        embedding kept on the device (`_embedding_2d`): Demucs builds it on the CPU and copies
        it over on every call, which a CUDA graph cannot capture. `x [B, C, Fr, T1]`,
        `xt [B, C, T2]` in and out."""
        t = self.model.crosstransformer
        B, C, Fr, T1 = x.shape
        x = t.norm_in(x.permute(0, 3, 2, 1).reshape(B, T1 * Fr, C))  # b (t1 fr) c
        x = x + t.weight_pos_embed * self._embedding_2d(C, Fr, T1, x.device, t.max_period)
        _, Ct, T2 = xt.shape
        pos_emb = t._get_pos_embedding(T2, B, Ct, x.device).permute(1, 0, 2)  # b t2 c
        xt = t.norm_in_t(xt.transpose(1, 2))
        xt = xt + t.weight_pos_embed * pos_emb
        for idx in range(t.num_layers):
            if idx % 2 == t.classic_parity:
                x = t.layers[idx](x)
                xt = t.layers_t[idx](xt)
            else:
                old_x = x
                x = t.layers[idx](x, xt)
                xt = t.layers_t[idx](xt, old_x)
        return x.reshape(B, T1, Fr, C).permute(0, 3, 2, 1), xt.transpose(1, 2)

    def _embedding_2d(self, channels: int, height: int, width: int, device: th.device,
                      max_period: float) -> th.Tensor:
        """`create_2d_sin_embedding` as `[1, width * height, channels]` on `device`, made once
        per shape (by the warm-up runs, before any capture sees it). Kept out of
        `torch.compile`'s graph (`compile_core`): its cache is Python state."""
        key = (channels, height, width, str(device), max_period)
        if key not in self._embeddings:
            pe = create_2d_sin_embedding(channels, height, width, "cpu", max_period)
            self._embeddings[key] = pe.permute(0, 3, 2, 1).reshape(
                1, width * height, channels).to(device)
        return self._embeddings[key]


class Spectral:
    """`HTDemucs._spec` and `HTDemucs._ispec` (with `demucs.spec.spectro`/`ispectro`), the same
    arithmetic without host round trips: Demucs builds the Hann window on the CPU and copies it
    to the device on every call, and `pad1d` asserts by reading the padded tensor back to the
    host. Here the window lives on the device and the reflect padding is plain `F.pad` (what
    `pad1d` does for windows longer than the padding)."""

    def __init__(self, model: HTDemucs, device: th.device):
        self.hop, self.nfft = model.hop_length, model.nfft
        assert self.hop == self.nfft // 4
        self.window = th.hann_window(self.nfft, device=device)

    def spec(self, x: th.Tensor) -> th.Tensor:
        """Windows `[B, C, L]` -> complex spectrogram `[B, C, nfft / 2, ceil(L / hop)]`."""
        length = x.shape[-1]
        frames = math.ceil(length / self.hop)
        pad = self.hop // 2 * 3
        x = F.pad(x, (pad, pad + frames * self.hop - length), mode="reflect")
        *other, padded = x.shape
        z = th.stft(x.reshape(-1, padded), self.nfft, self.hop,
                    window=self.window.to(x.dtype), win_length=self.nfft, normalized=True,
                    center=True, return_complex=True, pad_mode="reflect")
        z = z.view(*other, *z.shape[-2:])[..., :-1, :]
        return z[..., 2:2 + frames]

    def ispec(self, z: th.Tensor, length: int) -> th.Tensor:
        """Complex spectrogram `[..., nfft / 2, T]` -> waveform `[..., length]`.

        The imaginary part of the DC bin is set to zero first: a real signal has none, the
        model's estimate does. The CPU's FFT ignores it, cuFFT does not (its inverse real FFT
        assumes a Hermitian input), so Demucs' own output on CUDA differs from the CPU's by
        about -32 dB (full-size htdemucs, random weights, measured on an H100). Zeroed, both
        devices compute what the CPU computes."""
        z = F.pad(F.pad(z, (0, 0, 0, 1)), (2, 2))  # a new tensor: the Nyquist row is zero
        z.imag[..., 0, :] = 0
        pad = self.hop // 2 * 3
        padded = self.hop * math.ceil(length / self.hop) + 2 * pad
        *other, freqs, frames = z.shape
        x = th.istft(z.reshape(-1, freqs, frames), self.nfft, self.hop,
                     window=self.window.to(z.real.dtype), win_length=self.nfft,
                     normalized=True, length=padded, center=True)
        return x.view(*other, padded)[..., pad:pad + length]


class SplitForward:
    """`HTDemucs.forward` in eval for windows `mix [B, C, L]` (L = the training length) ->
    stems `[B, S, C, L]` float32, split in three: the STFT (`Spectral`, float32, eager), the
    inner network `inner(mag, mix) -> (x, xt)` (an `HTDemucsCore` under autocast, compiled or
    not) and the iSTFT. `graphs`, once captured, replays `inner` for the batch sizes it holds:
    the inner network is where the kernels are many and small; the STFT and iSTFT are a few
    cuFFT calls, and `torch.istft` reads a value back to check the window, which no CUDA graph
    can hold."""

    def __init__(self, model: HTDemucs, inner: tp.Callable, device: th.device):
        self.model, self.inner = model, inner
        self.spectral = Spectral(model, device)
        self.graphs: tp.Optional["CudaGraphs"] = None

    def __call__(self, mix: th.Tensor) -> th.Tensor:
        z = self.spectral.spec(mix)
        mag = self.model._magnitude(z).to(mix.dtype)
        graphs = self.graphs
        inner = graphs if graphs is not None and mix.shape[0] in graphs.graphs else self.inner
        x, xt = inner(mag, mix)
        return xt.float() + self.spectral.ispec(self.model._mask(z, x.float()), mix.shape[-1])

    def example(self, size: int, channels: int, length: int) -> tp.Tuple[th.Tensor, th.Tensor]:
        """`inner`'s inputs `(mag, mix)` for `size` windows of noise, on the device."""
        mix = th.randn(size, channels, length, device=self.spectral.window.device)
        return self.model._magnitude(self.spectral.spec(mix)).to(mix.dtype), mix

    def capture(self, buckets: tp.Iterable[int], channels: int, length: int) -> "CudaGraphs":
        """Capture `inner` for `buckets`; a capture that fails leaves no graphs."""
        self.graphs = None  # frees earlier graphs' memory before capturing again
        self.graphs = CudaGraphs(self.inner, buckets,
                                 lambda size: self.example(size, channels, length),
                                 self.spectral.window.device)
        return self.graphs


class CudaGraphs:
    """`forward(*inputs) -> outputs` (tuples of tensors) captured as one CUDA graph per batch
    size in `buckets`, sharing one memory pool; `example(size)` gives inputs of each size.
    `__call__` copies inputs of a bucket's size into the graph's static inputs, replays it and
    returns its static outputs: read them before the next call."""

    def __init__(self, forward: tp.Callable[..., tp.Tuple[th.Tensor, ...]],
                 buckets: tp.Iterable[int],
                 example: tp.Callable[[int], tp.Tuple[th.Tensor, ...]], device: th.device):
        self.pool = th.cuda.graph_pool_handle()
        self.graphs: tp.Dict[int, tp.Tuple[th.cuda.CUDAGraph, tuple, tuple]] = {}
        for size in sorted(set(buckets), reverse=True):  # the largest first: the pool fits all
            with th.inference_mode():
                static_in = example(size)
            side = th.cuda.Stream(device)
            side.wait_stream(th.cuda.current_stream(device))
            with th.cuda.stream(side), th.inference_mode():
                for _ in range(2):  # cuDNN/cuFFT plans and autotuning before the capture
                    forward(*static_in)
            th.cuda.current_stream(device).wait_stream(side)
            graph = th.cuda.CUDAGraph()
            with th.cuda.graph(graph, pool=self.pool), th.inference_mode():
                static_out = forward(*static_in)
            self.graphs[size] = (graph, static_in, static_out)

    @property
    def buckets(self) -> tp.List[int]:
        return sorted(self.graphs)

    def __call__(self, *inputs: th.Tensor) -> tp.Tuple[th.Tensor, ...]:
        graph, static_in, static_out = self.graphs[inputs[0].shape[0]]
        for target, value in zip(static_in, inputs):
            target.copy_(value, non_blocking=True)
        graph.replay()
        return static_out


# Batch sizes captured as CUDA graphs: 1, 2, 4, every multiple of 8 up to 64, then of 32 up to
# the limit (each capture costs start-up, likely cuDNN timing each new shape). A batch is padded up
# to the next one: at most 7 windows wasted up to 64, where a lone song's windows fall (37 for
# 216 s), where cutting 37 windows into 32 + 4 + 1 replays cost an H100 526 ms against eager's
# 375 ms for the 37 at once (bf16; small batches leave most of the GPU idle). vLLM captures its
# decoder likewise (1, 2, 4, then multiples of 8)
FINE_STEP, FINE_UP_TO, COARSE_STEP = 8, 64, 32


def bucket_sizes(limit: int) -> tp.List[int]:
    """The batch sizes to capture for batches of at most `limit` windows:
    `bucket_sizes(20) == [1, 2, 4, 8, 16, 20]`, `bucket_sizes(160)` ends `..., 56, 64, 96,
    128, 160`."""
    limit = max(limit, 1)
    small = [size for size in (1, 2, 4) if size < limit]
    fine = list(range(FINE_STEP, min(limit, FINE_UP_TO + 1), FINE_STEP))
    coarse = list(range(FINE_UP_TO + COARSE_STEP, limit, COARSE_STEP))
    return small + fine + coarse + [limit]


def bucket_pieces(count: int, buckets: tp.Sequence[int]) -> tp.List[tp.Tuple[int, int]]:
    """`(bucket, windows)` pieces covering `count` windows: the largest bucket while more are
    left than it holds, then the rest padded up to the smallest bucket that holds it (`windows`
    <= `bucket`; only the last piece is padded)."""
    largest = max(buckets)
    pieces = [(largest, largest)] * (count // largest)
    rest = count - largest * len(pieces)
    if rest:
        pieces.append((min(b for b in buckets if b >= rest), rest))
    return pieces


# How libraries below PyTorch say they ran out of device memory (cuFFT plans, cuDNN and cuBLAS
# workspaces), besides PyTorch's own OutOfMemoryError
_OUT_OF_MEMORY = ("out of memory", "cufft_alloc_failed", "cudnn_status_alloc_failed",
                  "cublas_status_alloc_failed")


def is_out_of_memory(exc: BaseException) -> bool:
    message = str(exc).lower()
    return isinstance(exc, th.OutOfMemoryError) or any(s in message for s in _OUT_OF_MEMORY)


class BatchLimit:
    """The most windows one forward may take. Starts at `limit`; `halve()` after an
    out-of-memory error (never below 1)."""

    def __init__(self, limit: int):
        self.limit = max(int(limit), 1)
        self.halvings = 0

    def halve(self) -> int:
        if self.limit == 1:
            raise RuntimeError("out of memory with a single window: the model does not fit")
        self.limit = max(self.limit // 2, 1)
        self.halvings += 1
        logger.warning("out of memory: batches now hold at most %d windows", self.limit)
        return self.limit


def run_with_backoff(forward: tp.Callable[[th.Tensor], th.Tensor], inputs: th.Tensor,
                     limit: BatchLimit, on_oom: tp.Callable[[], None] = lambda: None
                     ) -> tp.List[th.Tensor]:
    """`forward` over `inputs [B, ...]` in pieces of at most `limit.limit` windows; a piece that
    runs out of memory halves the limit and is retried in smaller pieces (after `on_oom()`,
    which frees cached memory). Returns the outputs of the pieces, in order."""
    outputs: tp.List[th.Tensor] = []
    start = 0
    while start < inputs.shape[0]:
        size = min(limit.limit, inputs.shape[0] - start)
        try:
            outputs.append(forward(inputs[start:start + size]))
        except Exception as exc:  # noqa: BLE001 (only out-of-memory errors are handled)
            if not is_out_of_memory(exc):
                raise
            on_oom()
            limit.halve()
            continue
        start += size
    return outputs


def window_memory(forward: tp.Callable[[th.Tensor], th.Tensor], channels: int, length: int,
                  device: th.device) -> tp.Tuple[int, int]:
    """`(fixed, per_window)` bytes of device memory a forward needs, from the peaks of a batch
    of 1 and a batch of 2 windows (CUDA only). Where 2 windows do not fit, all of the first
    window's peak counts as per-window memory."""
    peaks = []
    for size in (1, 2):
        th.cuda.synchronize(device)
        th.cuda.empty_cache()
        th.cuda.reset_peak_memory_stats(device)
        base = th.cuda.memory_allocated(device)
        try:
            with th.inference_mode():
                forward(th.randn(size, channels, length, device=device))
            th.cuda.synchronize(device)
        except Exception as exc:  # noqa: BLE001
            if size == 1 or not is_out_of_memory(exc):
                raise
            th.cuda.empty_cache()
            return 0, peaks[0]
        peaks.append(th.cuda.max_memory_allocated(device) - base)
    per_window = max(peaks[1] - peaks[0], 1)
    return max(peaks[0] - per_window, 0), per_window


def memory_limit(fixed: int, per_window: int, free: int, fraction: float, ceiling: int) -> int:
    """The batch size that keeps `fixed + size * per_window` within `fraction` of `free` bytes,
    between 1 and `ceiling`."""
    fits = int((free * fraction - fixed) // per_window)
    return max(1, min(ceiling, fits))


def compile_core(core: HTDemucsCore, backend: str = "inductor",
                 mode: tp.Optional[str] = None) -> tp.Callable:
    """`torch.compile` of the inner network, batch size dynamic so that one compilation serves
    every bucket. Inductor's caches live in TORCHINDUCTOR_CACHE_DIR (set it to a persistent
    folder): a restart then loads the compiled kernels instead of compiling them again.
    `torch._dynamo` is imported here, not with this module: it costs ~1 s of every process's
    start-up, and only compiling needs it."""
    core._embedding_2d = th._dynamo.disable(core._embedding_2d)  # type: ignore[method-assign]
    compiled = th.compile(core, backend=backend, mode=mode)

    def forward(mag: th.Tensor, mix: th.Tensor):
        mag, mix = canonical(mag), canonical(mix)
        th._dynamo.maybe_mark_dynamic(mag, 0)
        th._dynamo.maybe_mark_dynamic(mix, 0)
        return compiled(mag, mix)
    return forward


def canonical(tensor: th.Tensor) -> th.Tensor:
    """`tensor` as the compiled network's guards expect every input: contiguous, at the start
    of its storage, and an inference tensor when inference mode is on (a copy where it is not
    one already). Without this, a request's windows (a piece of a larger batch, at an offset
    into its storage; tensors made outside inference mode) failed the guards of what was
    compiled at start-up, and each new kind was compiled again on the request's path."""
    if (tensor.is_contiguous() and tensor.storage_offset() == 0 and
            tensor.is_inference() == th.is_inference_mode_enabled()):
        return tensor
    return tensor.clone(memory_format=th.contiguous_format)
