"""Running the model on batches of windows, and the in-process separation loop.

`ModelRunner` owns the model on its device at a chosen precision and maps a batch of windows
`[B, C, L]` to stems `[B, S, C, L]`. `separate` is `apply_model` for one mix: plan, batch,
run, overlap-add. The Ray deployments call the same pieces, one step each.
"""
import contextlib
import logging
import threading
import time
import typing as tp
import warnings

import numpy as np
import torch as th
import tqdm
from demucs.htdemucs import HTDemucs

from .cpu_settings import apply_to_torch, choose
from .forward import (BatchLimit, CudaGraphs, HTDemucsCore, SplitForward, bucket_pieces,
                      bucket_sizes, compile_core, graph_safe, is_out_of_memory,
                      memory_limit, run_with_backoff, use_half_group_norm, window_memory)
from .models import Model, model_geometry, sub_models
from .modes import RunnerOptions
from .plan import Plan, Window, in_order, plan_windows
from .overlap_add import NORMALISED, OverlapAdd, denormalise
from .windows import normalise, window_input, window_output

# A mix read zero-copy from the object store (Separate) or from a batch's rows is a read-only
# array; the tensor `run_windows` makes of it is only read (windows are cut from it), never
# written
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
logger = logging.getLogger(__name__)
_AUTOCAST_DTYPES = {"bf16": th.bfloat16, "fp16": th.float16}


def default_device() -> str:
    return "cuda" if th.cuda.is_available() else "cpu"


