"""HTDemucs' DConv branch tail as two Triton kernels (a GPU lever, `RunnerOptions.dconv`).

Each DConv layer (Demucs' `demucs.demucs.DConv`) is `x + branch(x)` with `branch` =
dilated conv C->H, GroupNorm(1, H), GELU, **1x1 conv H->2C, GroupNorm(1, 2C), GLU, LayerScale**.
The tail in bold moves most of the branch's bytes in eager PyTorch: the 2C-channel conv output
is written, read for its statistics, read and written by the norm, read by the GLU, whose
C-channel output is read and written again by the LayerScale. H is small (C / 8: 6 to 48
channels in htdemucs), so the kernels here never write the 2C channels at all: they recompute
the 1x1 conv from the H-channel input wherever they need it.

- `_tile_statistics`: per sample and time tile, the count, mean and sum of squared deviations
  (M2) of the conv output over its 2C channels; the tiles are combined with Chan's formula
  (`combine_tiles`), so the variance is not a difference of large sums.
- `_normalise_glu_scale`: the conv again, normalised, GroupNorm's affine, GLU, LayerScale:
  only the C-channel result is written.

Reads: the H-channel input twice; writes: C channels once. The channel counts are compile-time
constants (one build per layer width: the loops over channels unroll; and Triton 3.6's
interpreter cannot loop over a runtime bound with NumPy 2.5). fp32 inputs are multiplied in IEEE
fp32 (no TF32); bf16/fp16 inputs on tensor cores, accumulated in fp32, as cuDNN does.
Tested for parity with Demucs' layers under Triton's CPU interpreter (`TRITON_INTERPRET=1`,
set before Triton is imported: `tests/conftest.py`), `tests/test_fused_dconv.py`.

Shapes: input `[N, H, T]`, 1x1 conv weight `[2C, H, 1]`, output `[N, C, T]`.
"""
import os
import typing as tp

import torch as th

import triton
import triton.language as tl

from .forward import HalfGroupNorm

# time steps per program (Triton's CPU interpreter runs one program at a time: longer tiles)
BLOCK_T = 4096 if os.environ.get("TRITON_INTERPRET") == "1" else 64
BLOCK_C = 32  # output channels per step of a program's loop


@triton.jit
def _conv_tile(h_ptr, w_ptr, b_ptr, n, rows, t, hidden, channels2, length,
               HIDDEN_P: tl.constexpr, IEEE: tl.constexpr):
    """The 1x1 conv's output rows `rows` at times `t` of sample n, fp32 `[rows, t]`."""
    k = tl.arange(0, HIDDEN_P)
    w = tl.load(w_ptr + rows[:, None] * hidden + k[None, :],
                mask=(rows[:, None] < channels2) & (k[None, :] < hidden), other=0.)
    x = tl.load(h_ptr + n * hidden * length + k[:, None] * length + t[None, :],
                mask=(k[:, None] < hidden) & (t[None, :] < length), other=0.)
    if IEEE:
        y = tl.dot(w, x, input_precision="ieee")
    else:
        y = tl.dot(w, x)
    return y + tl.load(b_ptr + rows, mask=rows < channels2, other=0.).to(tl.float32)[:, None]


@triton.jit
def _tile_statistics(h_ptr, w_ptr, b_ptr, count_ptr, mean_ptr, m2_ptr, hidden,
                     channels2: tl.constexpr, length, tiles, HIDDEN_P: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr, IEEE: tl.constexpr):
    n, tile = tl.program_id(0).to(tl.int64), tl.program_id(1)  # n * C * T may pass 2**31
    t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    in_time = t < length
    total = 0.
    for start in range(0, channels2, BLOCK_C):
        rows = start + tl.arange(0, BLOCK_C)
        y = _conv_tile(h_ptr, w_ptr, b_ptr, n, rows, t, hidden, channels2, length,
                       HIDDEN_P, IEEE)
        total += tl.sum(tl.where((rows[:, None] < channels2) & in_time[None, :], y, 0.))
    count = (tl.minimum(length - tile * BLOCK_T, BLOCK_T) * channels2).to(tl.float32)
    mean = total / count
    m2 = 0.
    for start in range(0, channels2, BLOCK_C):
        rows = start + tl.arange(0, BLOCK_C)
        y = _conv_tile(h_ptr, w_ptr, b_ptr, n, rows, t, hidden, channels2, length,
                       HIDDEN_P, IEEE)
        d = tl.where((rows[:, None] < channels2) & in_time[None, :], y - mean, 0.)
        m2 += tl.sum(d * d)
    tl.store(count_ptr + n * tiles + tile, count)
    tl.store(mean_ptr + n * tiles + tile, mean)
    tl.store(m2_ptr + n * tiles + tile, m2)


