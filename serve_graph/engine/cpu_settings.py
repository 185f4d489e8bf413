"""CPU speed settings chosen for the machine this process runs on, not the one they were
measured on. Torch-free: what must be in place before torch loads is decided and set here.

Four settings, each chosen by a rule from what the machine reports (its CPU flags, its C
library, its transparent-huge-page modes, its cores) and the precision; the measurements
behind each rule are in `benchmarks/RESULTS.md` ("CPU settings"):

- `memory`: "keep" (default on glibc): freed memory stays in the process (glibc's
  `mmap_max=0`, no trimming, one arena), so the ~1.6 GB of activations of each window are
  page-faulted once, not on every forward. PyTorch's CPU allocator returns every large block
  to the kernel; zero-filling fresh 4 KiB pages cost ~25 % of a window on one EPYC, and
  transparent huge pages (PyTorch's `THP_MEM_ALLOC_ENABLE`, "huge-pages" here), the earlier
  cure, made the kernel compact memory on each allocation where THP `defrag` is `madvise`
  and cost ~30 % on another. "default": PyTorch's own allocation, as `demucs.separate` runs.
- `attention`: "sdpa" (fp32/tf32): self-attention in `scaled_dot_product_attention`'s fused
  kernel instead of MultiheadAttention's CPU "fast path" (bmm + softmax), same fp32 numerics;
  "fast-path" for bf16/fp16, where the fused kernel is the slower one.
- `omp_wait`: OpenMP's wait policy between parallel regions ("default": libgomp spins a
  while, then sleeps; "active"; "passive").
- `threads`: intra-op threads; the rule: the physical cores this process may run on
  (0: PyTorch's default).

`SERVE_GRAPH_CPU_TUNING` forces them: unset or "auto" (the rules), "off" or "0" (PyTorch's
defaults: `demucs.separate`'s settings), or a comma list over the rules such as
`memory=default,omp_wait=passive,threads=4`.

Where each is applied: `memory` (a glibc tunable) must be in a process's environment when it
starts (`process_env`, for Ray workers) or set by `prepare_process` before the first large
allocation of a thread that runs the model on the main arena (the CLI); `omp_wait` and
"huge-pages" before torch is imported (`prepare_process`); `attention` and `threads` on torch
(`apply_to_torch`).
"""
import ctypes
import functools
import logging
import os
import sys
import typing as tp
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ENV = "SERVE_GRAPH_CPU_TUNING"
MEMORY_MODES = ("keep", "huge-pages", "default")
ATTENTION_PATHS = ("sdpa", "fast-path")
OMP_WAIT_POLICIES = ("default", "active", "passive")
# glibc keeps freed memory: no mmap'd chunks, no trimming of the heap's top, one arena (threads
# other than the main one get 64 MiB heaps whose larger blocks would be mmap'd anyway)
KEEP_TUNABLES = ("glibc.malloc.mmap_max=0", "glibc.malloc.trim_threshold=1099511627776",
                 "glibc.malloc.arena_max=1")
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt(3) parameters
_NEEDS = {"bf16": ("avx512_bf16", "amx_bf16"), "fp16": ("avx512_fp16", "amx_fp16")}
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Machine:
    """What this machine reports: CPU flags, C library, THP modes, usable physical cores."""
    flags: tp.FrozenSet[str]
    libc: str  # "glibc", or "" where it is another
    thp_enabled: str  # always / madvise / never / unknown
    thp_defrag: str  # always / defer / defer+madvise / madvise / never / unknown
    cores: int  # physical cores in this process's CPU affinity

    @classmethod
    @functools.lru_cache(maxsize=1)
    def read(cls) -> "Machine":
        """This machine, read once per process (the CLI, a replica and each model runner
        ask for it)."""
        import platform
        return cls(frozenset(_cpu_flags()), platform.libc_ver()[0], _thp_mode("enabled"),
                   _thp_mode("defrag"), _physical_cores())

    @property
    def kind(self) -> str:
        """The SIMD class that decides CPU speed: AMX, AVX-512-BF16, AVX-512, AVX2 or older."""
        for flag, name in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512-BF16"),
                           ("avx512f", "AVX-512"), ("avx2", "AVX2")):
            if flag in self.flags:
                return name
        return "older than AVX2"


