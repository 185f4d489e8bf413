"""The model's side of a window: its input cut from the mix (normalised, padded or mirrored
as `demucs.apply.apply_model` and MSST's `demix` cut it) and the part of its output that
overlap-add uses (`overlap_add`, NumPy, where the outputs meet).

Conventions: a mix is a float32 tensor `[C, T]` (C audio channels, T samples at the model rate).
Positions and lengths are in samples.
"""
import typing as tp

import torch as th
from torch.nn import functional as F

from .overlap_add import NORMALISED, normalisation
from .plan import Window


def normalise(wav: th.Tensor) -> tp.Tuple[th.Tensor, float, float]:
    """A mix `[C, T]` normalised as Demucs does: `(normalised [C, T], mean, std)`. (The
    service normalises window by window instead: `window_input`.)"""
    mean, std = normalisation(wav)
    return (wav - mean) / std, mean, std


def window_input(mix: th.Tensor, window: Window, mean: float = NORMALISED[0],
                 std: float = NORMALISED[1]) -> th.Tensor:
    """The model input of `window`: `[C, input_length]` samples of `mix [C, T]` from
    `window.input_start`, normalised (`(x - mean) / std`, as `normalisation` gives them: the
    samples of the whole mix normalised first) and zero-padded where it reaches outside the mix
    (`TensorChunk.padded`)."""
    total = mix.shape[-1]
    start, end = window.input_start, window.input_start + window.input_length
    if window.mirror and (start < 0 or end > total or window.length < window.input_length):
        inside = mix[..., _mirrored(window, total)]
        if not window.tail_mirror:
            inside[..., window.length:] = 0
    else:
        inside = mix[..., max(0, start):min(total, end)]
    if (mean, std) != NORMALISED:
        inside = (inside - mean) / std
    if window.mirror:
        return inside
    return F.pad(inside, (max(0, start) - start, end - min(total, end)))


def _mirrored(window: Window, total: int) -> th.Tensor:
    """The mix positions `[input_length]` of an MSST window's input: its view is the mix
    reflected at both ends (`F.pad(mode="reflect")`, the edge sample not repeated), and the
    samples past the window's `length` reflect its own last one."""
    positions = th.arange(window.input_start, window.input_start + window.input_length)
    last = window.input_start + window.length - 1
    positions = th.where(positions > last, 2 * last - positions, positions)
    positions = positions.abs()  # reflected at the start
    positions = th.where(positions >= total, 2 * (total - 1) - positions, positions)
    return positions.clamp_(0, total - 1)  # (only samples zeroed after reach past it)


def center_trim(output: th.Tensor, length: int) -> th.Tensor:
    """Keep the centre `length` samples of `output [..., L]`; an odd extra sample goes right."""
    delta = output.shape[-1] - length
    if delta < 0:
        raise ValueError(f"output of {output.shape[-1]} samples is shorter than {length}")
    return output[..., delta // 2:output.shape[-1] - (delta - delta // 2)]


def window_output(output: th.Tensor, window: Window) -> th.Tensor:
    """The `window.length` samples of a model's output `[..., input_length]` that overlap-add
    uses: the centre (Demucs pads a window's input on both sides), or the first (MSST's
    windows start where their input does)."""
    return output[..., :window.length] if window.mirror else center_trim(output, window.length)