class ModelRunner:
    """A model (or bag) on a device, run as `RunnerOptions` say. `runner(model_index, windows)`
    maps windows `[B, C, L]` of sub-model `model_index` to stems `[B, S, C, L]` float32 on the
    CPU. Start-up work (memory measurement, compilation, graph capture) happens here, in
    `__init__`, never on a request's path. Safe to call from several threads.

    In bf16/fp16 a window whose stems come out non-finite (fp16 tops out at 65504: a loud
    activation overflows to inf, GroupNorm makes it NaN) is run again in fp32, eager, and
    counted in `fp32_redone_windows`: the answer is never NaN or inf where fp32's is not."""

    def __init__(self, model: Model, device: tp.Optional[str] = None, precision: str = "fp32",
                 options: tp.Optional[RunnerOptions] = None):
        options = options or RunnerOptions(device, precision)
        self.options = options
        self.device = th.device(options.device or default_device())
        self.precision = options.precision
        self.geometry = model_geometry(model)
        self.models = [m.to(self.device).eval() for m in sub_models(model)]
        if options.group_norm == "half":
            for sub_model in self.models:
                use_half_group_norm(sub_model)
        if options.dconv == "triton":
            use_fused_dconv_on(self.models)
        self._lock = threading.Lock()
        self.busy_seconds = 0.  # in forwards (their copies to and from the device included)
        self.fp32_redone_windows = 0  # half-precision windows run again in fp32 (non-finite)
        self._exact: tp.Dict[int, tp.Tuple[tp.Callable, BatchLimit]] = {}  # fp32, by model
        self._set_backends()
        self._forwards = [self._make_forward(m) for m in self.models]
        self.limits = [BatchLimit(options.max_batch) for _ in self.models]
        self.startup_seconds = 0.
        start = time.perf_counter()
        for index in range(len(self.models)):
            self._start(index)
        self.startup_seconds = time.perf_counter() - start

    def _set_backends(self) -> None:
        if self.device.type == "cpu":
            # the attention path chosen for this CPU and precision (`cpu_settings`); the
            # process's threads are its owner's to set (the CLI, the Separate replica)
            apply_to_torch(choose(self.precision), threads=False)
        if self.device.type == "cuda":
            tf32 = self.precision == "tf32"  # fp32 means fp32: cuDNN would use TF32 by default
            th.backends.cuda.matmul.allow_tf32 = tf32
            th.backends.cudnn.allow_tf32 = tf32
            # one window shape: cuDNN's fastest kernels for it, timed at the first forwards
            th.backends.cudnn.benchmark = self.options.cudnn_benchmark

    def _autocast(self, half: bool = True) -> tp.ContextManager:
        if half and self.precision in _AUTOCAST_DTYPES:
            # no weight-cast cache: cached casts made during a CUDA graph capture would be freed
            return th.autocast(self.device.type, dtype=_AUTOCAST_DTYPES[self.precision],
                               cache_enabled=False)
        return contextlib.nullcontext()

    def _make_forward(self, model: th.nn.Module, fast: bool = True,
                      half: bool = True) -> tp.Callable[[th.Tensor], th.Tensor]:
        """Windows `[B, C, L]` on the device -> stems `[B, S, C, L]` on the device; `fast`:
        with the inner network compiled when the options say so; `half`: in bf16/fp16 when
        the precision is one of them (else fp32)."""
        if not isinstance(model, HTDemucs):
            def plain(mix: th.Tensor) -> th.Tensor:
                with self._autocast(half):
                    return model(mix).float()
            return plain
        core: tp.Callable = HTDemucsCore(model)
        if fast and self.options.compile == "compile" and graph_safe(model):
            core = compile_core(core, self.options.compile_backend)

        def inner(mag: th.Tensor, mix: th.Tensor) -> tp.Tuple[th.Tensor, th.Tensor]:
            with self._autocast(half):
                return core(mag, mix)
        return SplitForward(model, inner, self.device)

    def _start(self, index: int) -> None:
        """Measure the batch that fits (CUDA), capture CUDA graphs, or compile by running once."""
        model, forward = self.models[index], self._forwards[index]
        length = self.geometry.input_length(index, self.geometry.segment_lengths[index])
        channels = self.geometry.audio_channels
        if self.device.type == "cuda":
            fixed, per_window = window_memory(self._make_forward(model, fast=False), channels,
                                              length, self.device)
            th.cuda.empty_cache()
            free, _ = th.cuda.mem_get_info(self.device)
            share = self.options.memory_fraction / (len(self.models) - index)
            self.limits[index].limit = memory_limit(fixed, per_window, free, share,
                                                    self.options.max_batch)
            if self.options.compile != "none" and graph_safe(model):
                self._capture(index, channels, length)
        elif self.options.compile == "compile" and graph_safe(model):
            # compiles for any batch of 2 or more and for a batch of 1 (a graph of its own):
            # the frames after the inner network's graph breaks become dynamic in the batch
            # only at their second size, hence 2 then 3
            with th.inference_mode():
                for size in (2, 3, 1):
                    forward(th.zeros(size, channels, length))

    def _capture(self, index: int, channels: int, length: int) -> None:
        limit = self.limits[index]
        while True:
            try:
                self._forwards[index].capture(bucket_sizes(limit.limit), channels, length)
                return
            except Exception as exc:  # noqa: BLE001
                if not is_out_of_memory(exc):
                    raise
                self._free_cache()
                limit.halve()

    @property
    def graphs(self) -> tp.List[tp.Optional[CudaGraphs]]:
        """Each sub-model's captured CUDA graphs (None: it runs without)."""
        return [getattr(forward, "graphs", None) for forward in self._forwards]

    def _free_cache(self) -> None:
        if self.device.type == "cuda":
            th.cuda.empty_cache()

    def wrap_forward(self, model_index: int,
                     wrap: tp.Callable[[tp.Callable], tp.Callable]) -> None:
        """Run sub-model `model_index`'s windows `[B, C, L]` through `wrap(its forward)`
        from now on: a fault put in its path (one that runs out of memory above N windows,
        as the tests and the GPU run's rehearsal do), the back-off and fp32 redo unchanged."""
        self._forwards[model_index] = wrap(self._forwards[model_index])

    def batch_limit(self, model_index: int = 0) -> int:
        return self.limits[model_index].limit

    def __call__(self, model_index: int, inputs: th.Tensor) -> th.Tensor:
        """Stems `[B, S, C, L]` (float32, CPU) of windows `[B, C, L]` (CPU or device)."""
        with self._lock, th.inference_mode():
            start = time.perf_counter()
            pieces = run_with_backoff(lambda batch: self._run(model_index, batch), inputs,
                                      self.limits[model_index], self._free_cache)
            self.busy_seconds += time.perf_counter() - start
        return pieces[0] if len(pieces) == 1 else th.cat(pieces)

    def _run(self, model_index: int, inputs: th.Tensor) -> th.Tensor:
        """Stems `[B, S, C, L]` on the CPU of windows `[B, C, L]`, in pieces that fit."""
        run = self._run_on_cpu if self.device.type == "cpu" else self._run_on_cuda
        outputs, finite = run(model_index, inputs)
        if finite is not None and not bool(finite.all()):
            self._redo_in_fp32(model_index, inputs, outputs, (~finite).nonzero().flatten())
        return outputs

    @property
    def _guarded(self) -> bool:
        """Whether outputs are checked for non-finite values (bf16/fp16: see the class)."""
        return self.precision in _AUTOCAST_DTYPES

    def _run_on_cpu(self, model_index: int, inputs: th.Tensor
                    ) -> tp.Tuple[th.Tensor, tp.Optional[th.Tensor]]:
        """Stems of `inputs`, and (guarded) which windows' stems are all finite `[B]`."""
        outputs = self._forwards[model_index](inputs.to(self.device))
        return outputs, finite_rows(outputs) if self._guarded else None

    def _run_on_cuda(self, model_index: int, inputs: th.Tensor
                     ) -> tp.Tuple[th.Tensor, tp.Optional[th.Tensor]]:
        """`_run_on_cpu` on the GPU: with CUDA graphs in bucket-sized pieces (the last padded
        with silent windows up to its bucket), copied back asynchronously (the finite flags
        too: no sync but the last)."""
        if inputs.device.type == "cpu":
            inputs = inputs.pin_memory()  # lets the copy to the GPU run asynchronously
        graphs = self.graphs[model_index]
        outputs = []
        start = 0
        pieces = (bucket_pieces(inputs.shape[0], graphs.buckets) if graphs else
                  [(inputs.shape[0], inputs.shape[0])])
        flags = []
        for size, used in pieces:  # the forward replays its graphs for these sizes
            piece = inputs[start:start + used].to(self.device, non_blocking=True)
            if used < size:
                piece = th.cat([piece, piece.new_zeros((size - used, *piece.shape[1:]))])
            out = self._forwards[model_index](piece)[:used]
            outputs.append(to_pinned_host(out))
            if self._guarded:
                flags.append(to_pinned_host(finite_rows(out)))
            start += used
        th.cuda.current_stream(self.device).synchronize()
        return (outputs[0] if len(outputs) == 1 else th.cat(outputs),
                th.cat(flags) if flags else None)

    def _redo_in_fp32(self, model_index: int, inputs: th.Tensor, outputs: th.Tensor,
                      rows: th.Tensor) -> None:
        """Run windows `inputs[rows]` again in fp32 (eager, in pieces that fit) into
        `outputs[rows]`."""
        logger.warning("%d of %d windows came out non-finite in %s: run again in fp32",
                       len(rows), inputs.shape[0], self.precision)
        if model_index not in self._exact:
            self._exact[model_index] = (
                self._make_forward(self.models[model_index], fast=False, half=False),
                BatchLimit(self.limits[model_index].limit))
        forward, limit = self._exact[model_index]
        pieces = run_with_backoff(lambda batch: forward(batch.to(self.device)).cpu(),
                                  inputs[rows.to(inputs.device)], limit, self._free_cache)
        outputs[rows] = pieces[0] if len(pieces) == 1 else th.cat(pieces)
        self.fp32_redone_windows += len(rows)

    def take_fp32_redone(self) -> int:
        """Windows run again in fp32 since the last call (for a metric)."""
        with self._lock:
            count, self.fp32_redone_windows = self.fp32_redone_windows, 0
        return count