@dataclass(frozen=True)
class CpuSettings:
    """The settings of one process (see the module docstring); `source`: "auto" (the rules),
    "off" (PyTorch's defaults) or "forced" (`SERVE_GRAPH_CPU_TUNING` overrides)."""
    memory: str = "default"
    attention: str = "fast-path"
    omp_wait: str = "default"
    threads: int = 0
    source: str = "off"

    def __post_init__(self):
        for name, allowed in (("memory", MEMORY_MODES), ("attention", ATTENTION_PATHS),
                              ("omp_wait", OMP_WAIT_POLICIES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{ENV}: {name} must be one of {allowed}, "
                                 f"got {getattr(self, name)!r}")
        if self.threads < 0:
            raise ValueError(f"{ENV}: threads must be >= 0, got {self.threads}")

    def process_env(self) -> tp.Dict[str, str]:
        """Environment variables that give a process started with them these settings
        (merged into what `environ` already holds for GLIBC_TUNABLES)."""
        env = {}
        if self.memory == "keep":
            env["GLIBC_TUNABLES"] = _merge_tunables(os.environ.get("GLIBC_TUNABLES", ""))
        if self.memory == "huge-pages":
            env["THP_MEM_ALLOC_ENABLE"] = "1"
        if self.omp_wait != "default":
            env["OMP_WAIT_POLICY"] = self.omp_wait.upper()
        return env


def choose(precision: str = "fp32", machine: tp.Optional[Machine] = None,
           forced: tp.Optional[str] = None) -> CpuSettings:
    """The settings for running the model at `precision` on `machine` (this one by default),
    under `forced` (default: the `SERVE_GRAPH_CPU_TUNING` environment variable)."""
    machine = machine or Machine.read()
    forced = os.environ.get(ENV, "auto") if forced is None else forced
    words = [word.strip() for word in forced.split(",") if word.strip()] or ["auto"]
    if words[0] in ("off", "0"):
        base, words = CpuSettings(), words[1:]
    else:
        base = CpuSettings(memory="keep" if machine.libc == "glibc" else "default",
                           attention="sdpa" if precision in ("fp32", "tf32") else "fast-path",
                           omp_wait=_omp_wait_from_env(), threads=machine.cores, source="auto")
        words = words[1:] if words[0] == "auto" else words
    overrides = dict(_override(word) for word in words)
    return replace(base, source="forced", **overrides) if overrides else base


def _override(word: str) -> tp.Tuple[str, tp.Any]:
    name, _, value = word.partition("=")
    if name not in ("memory", "attention", "omp_wait", "threads") or not value:
        raise ValueError(f"{ENV}: expected auto, off or NAME=VALUE with NAME one of memory, "
                         f"attention, omp_wait, threads; got {word!r}")
    if name != "threads":
        return name, value
    try:
        return name, int(value)
    except ValueError:
        raise ValueError(f"{ENV}: threads must be a whole number, got {value!r}") from None


def precision_problem(precision: str, machine: tp.Optional[Machine] = None) -> tp.Optional[str]:
    """None when `precision` runs at speed on this CPU; else why not. bf16 (fp16) needs
    AVX-512-BF16 or AMX (AVX-512-FP16 or AMX-FP16): without them PyTorch runs the
    convolutions on a slow reference kernel (measured ~150 s per window instead of 3 s)."""
    needs = _NEEDS.get(precision)
    machine = machine or Machine.read()
    if needs is None or machine.flags & set(needs):
        return None
    return (f"precision {precision} on the CPU needs one of the CPU features "
            f"{', '.join(needs)}, which this CPU ({machine.kind}) lacks: PyTorch would run "
            f"the model ~50x slower than in fp32. Use fp32 here (--precision fp32, or precision: "
            f"fp32 in serve_config.yaml's args), or a GPU.")


def prepare_process(settings: CpuSettings) -> None:
    """Apply what must precede torch's import in this process: OpenMP's wait policy, huge
    pages, and glibc's keeping of freed memory where the process did not start with it (set
    now it covers the main arena: model runs on the main thread, as the CLI's; a process
    started with the tunables but told otherwise gives its memory back again)."""
    if "torch" in sys.modules:
        logger.warning("CPU settings applied after torch was imported: the OpenMP wait policy "
                       "and huge pages may not take effect")
    for name, value in settings.process_env().items():
        if name != "GLIBC_TUNABLES":
            os.environ[name] = value
    started_keeping = _started_keeping()
    libc = _libc()
    if libc is None or (settings.memory == "keep") == started_keeping:
        return
    if settings.memory == "keep":  # SIZE_MAX as the trim threshold: the top is never trimmed
        libc.mallopt(_M_MMAP_MAX, 0)
        libc.mallopt(_M_TRIM_THRESHOLD, -1)
        _MALLOPT.append("kept on the main thread")
    else:  # glibc's defaults again
        libc.mallopt(_M_MMAP_MAX, 65536)
        libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
        _MALLOPT.append("given back (PyTorch's default)")


def prepare(precision: str) -> tp.Tuple[CpuSettings, dict]:
    """This machine's settings for `precision`, what must precede torch's import applied now
    (`prepare_process`), and their description (`describe`): what a process that runs the
    model does first (the CLI, a Separate replica, a batch model actor). Raises ValueError
    for a malformed `SERVE_GRAPH_CPU_TUNING`."""
    chosen = choose(precision)
    prepare_process(chosen)
    return chosen, describe(chosen)


def apply_to_torch(settings: CpuSettings, threads: bool = True) -> None:
    """The attention path and (with `threads`) the intra-op thread count, on torch."""
    import torch as th
    th.backends.mha.set_fastpath_enabled(settings.attention == "fast-path")
    if threads and settings.threads:
        th.set_num_threads(settings.threads)


def memory_state() -> str:
    """How this process treats freed memory: "kept from the process start" (started with the
    tunables), "kept on the main thread" (set by `prepare_process`), or PyTorch's default."""
    if _MALLOPT:
        return _MALLOPT[-1]
    if _started_keeping():
        return "kept from the process start"
    return "given back (PyTorch's default)"


def describe(settings: CpuSettings, machine: tp.Optional[Machine] = None) -> dict:
    """The settings, what they rest on and how memory is treated (for the logs and `GET /`)."""
    machine = machine or Machine.read()
    state = memory_state()
    return {**asdict(settings), "memory_state": state,
            "memory_in_effect": (settings.memory == "keep") == state.startswith("kept"),
            "cpu": machine.kind, "cores": machine.cores,
            "transparent_hugepages": f"enabled={machine.thp_enabled} defrag={machine.thp_defrag}"}


def summary(described: dict) -> str:
    """One line of `describe`'s facts, for a log."""
    memory = described["memory"] + ("" if described["memory_in_effect"] else
                                    f" (NOT in effect: {described['memory_state']})")
    return (f"CPU settings ({described['source']}): memory {memory}, attention "
            f"{described['attention']}, OpenMP wait {described['omp_wait']}, threads "
            f"{described['threads'] or 'default'}; {described['cpu']}, {described['cores']} "
            f"cores, THP {described['transparent_hugepages']}")


_MALLOPT: tp.List[str] = []  # what prepare_process set at run time, if anything


def _started_keeping() -> bool:
    """Whether glibc read the keeping tunables when this process started: the variable was in
    the environment at exec (/proc/self/environ; glibc cuts it there as it parses it), and
    holds them (os.environ: glibc's copy, as Python found it at start)."""
    if "GLIBC_TUNABLES" not in _start_environ():
        return False
    return set(KEEP_TUNABLES) <= set(os.environ.get("GLIBC_TUNABLES", "").split(":"))


def _omp_wait_from_env() -> str:
    """OMP_WAIT_POLICY as the environment sets it (a deployment's runtime_env), else default."""
    policy = os.environ.get("OMP_WAIT_POLICY", "").lower()
    return policy if policy in OMP_WAIT_POLICIES else "default"


def _merge_tunables(existing: str) -> str:
    names = {tunable.split("=")[0] for tunable in KEEP_TUNABLES}
    kept = [item for item in existing.split(":") if item and item.split("=")[0] not in names]
    return ":".join(kept + list(KEEP_TUNABLES))


def _start_environ() -> tp.Dict[str, str]:
    """The environment this process was started with, not os.environ now."""
    try:
        raw = Path("/proc/self/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.decode(errors="replace").partition("=") for item in raw.split(b"\0") if item)
    return {name: value for name, _, value in pairs}


def _libc() -> tp.Optional[ctypes.CDLL]:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _cpu_flags() -> tp.List[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].split()
    except OSError:
        pass
    return []


def _thp_mode(name: str) -> str:
    try:
        text = Path(f"/sys/kernel/mm/transparent_hugepage/{name}").read_text()
    except OSError:
        return "unknown"
    chosen = [word.strip("[]") for word in text.split() if word.startswith("[")]
    return chosen[0] if chosen else "unknown"


def _physical_cores() -> int:
    """Distinct (package, core) pairs among the CPUs this process may use."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add((topology.joinpath("physical_package_id").read_text().strip(),
                       topology.joinpath("core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return len(cores) or 1