@triton.jit
def _normalised(y, rows, in_rows, mean, rstd, gamma_ptr, beta_ptr):
    """GroupNorm(1, 2C) of conv rows `rows`: normalised, then the rows' own affine."""
    gamma = tl.load(gamma_ptr + rows, mask=in_rows)[:, None].to(tl.float32)
    beta = tl.load(beta_ptr + rows, mask=in_rows)[:, None].to(tl.float32)
    return (y - mean) * rstd * gamma + beta


@triton.jit
def _normalise_glu_scale(h_ptr, w_ptr, b_ptr, gamma_ptr, beta_ptr, scale_ptr, mean_ptr,
                         rstd_ptr, out_ptr, hidden, channels: tl.constexpr, length,
                         HIDDEN_P: tl.constexpr, BLOCK_C: tl.constexpr,
                         BLOCK_T: tl.constexpr, IEEE: tl.constexpr):
    n, tile = tl.program_id(0).to(tl.int64), tl.program_id(1)
    t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    mean, rstd = tl.load(mean_ptr + n), tl.load(rstd_ptr + n)
    channels2 = 2 * channels
    for start in range(0, channels, BLOCK_C):
        rows = start + tl.arange(0, BLOCK_C)
        in_rows = rows < channels
        a = _conv_tile(h_ptr, w_ptr, b_ptr, n, rows, t, hidden, channels2, length,
                       HIDDEN_P, IEEE)
        g = _conv_tile(h_ptr, w_ptr, b_ptr, n, rows + channels, t, hidden, channels2,
                       length, HIDDEN_P, IEEE)
        a = _normalised(a, rows, in_rows, mean, rstd, gamma_ptr, beta_ptr)
        g = _normalised(g, rows + channels, in_rows, mean, rstd, gamma_ptr, beta_ptr)
        out = tl.load(scale_ptr + rows, mask=in_rows)[:, None].to(tl.float32) * a * tl.sigmoid(g)
        tl.store(out_ptr + n * channels * length + rows[:, None] * length + t[None, :],
                 out.to(out_ptr.dtype.element_ty),
                 mask=in_rows[:, None] & (t[None, :] < length))


def combine_tiles(count: th.Tensor, mean: th.Tensor, m2: th.Tensor
                  ) -> tp.Tuple[th.Tensor, th.Tensor]:
    """Mean and biased variance `[N]` of each sample from its tiles' counts, means and M2
    `[N, tiles]` (Chan et al.'s parallel combination)."""
    total = count.sum(1)
    grand = (count * mean).sum(1) / total
    m2_all = m2.sum(1) + (count * (mean - grand[:, None]) ** 2).sum(1)
    return grand, m2_all / total


