"""The engine's run modes by name, shared by the CLI, the settings and the model runner: plain
constants, so that a command line is parsed without importing torch."""

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")  # tf32: fp32 with TF32 matmuls; bf16/fp16: autocast
COMPILE_MODES = ("none", "graphs", "compile")  # CUDA graphs; torch.compile (+ graphs on CUDA)
GROUP_NORMS = ("fp32", "half")  # GroupNorm under autocast: upcast to fp32, or kept half
DCONVS = ("torch", "triton")  # HTDemucs' DConv branch tails: PyTorch modules, or fused kernels
