"""Running the model on batches of windows, and the in-process separation loop.

`ModelRunner` owns the model on its device at a chosen precision and maps a batch of windows
`[B, C, L]` to stems `[B, S, C, L]`. `separate` is `apply_model` for one mix: plan, batch,
run, overlap-add. The Ray deployments call the same pieces, one step each.
"""
import contextlib
import functools
import os
import time
import typing as tp

import torch as th
import tqdm
from demucs.htdemucs import HTDemucs

from .models import Model, model_geometry, sub_models
from .windows import (OverlapAdd, Plan, Window, center_trim, denormalise, normalise,
                      plan_windows, window_input)

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
_AUTOCAST_DTYPES = {"bf16": th.bfloat16, "fp16": th.float16}


def cpu_tuning() -> bool:
    """CPU speed settings on (default) unless SERVE_GRAPH_CPU_TUNING=0 (for A/B benchmarks)."""
    return os.environ.get("SERVE_GRAPH_CPU_TUNING", "1") != "0"


def default_device() -> str:
    return "cuda" if th.cuda.is_available() else "cpu"


def _to_fp32(value):
    if isinstance(value, th.Tensor):
        return value.to(th.complex64) if value.is_complex() else value.float()
    return value


def _fp32_spectral(method: tp.Callable) -> tp.Callable:
    """Run a spectral method of HTDemucs (STFT, mask, iSTFT) in fp32, outside autocast."""
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        device_type = next(a for a in args if isinstance(a, th.Tensor)).device.type
        with th.autocast(device_type, enabled=False):
            return method(*map(_to_fp32, args), **kwargs)
    return wrapper


class ModelRunner:
    """A model (or bag) on `device`, run at `precision`:

    - "fp32": plain float32, the reference numerics;
    - "tf32": float32 storage, TensorFloat-32 matmuls/convolutions on CUDA (no-op on CPU);
    - "bf16" / "fp16": autocast, with HTDemucs' STFT and iSTFT kept in float32.
    """

    def __init__(self, model: Model, device: tp.Optional[str] = None, precision: str = "fp32"):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.device = th.device(device or default_device())
        self.precision = precision
        self.geometry = model_geometry(model)
        self.models = [m.to(self.device).eval() for m in sub_models(model)]
        if self.device.type == "cpu" and precision in ("fp32", "tf32") and cpu_tuning():
            # PyTorch's MHA "fast path" runs self-attention as bmm + softmax on the CPU; without
            # it, attention goes through scaled_dot_product_attention's fused kernel (as the
            # cross-attention already does): same fp32 numerics, ~6% less time per window.
            # bf16 keeps the fast path: SDPA in bf16 is far slower on CPUs without AVX-512.
            th.backends.mha.set_fastpath_enabled(False)
        if precision == "tf32" and self.device.type == "cuda":
            th.backends.cuda.matmul.allow_tf32 = True
            th.backends.cudnn.allow_tf32 = True
        if precision in _AUTOCAST_DTYPES:
            for m in self.models:
                if isinstance(m, HTDemucs):
                    for name in ("_spec", "_mask", "_ispec"):
                        setattr(m, name, _fp32_spectral(getattr(m, name)))

    def _autocast(self):
        if self.precision in _AUTOCAST_DTYPES:
            return th.autocast(self.device.type, dtype=_AUTOCAST_DTYPES[self.precision])
        return contextlib.nullcontext()

    def __call__(self, model_index: int, inputs: th.Tensor) -> th.Tensor:
        """Stems `[B, S, C, L]` (float32, on the runner's device) of windows `[B, C, L]`."""
        if self.device.type == "cuda" and inputs.device.type == "cpu":
            inputs = inputs.pin_memory()  # lets the copy to the GPU run asynchronously
        with th.inference_mode(), self._autocast():
            out = self.models[model_index](inputs.to(self.device, non_blocking=True))
        return out.float()


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


def run_windows(runner: ModelRunner, mixes: tp.Sequence[th.Tensor],
                windows: tp.Sequence[Window],
                timings: tp.Optional[tp.Dict[str, float]] = None) -> tp.List[th.Tensor]:
    """One forward pass over windows of one model and input length, window `i` cut from
    `mixes[i]` (`[C, T]`, songs may differ). Returns the trimmed outputs `[S, C, length]`
    on the CPU; `timings` collects the seconds of the "windows" and "model" stages."""
    with timed(timings, "windows"):
        inputs = th.stack([window_input(mix, window) for mix, window in zip(mixes, windows)])
    with timed(timings, "model"):
        outputs = runner(windows[0].model_index, inputs).cpu()
    return [center_trim(out, window.length) for out, window in zip(outputs, windows)]


def separate(runner: ModelRunner, wav: th.Tensor, shifts: int = 1, overlap: float = 0.25,
             seed: tp.Optional[int] = 0, batch_size: int = 1, progress: bool = False,
             plan: tp.Optional[Plan] = None,
             timings: tp.Optional[tp.Dict[str, float]] = None) -> th.Tensor:
    """Separate a mix `[C, T]` (model rate) into stems `[S, C, T]`, like
    `demucs.api.Separator.separate_tensor` with the same model, shifts and overlap.

    Shift offsets come from `random.Random(seed)` in `apply_model`'s order (seed None: the global
    `random`); `plan` overrides all of that. `timings` collects seconds per stage.
    """
    with timed(timings, "plan"):
        mix, mean, std = normalise(wav)
        if plan is None:
            plan = plan_windows(mix.shape[-1], runner.geometry, shifts, overlap, seed)
        acc = OverlapAdd(plan, runner.geometry)
    bar = tqdm.tqdm(total=len(plan.windows), unit="window", disable=not progress)
    for batch in batch_windows(plan.windows, batch_size):
        outputs = run_windows(runner, [mix] * len(batch), batch, timings)
        with timed(timings, "overlap_add"):
            for window, out in zip(batch, outputs):
                acc.add(window, out)
        bar.update(len(batch))
    bar.close()
    with timed(timings, "overlap_add"):
        return denormalise(acc.result(), mean, std)