def fused_tail(h: th.Tensor, weight: th.Tensor, bias: th.Tensor, gamma: th.Tensor,
               beta: th.Tensor, scale: th.Tensor, eps: float,
               out_dtype: th.dtype) -> th.Tensor:
    """`LayerScale(GLU(GroupNorm(1, 2C)(conv1x1(h))))` of `h` `[N, H, T]` -> `[N, C, T]` in
    `out_dtype`. `weight` `[2C, H]` and `h` are multiplied in `h`'s dtype; every other
    parameter is read as fp32."""
    h = h.contiguous()
    n, hidden, length = h.shape
    channels2 = weight.shape[0]
    weight = weight.to(h.dtype).contiguous()
    tiles = triton.cdiv(length, BLOCK_T)
    ieee = h.dtype == th.float32
    hidden_p = max(16, triton.next_power_of_2(hidden))  # tl.dot's smallest side is 16
    count, mean, m2 = (th.empty(n, tiles, device=h.device, dtype=th.float32) for _ in range(3))
    _tile_statistics[(n, tiles)](h, weight, bias, count, mean, m2, hidden, channels2, length,
                                 tiles, HIDDEN_P=hidden_p, BLOCK_C=BLOCK_C, BLOCK_T=BLOCK_T,
                                 IEEE=ieee)
    grand, variance = combine_tiles(count, mean, m2)
    rstd = th.rsqrt(variance + eps)
    out = th.empty(n, channels2 // 2, length, device=h.device, dtype=out_dtype)
    _normalise_glu_scale[(n, tiles)](h, weight, bias, gamma, beta, scale, grand, rstd, out,
                                     hidden, channels2 // 2, length, HIDDEN_P=hidden_p,
                                     BLOCK_C=BLOCK_C, BLOCK_T=BLOCK_T, IEEE=ieee)
    return out


def _group_norm(norm: th.nn.Module) -> th.nn.Module:
    """The `nn.GroupNorm` itself, also inside a `HalfGroupNorm`."""
    return norm.norm if isinstance(norm, HalfGroupNorm) else norm


class FusedDConvLayer(th.nn.Module):
    """One DConv layer's branch (`nn.Sequential` of conv, norm, GELU, conv 1x1, norm, GLU,
    LayerScale): its head in PyTorch, its tail in `fused_tail`. Under autocast the 1x1 conv
    multiplies in the autocast dtype, as it would eager; the output is in that dtype when the
    layer's norm is a `HalfGroupNorm` (half activations), else fp32 (autocast's GroupNorm).
    Shapes: `[N, C, T]` -> `[N, C, T]`."""

    def __init__(self, layer: th.nn.Sequential):
        super().__init__()
        self.head = layer[:3]
        conv, norm, scale = layer[3], layer[4], layer[6]
        self.half_norm = isinstance(norm, HalfGroupNorm)
        self.conv, self.norm, self.scale = conv, _group_norm(norm), scale

    def forward(self, x: th.Tensor) -> th.Tensor:
        h = self.head(x)
        dtype = (th.get_autocast_dtype(x.device.type)
                 if th.is_autocast_enabled(x.device.type) else th.float32)
        with th.autocast(x.device.type, enabled=False):
            return fused_tail(h.to(dtype), self.conv.weight[:, :, 0], self.conv.bias,
                              self.norm.weight, self.norm.bias, self.scale.scale,
                              self.norm.eps, dtype if self.half_norm else th.float32)


def fusable(layer: th.nn.Module) -> bool:
    """Whether `layer` is a DConv branch of exactly the shape `FusedDConvLayer` computes."""
    from demucs.demucs import LayerScale
    if not isinstance(layer, th.nn.Sequential) or len(layer) != 7:
        return False
    conv, norm, glu, scale = layer[3], _group_norm(layer[4]), layer[5], layer[6]
    return (isinstance(conv, th.nn.Conv1d) and conv.kernel_size == (1,) and
            conv.bias is not None and type(norm) is th.nn.GroupNorm and
            norm.num_groups == 1 and norm.affine and isinstance(glu, th.nn.GLU) and
            glu.dim == 1 and isinstance(scale, LayerScale) and not scale.channel_last)


def use_fused_dconv(model: th.nn.Module) -> int:
    """Replace every fusable layer of every `DConv` of `model` with a `FusedDConvLayer`;
    returns how many."""
    from demucs.demucs import DConv
    count = 0
    for module in model.modules():
        if isinstance(module, DConv):
            for index, layer in enumerate(module.layers):
                if fusable(layer):
                    module.layers[index] = FusedDConvLayer(layer)
                    count += 1
    return count
