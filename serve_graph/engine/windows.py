"""Transition weights and overlap-add: the arithmetic of `demucs.apply.apply_model` on the
windows of a `plan.Plan`, in any order.

Conventions: a mix is a float32 tensor `[C, T]` (C audio channels, T samples at the model rate).
Positions and lengths are in samples.
"""
import typing as tp

import torch as th
from torch.nn import functional as F

from .plan import ModelGeometry, Plan, Window

def normalisation(wav: th.Tensor) -> tp.Tuple[float, float]:
    """The mean and std (+ 1e-8) of a mix's `[C, T]` channel mean: Demucs normalises the mix
    by them (`demucs.api.Separator.separate_tensor`), the same float32 arithmetic here."""
    ref = wav.mean(0)
    return float(ref.mean()), float(ref.std() + 1e-8)


def normalise(wav: th.Tensor) -> tp.Tuple[th.Tensor, float, float]:
    """A mix `[C, T]` normalised as Demucs does: `(normalised [C, T], mean, std)`. (The
    service normalises window by window instead: `window_input`.)"""
    mean, std = normalisation(wav)
    return (wav - mean) / std, mean, std


def denormalise(stems: th.Tensor, mean: float, std: float, in_place: bool = False
                ) -> th.Tensor:
    """Undo `normalise` on stems `[S, C, T]` (`in_place`: overwriting them)."""
    return stems.mul_(std).add_(mean) if in_place else stems * std + mean


NORMALISED = (0., 1.)  # the (mean, std) of a mix normalised already: window_input leaves it


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


