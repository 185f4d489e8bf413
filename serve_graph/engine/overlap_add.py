"""Overlap-add: the arithmetic of `demucs.apply.apply_model` (and MSST's `demix`) on the window
outputs of a `plan.Plan`, in any order, and the mix's normalisation around it.

NumPy only, no torch: the Decode and Encode replicas (which measure the normalisation and
overlap-add) then never import torch, ~2 CPU-s each of a cold start on 2 cores
(benchmarks/RESULTS.md). The model side (cutting a window's input, trimming its output) is
`windows`. Every operation here is elementwise in float32, as torch does it in `apply_model`,
so the sums are the same floats.

Conventions: a mix is a float32 array `[C, T]` (C audio channels, T samples at the model rate);
stems `[S, C, T]`. Positions and lengths are in samples.
"""
import typing as tp

import numpy as np

from .plan import ModelGeometry, Plan, Window

NORMALISED = (0., 1.)  # the (mean, std) of a mix normalised already: window_input leaves it


def normalisation(wav: tp.Any) -> tp.Tuple[float, float]:
    """The mean and std (+ 1e-8) of a mix's `[C, T]` channel mean (an array or a CPU tensor):
    Demucs normalises the mix by them (`demucs.api.Separator.separate_tensor`). The channel
    mean is float32 as there; its mean and (unbiased) std are summed in float64, where torch
    sums float32 in another order: the two agree to float32's rounding (~1e-7 relative)."""
    ref = np.asarray(wav, dtype=np.float32).mean(0)
    return float(ref.mean(dtype=np.float64)), float(ref.std(dtype=np.float64, ddof=1) + 1e-8)


def denormalise(stems: np.ndarray, mean: float, std: float) -> np.ndarray:
    """Undo the normalisation on stems `[S, C, T]`, in place (they are returned)."""
    stems *= np.float32(std)
    stems += np.float32(mean)
    return stems