def use_fused_dconv_on(models: tp.Sequence[th.nn.Module]) -> None:
    """`fused_dconv.use_fused_dconv` on each model (Triton imported only here)."""
    try:
        from .fused_dconv import use_fused_dconv
    except ImportError as exc:
        raise ValueError(f"dconv 'triton' needs Triton: {exc}") from exc
    for model in models:
        use_fused_dconv(model)


def finite_rows(outputs: th.Tensor) -> th.Tensor:
    """`[B]` bool: whether each window's stems `outputs[b]` are all finite, read from their
    sum (a NaN or inf makes it non-finite; one pass, no mask: ~20x faster than `isfinite`
    on the CPU, 0.4 ms a window; only stems summing past 3e38 would be flagged wrongly)."""
    return th.isfinite(outputs.flatten(1).sum(1))


def to_pinned_host(tensor: th.Tensor) -> th.Tensor:
    """A copy of a device tensor in pinned host memory, made asynchronously (read it after
    the stream's synchronize)."""
    return th.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True).copy_(tensor,
                                                                           non_blocking=True)


def batch_windows(windows: tp.Sequence[Window], batch_size: int) -> tp.Iterator[tp.List[Window]]:
    """Consecutive runs of at most `batch_size` windows that share a model and input length."""
    batch: tp.List[Window] = []
    for window in windows:
        if batch and (len(batch) == batch_size or
                      (window.model_index, window.input_length) !=
                      (batch[0].model_index, batch[0].input_length)):
            yield batch
            batch = []
        batch.append(window)
    if batch:
        yield batch