def transition_weight(segment_length: int, power: float = 1.,
                      device: tp.Union[str, th.device] = 'cpu') -> th.Tensor:
    """Triangle weight `[segment_length]`, maximal in the middle of a window, as in `apply_model`."""
    weight = th.cat([th.arange(1, segment_length // 2 + 1, device=device),
                     th.arange(segment_length - segment_length // 2, 0, -1, device=device)])
    return (weight / weight.max())**power


def demix_weight(chunk: int, fade: int, first: bool, last: bool) -> th.Tensor:
    """MSST's `_getWindowingArray` `[chunk]`: linear fades of `fade` samples (0 to 1 in, 1 to
    0 out) around ones, as `demix` applies it at batch size 1: the first window without its
    fade-in, else the last without its fade-out (a lone window keeps its fade-out)."""
    weight = th.ones(chunk)
    weight[-fade:] = th.linspace(1, 0, fade)
    weight[:fade] = th.linspace(0, 1, fade)
    if first:
        weight[:fade] = 1
    elif last:
        weight[-fade:] = 1
    return weight


BLOCK = 1 << 16  # samples per block of a pass's accumulators


class OverlapAdd:
    """Accumulates window outputs `[S, C, window.length]` of a `Plan` and hands out the stems
    `[S, C, n]` (normalised domain) stretch by stretch, as soon as they are final.

    Windows may be added in any order. Mix sample t is final once, in every pass, all windows
    that cover it are in; `take()` then returns the stretch from the last one taken to the
    earliest such frontier. Each pass keeps its weighted sum and summed weights in blocks of
    `BLOCK` samples, freed once taken, so adding windows in order of position (`in_order`)
    holds only a few windows' worth of audio. The arithmetic follows `apply_model`: each pass
    divided by its summed transition weights, shifted back, summed over shifts and divided by
    their number, then the bag's per-source weights.
    """

    SPARE_BLOCKS = 8  # freed blocks kept for reuse

    def __init__(self, plan: Plan, geometry: ModelGeometry):
        self.plan = plan
        self.geometry = geometry
        self._blocks: tp.List[tp.Dict[int, tp.Tuple[th.Tensor, th.Tensor]]] = [
            {} for _ in plan.passes]
        # blocks taken and freed, reused (zeroed) instead of fresh memory the kernel must
        # fault in and zero; and one block's worth of room for `weight x output`
        self._spare: tp.List[tp.Tuple[th.Tensor, th.Tensor]] = []
        self._product = th.empty(0)
        self._rank = plan.ranks()
        self._offsets: tp.List[tp.List[int]] = [[] for _ in plan.passes]
        for window in plan.windows:  # a pass's windows come in order of offset
            self._offsets[window.pass_index].append(window.offset)
        self._done = [[False] * len(offsets) for offsets in self._offsets]
        self._first_pending = [0] * len(plan.passes)
        self._weights: tp.Dict[tp.Tuple[int, bool, bool], th.Tensor] = {}
        self.taken = 0  # mix samples handed out so far

    @property
    def done(self) -> bool:
        return self.taken == self.plan.length

    def _delay(self, pass_index: int) -> int:
        """View position of mix sample 0 in pass `pass_index` (a shift's, or MSST's
        reflected border)."""
        return -self.plan.passes[pass_index].view_start

    def add(self, window: Window, output: th.Tensor) -> None:
        """Add the trimmed output `[S, C, window.length]` of `window`."""
        pass_ = self.plan.passes[window.pass_index]
        blocks = self._blocks[window.pass_index]
        weight = self._weight(window, pass_.segment_length)[:window.length]
        for block, span, part in _block_spans(window.offset, window.length):
            if block not in blocks:
                blocks[block] = self._new_block(output)
            total, weights = blocks[block]
            total[..., span] += self._weighted(weight[part], output[..., part])
            weights[span] += weight[part]
        done = self._done[window.pass_index]
        done[self._rank[window.index]] = True
        first = self._first_pending[window.pass_index]
        while first < len(done) and done[first]:
            first += 1
        self._first_pending[window.pass_index] = first

    def _new_block(self, output: th.Tensor) -> tp.Tuple[th.Tensor, th.Tensor]:
        """Zeroed sums `[S, C, BLOCK]` and summed weights `[BLOCK]` for `output`'s stems."""
        shape = (*output.shape[:2], BLOCK)
        while self._spare:
            total, weights = self._spare.pop()
            if total.shape == shape and total.dtype == output.dtype:
                return total.zero_(), weights.zero_()
        return (th.zeros(shape, dtype=output.dtype), th.zeros(BLOCK, dtype=output.dtype))

    def _weighted(self, weight: th.Tensor, output: th.Tensor) -> th.Tensor:
        """`weight * output` (`[n]` x `[S, C, n]`, n <= BLOCK) in reused memory: the same
        float32 products as `apply_model`'s, without a fresh window-sized temporary."""
        size = output.numel()
        if self._product.numel() < size or self._product.dtype != output.dtype:
            self._product = th.empty(output.shape[0] * output.shape[1] * BLOCK,
                                     dtype=output.dtype)
        return th.mul(weight, output, out=self._product[:size].view(output.shape))

    def frontier(self) -> int:
        """Mix samples final so far (every window covering them is in, in every pass)."""
        final = self.plan.length
        for index, first in enumerate(self._first_pending):
            offsets = self._offsets[index]
            if first < len(offsets):
                final = min(final, offsets[first] - self._delay(index))
        return max(final, 0)

    def take(self, min_samples: int = 1) -> tp.Optional[th.Tensor]:
        """The final stems `[S, C, n]` not handed out yet, once there are at least
        `min_samples` of them (or the song is complete); else None."""
        end = self.frontier()
        if end == self.taken or (end < self.plan.length and end - self.taken < min_samples):
            return None
        models: tp.Dict[int, th.Tensor] = {}
        for index, pass_ in enumerate(self.plan.passes):
            out = self._pass_output(index, self.taken, end)
            model_out = models.get(pass_.model_index)
            models[pass_.model_index] = out if model_out is None else model_out + out
        self.taken = end
        return self._combine(models)

    def _pass_output(self, index: int, start: int, end: int) -> th.Tensor:
        """Pass `index`'s weighted average over mix samples `[start, end)`; frees its blocks
        that lie wholly before `end`."""
        delay, blocks = self._delay(index), self._blocks[index]
        out: tp.Optional[th.Tensor] = None
        for block, span, part in _block_spans(start + delay, end - start):
            total, weight = blocks[block]
            if out is None:
                out = total.new_empty((*total.shape[:2], end - start))
            # divided straight into the output: one pass, where joining then dividing took two
            th.div(total[..., span], weight[span], out=out[..., part])
        assert out is not None
        if self.plan.fade:  # where every weight is 0 (MSST: nan_to_num)
            th.nan_to_num_(out, nan=0.)
        for block in [b for b in blocks if (b + 1) * BLOCK <= end + delay]:
            self._spare.append(blocks.pop(block))
        del self._spare[self.SPARE_BLOCKS:]
        return out

    def _combine(self, models: tp.Dict[int, th.Tensor]) -> th.Tensor:
        if self.plan.shifts > 1:  # dividing by 1 changes nothing: skip a pass over the stems
            for out in models.values():
                out /= self.plan.shifts
        if not self.geometry.is_bag or self._unit_bag:
            return models[0]
        estimates: tp.Union[float, th.Tensor] = 0.
        totals = [0.] * len(self.geometry.sources)
        for model_index, model_weights in enumerate(self.geometry.weights):
            for k, inst_weight in enumerate(model_weights):
                totals[k] += inst_weight
            out = models.get(model_index)  # left out of the plan: no weight on its stems
            if out is not None:
                for k, inst_weight in enumerate(model_weights):
                    out[k] *= inst_weight
                estimates = estimates + out
        assert isinstance(estimates, th.Tensor)
        for k in range(estimates.shape[0]):
            estimates[k] /= totals[k]
        return estimates

    @property
    def _unit_bag(self) -> bool:
        """A bag of one model whose weights are all 1 (`htdemucs`): weighting it multiplies and
        divides each stem by 1 and adds it to zeros, which changes no sample (but the sign of
        a zero), in three passes over the stems that are skipped."""
        return self.geometry.weights == (tuple(1. for _ in self.geometry.sources),)

    def _weight(self, window: Window, segment_length: int) -> th.Tensor:
        """`apply_model`'s triangle, or MSST's fades (`demix_weight`) for a plan with fades:
        none in at the first window, none out at the last."""
        if self.plan.fade:
            rank = self._rank[window.index]
            key = (segment_length, rank == 0, rank == len(self._done[window.pass_index]) - 1)
        else:
            key = (segment_length, False, False)
        if key not in self._weights:
            self._weights[key] = (
                demix_weight(segment_length, self.plan.fade, *key[1:]) if self.plan.fade
                else transition_weight(segment_length, self.plan.transition_power))
        return self._weights[key]

    def result(self) -> th.Tensor:
        """All stems `[S, C, T]` (normalised domain), once every window was added and none
        was taken."""
        if self.taken or self.frontier() < self.plan.length:
            raise RuntimeError("result() needs every window and nothing taken before")
        out = self.take()
        assert out is not None
        return out


def _block_spans(start: int, length: int) -> tp.Iterator[tp.Tuple[int, slice, slice]]:
    """`(block, slice in the block, slice in [start, start + length))` covering that range."""
    position, end = start, start + length
    while position < end:
        block = position // BLOCK
        stop = min(end, (block + 1) * BLOCK)
        yield (block, slice(position - block * BLOCK, stop - block * BLOCK),
               slice(position - start, stop - start))
        position = stop
