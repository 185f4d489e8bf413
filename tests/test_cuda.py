"""The CUDA path, run on a GPU machine (skipped elsewhere): fp32 parity with the CPU reference,
CUDA graphs and compiled runs against eager, batch sizes that follow free memory, and the
out-of-memory back-off under a forced memory cap."""
import copy

import pytest
import torch as th

from serve_graph.engine import ModelRunner, load_model, make_random_repo, separate
from serve_graph.engine.separator import RunnerOptions
from test_parity import residual_db

pytestmark = pytest.mark.skipif(not th.cuda.is_available(), reason="needs a CUDA GPU")
GIB = 2**30


@pytest.fixture(scope="module")
def full_model(tmp_path_factory):
    """The full-size htdemucs architecture, random weights, loaded through Demucs' path."""
    repo = make_random_repo(tmp_path_factory.mktemp("full_repo"), "htdemucs", size="full")
    return load_model("htdemucs", repo)


@pytest.fixture(scope="module")
def mix():
    """12 s of noise-like stereo: three windows of htdemucs."""
    return th.randn(2, 12 * 44100, generator=th.Generator().manual_seed(7)) * 0.2


@pytest.fixture(scope="module")
def cpu_reference(full_model, mix):
    return separate(ModelRunner(copy.deepcopy(full_model), "cpu"), mix, batch_size=3)


def cuda_stems(model, mix, **options):
    runner = ModelRunner(copy.deepcopy(model), options=RunnerOptions("cuda", **options))
    return separate(runner, mix, batch_size=3), runner


def test_fp32_on_cuda_matches_the_cpu_reference(full_model, mix, cpu_reference):
    stems, _ = cuda_stems(full_model, mix, precision="fp32")
    assert not th.backends.cudnn.allow_tf32 and not th.backends.cuda.matmul.allow_tf32
    assert residual_db(stems, cpu_reference).max() <= -80


@pytest.mark.parametrize("precision,bound", [("tf32", -30), ("bf16", -15), ("fp16", -15)])
def test_lower_precisions_give_the_same_separation(full_model, mix, cpu_reference, precision,
                                                   bound):
    """Their residuals are recorded by benchmarks/gpu.py; here: finite and the same stems."""
    stems, _ = cuda_stems(full_model, mix, precision=precision)
    residual = residual_db(stems, cpu_reference).max()
    print(f"{precision}: residual {float(residual):.1f} dB")
    assert th.isfinite(stems).all() and residual <= bound


@pytest.mark.parametrize("timed", [False, True])
def test_cudnn_benchmark_follows_the_option_and_keeps_fp32_parity(full_model, mix,
                                                                  cpu_reference, timed):
    """serve_config.yaml's `cudnn_benchmark`: cuDNN's timed kernels or its heuristics; fp32
    parity either way (TF32 stays off)."""
    stems, _ = cuda_stems(full_model, mix, precision="fp32", cudnn_benchmark=timed)
    assert th.backends.cudnn.benchmark is timed
    assert residual_db(stems, cpu_reference).max() <= -80


def test_cuda_graphs_replay_the_eager_forward(full_model, mix):
    """The mix's 3 windows replay the graph of 4, padded with a silent window."""
    eager, _ = cuda_stems(full_model, mix, precision="fp32")
    graphed, runner = cuda_stems(full_model, mix, precision="fp32", compile="graphs",
                                 max_batch=4)
    assert runner.graphs[0] is not None and runner.graphs[0].buckets == [1, 2, 4]
    assert residual_db(graphed, eager).max() <= -100


def test_compiled_and_graphed_tiny_model_matches_eager(tiny_model):
    mix = th.randn(2, 100000, generator=th.Generator().manual_seed(3)) * 0.3
    eager, _ = cuda_stems(tiny_model, mix, precision="fp32")
    compiled, runner = cuda_stems(tiny_model, mix, precision="fp32", compile="compile",
                                  max_batch=4)
    assert runner.graphs[0] is not None
    assert residual_db(compiled, eager).max() <= -80


@pytest.fixture
def memory_cap():
    """Cap this process' CUDA memory at `cap(bytes)` for one test, then lift the cap."""
    def cap(total: int) -> None:
        th.cuda.empty_cache()
        capacity = th.cuda.get_device_properties(0).total_memory
        th.cuda.set_per_process_memory_fraction(min(1., total / capacity))
    yield cap
    th.cuda.set_per_process_memory_fraction(1.)
    th.cuda.empty_cache()


def test_batch_limit_follows_free_memory(full_model):
    runner = ModelRunner(copy.deepcopy(full_model),
                         options=RunnerOptions("cuda", max_batch=1024, memory_fraction=0.5))
    free, _ = th.cuda.mem_get_info()
    assert 1 <= runner.batch_limit() < 1024
    low = ModelRunner(copy.deepcopy(full_model),
                      options=RunnerOptions("cuda", max_batch=1024, memory_fraction=0.05))
    assert low.batch_limit() < runner.batch_limit()
    print(f"batch limit {runner.batch_limit()} at half of {free / GIB:.1f} GiB free")


def test_out_of_memory_backs_off_and_the_request_still_succeeds(full_model, mix, memory_cap):
    runner = ModelRunner(copy.deepcopy(full_model),
                         options=RunnerOptions("cuda", precision="fp32", max_batch=16))
    runner.limits[0].limit = 16  # as if measured with more memory free than there is now
    expected = separate(runner, mix, shifts=3, batch_size=1)
    memory_cap(th.cuda.memory_allocated() + 4 * GIB)  # room for a few windows, not 16
    stems = separate(runner, mix, shifts=3, batch_size=16)
    assert runner.limits[0].halvings >= 1 and runner.batch_limit() < 16
    assert residual_db(stems, expected).max() <= -100


def test_graph_capture_under_a_memory_cap_captures_what_fits(full_model, mix, memory_cap):
    memory_cap(th.cuda.memory_allocated() + 6 * GIB)
    stems, runner = cuda_stems(full_model, mix, precision="fp32", compile="graphs", max_batch=64)
    assert runner.graphs[0] is not None and max(runner.graphs[0].buckets) < 64
    assert th.isfinite(stems).all()


@pytest.mark.parametrize("compile_mode", ["none", "graphs"])
def test_fp16_windows_that_overflow_are_run_again_in_fp32_on_cuda(tiny_model, compile_mode):
    """The finite flags come back with the stems (graphs replayed or not), and the windows
    that overflowed fp16 get the fp32 stems."""
    from test_precision import overflowing, windows_of
    fp16 = ModelRunner(overflowing(tiny_model), options=RunnerOptions(
        "cuda", "fp16", compile_mode, max_batch=4))
    windows = windows_of(fp16, 3)
    windows[1] = 0  # silence: finite in fp16
    out = fp16(0, windows)
    assert fp16.fp32_redone_windows == 2 and th.isfinite(out).all()
    exact = ModelRunner(overflowing(tiny_model), "cuda", "fp32")(0, windows)
    assert residual_db(out[[0, 2]], exact[[0, 2]]).max() < -100
