"""The engine's run modes by name and `RunnerOptions`, shared by the CLI, the settings, the
batch and the model runner: plain values, so that a command line is parsed and checked without
importing torch."""
import os
import typing as tp
from dataclasses import dataclass

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")  # tf32: fp32 with TF32 matmuls; bf16/fp16: autocast
COMPILE_MODES = ("none", "graphs", "compile")  # CUDA graphs; torch.compile (+ graphs on CUDA)
GROUP_NORMS = ("fp32", "half")  # GroupNorm under autocast: upcast to fp32, or kept half
DCONVS = ("torch", "triton")  # HTDemucs' DConv branch tails: PyTorch modules, or fused kernels


def modes_problem(precision: str, compile: str, group_norm: str, dconv: str,
                  on_cpu: bool = False) -> tp.Optional[str]:
    """Why these run modes cannot run together, or None: a name not among the choices above,
    the fused DConv kernels with `compile` (Inductor fuses those layers itself) or, `on_cpu`
    (where the model runs is known to be a CPU), outside Triton's interpreter
    (`TRITON_INTERPRET=1`, tests)."""
    for name, value, choices in (("precision", precision, PRECISIONS),
                                 ("compile", compile, COMPILE_MODES),
                                 ("group_norm", group_norm, GROUP_NORMS),
                                 ("dconv", dconv, DCONVS)):
        if value not in choices:
            return f"{name} must be one of {choices}, got {value!r}"
    if dconv == "triton" and compile == "compile":
        return ("dconv 'triton' runs with compile 'none' or 'graphs': with 'compile', "
                "Inductor fuses the DConv layers itself")
    if dconv == "triton" and on_cpu and os.environ.get("TRITON_INTERPRET") != "1":
        return ("dconv 'triton' needs a CUDA device (on the CPU: TRITON_INTERPRET=1, "
                "Triton's interpreter, for tests)")
    return None


DEFAULT_MAX_BATCH = 32


@dataclass(frozen=True)
class RunnerOptions:
    """How a `ModelRunner` runs the model.

    - `device`: "cpu", "cuda", "cuda:1"...; None: cuda if present.
    - `precision`: "fp32" (reference numerics; TF32 off on CUDA), "tf32" (TensorFloat-32
      matmuls/convolutions on CUDA, no-op on CPU), "bf16" / "fp16" (autocast, HTDemucs' STFT and
      iSTFT in float32).
    - `compile`: "none" (eager), "graphs" (CUDA: HTDemucs' inner network captured as CUDA graphs
      per batch size at start-up), "compile" (`torch.compile` of the inner network, plus CUDA graphs
      on CUDA). Models whose forward is not a fixed function (see `forward.graph_safe`) run eager.
    - `max_batch`: the most windows in one forward; on CUDA lowered to what fits in
      `memory_fraction` of the free device memory (measured at start-up).
    - `compile_backend`: `torch.compile`'s backend (tests use "eager").
    - `group_norm`: "fp32" (autocast upcasts GroupNorm's input, as PyTorch does) or "half"
      (`forward.HalfGroupNorm`: bf16/fp16 activations, fp32 statistics; fp32 unchanged).
    - `cudnn_benchmark`: on CUDA, cuDNN times its algorithms for each new convolution shape
      and keeps the fastest (a few shapes here: one window length, the batch buckets);
      False: its heuristics' choice, no timing at the first forwards of each shape.
    - `dconv`: "torch" (Demucs' modules) or "triton" (`fused_dconv`: each DConv branch's 1x1
      conv, GroupNorm, GLU and LayerScale in two Triton kernels that never write the conv's
      2C channels; CUDA, or the CPU under `TRITON_INTERPRET=1` for tests; not with
      `compile="compile"`, where Inductor fuses those layers itself).
    """
    device: tp.Optional[str] = None
    precision: str = "fp32"
    compile: str = "none"
    max_batch: int = DEFAULT_MAX_BATCH
    memory_fraction: float = 0.85
    compile_backend: str = "inductor"
    group_norm: str = "fp32"
    cudnn_benchmark: bool = True
    dconv: str = "torch"

    def __post_init__(self):
        on_cpu = self.dconv == "triton" and (self.device or _default_device()).startswith("cpu")
        problem = modes_problem(self.precision, self.compile, self.group_norm, self.dconv, on_cpu)
        if problem is not None:
            raise ValueError(problem)
        if self.max_batch < 1 or not 0 < self.memory_fraction <= 1:
            raise ValueError("max_batch must be >= 1 and memory_fraction in (0, 1]")


def _default_device() -> str:
    from .separator import default_device  # torch: only for a device left to choose
    return default_device()