@contextlib.contextmanager
def timed(timings: tp.Optional[tp.Dict[str, float]], stage: str):
    """Add the wall time of the block (seconds) to `timings[stage]` when `timings` is given."""
    start = time.perf_counter()
    try:
        yield
    finally:
        if timings is not None:
            timings[stage] = timings.get(stage, 0.) + time.perf_counter() - start


def run_windows(runner: ModelRunner, mixes: tp.Sequence[tp.Any],
                windows: tp.Sequence[Window],
                timings: tp.Optional[tp.Dict[str, float]] = None,
                norms: tp.Optional[tp.Sequence[tp.Tuple[float, float]]] = None
                ) -> tp.List[th.Tensor]:
    """One forward pass over windows of one model and input length, window `i` cut from
    `mixes[i]` (`[C, T]`, a tensor or a float32 array used in place; songs may differ) and
    normalised by `norms[i]` (mean, std; None:
    the mixes are normalised). Returns the trimmed outputs `[S, C, length]` on the CPU;
    `timings` collects the seconds of the "windows" and "model" stages."""
    norms = norms or [NORMALISED] * len(windows)
    with timed(timings, "windows"):
        inputs = th.stack([window_input(th.as_tensor(mix), window, *norm)
                           for mix, window, norm in zip(mixes, windows, norms)])
    with timed(timings, "model"):
        outputs = runner(windows[0].model_index, inputs)
    return [window_output(out, window) for out, window in zip(outputs, windows)]


def run_plan(runner: ModelRunner, mix: th.Tensor, plan: Plan, batch_size: int = 1,
             progress: bool = False, timings: tp.Optional[tp.Dict[str, float]] = None,
             norm: tp.Tuple[float, float] = NORMALISED
             ) -> tp.Iterator[tp.Tuple[tp.List[Window], tp.List[th.Tensor]]]:
    """Every window of `plan` through the model, front to back (`in_order`), in batches of at
    most `batch_size`: yields each batch's windows and their trimmed outputs `[S, C, length]`.
    `mix` is the mix `[C, T]`, normalised window by window by `norm` (mean, std; the default
    is for a mix normalised already); `progress` shows a bar."""
    bar = tqdm.tqdm(total=len(plan.windows), unit="window", disable=not progress)
    try:
        for batch in batch_windows(in_order(plan), batch_size):
            yield batch, run_windows(runner, [mix] * len(batch), batch, timings,
                                     [norm] * len(batch))
            bar.update(len(batch))
    finally:
        bar.close()


def separate(runner: ModelRunner, wav: th.Tensor, shifts: int = 1,
             overlap: tp.Optional[float] = None,
             seed: tp.Optional[int] = 0, batch_size: int = 1, progress: bool = False,
             plan: tp.Optional[Plan] = None,
             timings: tp.Optional[tp.Dict[str, float]] = None) -> th.Tensor:
    """Separate a mix `[C, T]` (model rate) into stems `[S, C, T]`, like
    `demucs.api.Separator.separate_tensor` with the same model, shifts and overlap.

    `overlap` None is the family's default (`plan.plan_windows`); a RoFormer takes no shifts.
    Shift offsets come from `random.Random(seed)` in `apply_model`'s order (seed None: the global
    `random`); `plan` overrides all of that. `timings` collects seconds per stage.
    """
    with timed(timings, "plan"):
        mix, mean, std = normalise(wav) if runner.geometry.normalises else (wav, *NORMALISED)
        if plan is None:
            plan = plan_windows(mix.shape[-1], runner.geometry, shifts, overlap, seed)
        acc = OverlapAdd(plan, runner.geometry)
    stretches = []
    for batch, outputs in run_plan(runner, mix, plan, batch_size, progress, timings):
        with timed(timings, "overlap_add"):
            for window, out in zip(batch, outputs):
                acc.add(window, out)
            stretch = acc.take(1 << 16)
            if stretch is not None:
                stretches.append(stretch)
    with timed(timings, "overlap_add"):
        return th.from_numpy(denormalise(np.concatenate(stretches, -1), mean, std))