def transition_weight(segment_length: int, power: float = 1.) -> np.ndarray:
    """Triangle weight `[segment_length]` (float32), maximal in the middle of a window, as in
    `apply_model` (its int64 ramp divided by its maximum in float32)."""
    weight = np.concatenate([np.arange(1, segment_length // 2 + 1),
                             np.arange(segment_length - segment_length // 2, 0, -1)])
    weight = weight.astype(np.float32) / np.float32(weight.max())
    return weight if power == 1 else weight ** np.float32(power)


def demix_weight(chunk: int, fade: int, first: bool, last: bool) -> np.ndarray:
    """MSST's `_getWindowingArray` `[chunk]`: linear fades of `fade` samples (0 to 1 in, 1 to
    0 out) around ones, as `demix` applies it at batch size 1: the first window without its
    fade-in, else the last without its fade-out (a lone window keeps its fade-out)."""
    weight = np.ones(chunk, dtype=np.float32)
    weight[-fade:] = _linspace(1., 0., fade)
    weight[:fade] = _linspace(0., 1., fade)
    if first:
        weight[:fade] = 1
    elif last:
        weight[-fade:] = 1
    return weight


def _linspace(start: float, end: float, steps: int) -> np.ndarray:
    """`torch.linspace(start, end, steps)`'s float32 values `[steps]` (NumPy's differ in the
    last bit): its kernel's `start + step * i` for the first half and `end - step * (steps -
    1 - i)` for the rest, each a fused multiply-add (one rounding: float64, whose product of
    two float32 is exact, then float32)."""
    first, last = np.float32(start), np.float32(end)
    step = np.float64((last - first) / np.float32(steps - 1))
    index = np.arange(steps, dtype=np.float64)
    half = steps // 2
    return np.concatenate([first + step * index[:half],
                           last - step * (steps - 1 - index[half:])]).astype(np.float32)


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
        self._blocks: tp.List[tp.Dict[int, tp.Tuple[np.ndarray, np.ndarray]]] = [
            {} for _ in plan.passes]
        # blocks taken and freed, reused (zeroed) instead of fresh memory the kernel must
        # fault in and zero; and one block's worth of room for `weight x output`
        self._spare: tp.List[tp.Tuple[np.ndarray, np.ndarray]] = []
        self._product = np.empty(0, dtype=np.float32)
        self._rank = plan.ranks()
        self._offsets: tp.List[tp.List[int]] = [[] for _ in plan.passes]
        for window in plan.windows:  # a pass's windows come in order of offset
            self._offsets[window.pass_index].append(window.offset)
        self._done = [[False] * len(offsets) for offsets in self._offsets]
        self._first_pending = [0] * len(plan.passes)
        self._weights: tp.Dict[tp.Tuple[int, bool, bool], np.ndarray] = {}
        self.taken = 0  # mix samples handed out so far

    @property
    def done(self) -> bool:
        return self.taken == self.plan.length

    def _delay(self, pass_index: int) -> int:
        """View position of mix sample 0 in pass `pass_index` (a shift's, or MSST's
        reflected border)."""
        return -self.plan.passes[pass_index].view_start

    def add(self, window: Window, output: tp.Any) -> None:
        """Add the trimmed output `[S, C, window.length]` of `window` (an array, or a CPU
        tensor: read in place)."""
        output = np.asarray(output)
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

    def _new_block(self, output: np.ndarray) -> tp.Tuple[np.ndarray, np.ndarray]:
        """Zeroed sums `[S, C, BLOCK]` and summed weights `[BLOCK]` for `output`'s stems."""
        shape = (*output.shape[:2], BLOCK)
        while self._spare:
            total, weights = self._spare.pop()
            if total.shape == shape and total.dtype == output.dtype:
                total.fill(0)
                weights.fill(0)
                return total, weights
        return np.zeros(shape, dtype=output.dtype), np.zeros(BLOCK, dtype=output.dtype)

    def _weighted(self, weight: np.ndarray, output: np.ndarray) -> np.ndarray:
        """`weight * output` (`[n]` x `[S, C, n]`, n <= BLOCK) in reused memory: the same
        float32 products as `apply_model`'s, without a fresh window-sized temporary."""
        size = output.size
        if self._product.size < size or self._product.dtype != output.dtype:
            self._product = np.empty(output.shape[0] * output.shape[1] * BLOCK,
                                     dtype=output.dtype)
        return np.multiply(weight, output, out=self._product[:size].reshape(output.shape))

    def frontier(self) -> int:
        """Mix samples final so far (every window covering them is in, in every pass)."""
        final = self.plan.length
        for index, first in enumerate(self._first_pending):
            offsets = self._offsets[index]
            if first < len(offsets):
                final = min(final, offsets[first] - self._delay(index))
        return max(final, 0)

    def take(self, min_samples: int = 1) -> tp.Optional[np.ndarray]:
        """The final stems `[S, C, n]` not handed out yet, once there are at least
        `min_samples` of them (or the song is complete); else None."""
        end = self.frontier()
        if end == self.taken or (end < self.plan.length and end - self.taken < min_samples):
            return None
        models: tp.Dict[int, np.ndarray] = {}
        for index, pass_ in enumerate(self.plan.passes):
            out = self._pass_output(index, self.taken, end)
            model_out = models.get(pass_.model_index)
            models[pass_.model_index] = out if model_out is None else model_out + out
        self.taken = end
        return self._combine(models)

    def _pass_output(self, index: int, start: int, end: int) -> np.ndarray:
        """Pass `index`'s weighted average over mix samples `[start, end)`; frees its blocks
        that lie wholly before `end`."""
        delay, blocks = self._delay(index), self._blocks[index]
        out: tp.Optional[np.ndarray] = None
        # divided straight into the output: one pass, where joining then dividing took two;
        # where every weight is 0 (MSST's fades) 0/0 is NaN, zeroed below
        with np.errstate(invalid="ignore", divide="ignore"):
            for block, span, part in _block_spans(start + delay, end - start):
                total, weight = blocks[block]
                if out is None:
                    out = np.empty((*total.shape[:2], end - start), dtype=total.dtype)
                np.divide(total[..., span], weight[span], out=out[..., part])
        assert out is not None
        if self.plan.fade:  # where every weight is 0 (MSST: nan_to_num)
            np.nan_to_num(out, copy=False, nan=0.)
        for block in [b for b in blocks if (b + 1) * BLOCK <= end + delay]:
            self._spare.append(blocks.pop(block))
        del self._spare[self.SPARE_BLOCKS:]
        return out

    def _combine(self, models: tp.Dict[int, np.ndarray]) -> np.ndarray:
        if self.plan.shifts > 1:  # dividing by 1 changes nothing: skip a pass over the stems
            for out in models.values():
                out /= np.float32(self.plan.shifts)
        if not self.geometry.is_bag or self._unit_bag:
            return models[0]
        estimates: tp.Union[float, np.ndarray] = 0.
        totals = [0.] * len(self.geometry.sources)
        for model_index, model_weights in enumerate(self.geometry.weights):
            for k, inst_weight in enumerate(model_weights):
                totals[k] += inst_weight
            out = models.get(model_index)  # left out of the plan: no weight on its stems
            if out is not None:
                for k, inst_weight in enumerate(model_weights):
                    out[k] *= np.float32(inst_weight)
                estimates = estimates + out
        assert isinstance(estimates, np.ndarray)
        for k in range(estimates.shape[0]):
            estimates[k] /= np.float32(totals[k])
        return estimates

    @property
    def _unit_bag(self) -> bool:
        """A bag of one model whose weights are all 1 (`htdemucs`): weighting it multiplies and
        divides each stem by 1 and adds it to zeros, which changes no sample (but the sign of
        a zero), in three passes over the stems that are skipped."""
        return self.geometry.weights == (tuple(1. for _ in self.geometry.sources),)

    def _weight(self, window: Window, segment_length: int) -> np.ndarray:
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

    def result(self) -> np.ndarray:
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
