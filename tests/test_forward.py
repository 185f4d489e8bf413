"""The fast forward path on the CPU: HTDemucs split for compilation, compiled runs, batch
pieces for CUDA graphs, and the out-of-memory back-off driven by a fake allocator limit."""
import copy

import pytest
import torch as th

from serve_graph.engine import ModelRunner, separate
from serve_graph.engine.forward import (BatchLimit, HTDemucsCore, Spectral, SplitForward,
                                        bucket_pieces, bucket_sizes, graph_safe,
                                        memory_limit, run_with_backoff)
from serve_graph.engine.models import sub_models
from serve_graph.engine.separator import RunnerOptions
from test_parity import residual_db

MIX = th.randn(2, 100000, generator=th.Generator().manual_seed(5)) * 0.3


@pytest.fixture
def htdemucs(tiny_model):
    """The tiny bag's one HTDemucs, a copy of it."""
    return copy.deepcopy(sub_models(tiny_model)[0])


def windows(count: int, model) -> th.Tensor:
    length = int(model.segment * model.samplerate)
    return th.randn(count, 2, length, generator=th.Generator().manual_seed(count)) * 0.3


def test_split_forward_is_htdemucs_forward(htdemucs):
    inputs = windows(3, htdemucs)
    with th.inference_mode():
        split = SplitForward(htdemucs, HTDemucsCore(htdemucs), th.device("cpu"))(inputs)
        whole = htdemucs(inputs)
    assert split.shape == whole.shape == (3, 4, 2, inputs.shape[-1])
    assert th.allclose(split, whole, rtol=0, atol=1e-6)


def test_spectral_transforms_are_htdemucs_own(htdemucs):
    """The graph-capturable STFT/iSTFT compute exactly what HTDemucs' `_spec`/`_ispec` do."""
    inputs = windows(2, htdemucs)
    spectral = Spectral(htdemucs, th.device("cpu"))
    z = htdemucs._spec(inputs)
    assert th.equal(spectral.spec(inputs), z)
    assert th.equal(spectral.ispec(z, inputs.shape[-1]), htdemucs._ispec(z, inputs.shape[-1]))
    estimate = th.randn(z.shape, dtype=z.dtype, generator=th.Generator().manual_seed(1))
    assert estimate[..., 0, :].imag.abs().min() > 0  # as the model's: the DC bin is not real
    assert th.equal(spectral.ispec(estimate, inputs.shape[-1]),
                    htdemucs._ispec(estimate, inputs.shape[-1]))


def test_compiled_runner_matches_eager_and_compiles_nothing_on_a_request_s_path(tiny_model):
    """What the runner compiled at its start serves every request's windows: a song's (made
    outside inference mode), a piece of a larger batch at an offset into its storage, a lone
    last window at one. A guard that failed would compile again, on the request's path."""
    eager = separate(ModelRunner(copy.deepcopy(tiny_model), "cpu"), MIX, batch_size=3)
    options = RunnerOptions("cpu", compile="compile", compile_backend="eager", max_batch=3)
    runner = ModelRunner(copy.deepcopy(tiny_model), options=options)
    length = runner.geometry.input_length(0, runner.geometry.segment_lengths[0])
    windows = th.randn(5, runner.geometry.audio_channels, length) * 0.1
    with th._dynamo.config.patch(error_on_recompile=True):
        compiled = separate(runner, MIX, batch_size=3)
        pieces = [runner(0, windows[1:4]), runner(0, windows[4:])]
    assert residual_db(compiled, eager).max() <= -120
    assert [piece.shape[0] for piece in pieces] == [3, 1]


def test_random_positional_shift_is_not_graph_safe(htdemucs):
    model = htdemucs
    assert graph_safe(model)
    model.crosstransformer.sin_random_shift = 3  # each forward would draw a shift
    assert not graph_safe(model)
    model.crosstransformer.sin_random_shift = 0
    assert not graph_safe(model.train())


def test_buckets_cover_any_batch_padding_at_most_seven_windows_up_to_64():
    assert bucket_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert bucket_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert bucket_sizes(4) == [1, 2, 4] and bucket_sizes(3) == [1, 2, 3]
    assert bucket_sizes(1) == [1] and bucket_sizes(0) == [1]
    assert bucket_sizes(256)[10:] == [64, 96, 128, 160, 192, 224, 256]  # 17 graphs, not 35
    assert bucket_sizes(100)[10:] == [64, 96, 100]
    buckets = bucket_sizes(64)
    assert bucket_pieces(37, buckets) == [(40, 37)]  # a 216 s song's windows: one replay
    assert bucket_pieces(150, buckets) == [(64, 64), (64, 64), (24, 22)]
    for limit in (1, 3, 4, 20, 64, 100, 256):
        buckets = bucket_sizes(limit)
        for count in range(1, 600):
            pieces = bucket_pieces(count, buckets)
            assert sum(used for _, used in pieces) == count
            assert all(size in buckets and 0 < used <= size for size, used in pieces)
            assert all(used == size for size, used in pieces[:-1])
            last, used = pieces[-1]
            assert last - used < (8 if used <= 64 else 32)
            assert len(pieces) == -(-count // limit)


def test_memory_limit_arithmetic():
    gib = 2**30
    assert memory_limit(2 * gib, gib, 80 * gib, 0.85, 64) == 64
    assert memory_limit(2 * gib, gib, 80 * gib, 0.85, 128) == 66
    assert memory_limit(2 * gib, gib, 10 * gib, 0.5, 64) == 3
    assert memory_limit(20 * gib, gib, 10 * gib, 0.5, 64) == 1


class FakeAllocator:
    """A forward that runs out of memory above `capacity` windows, as the CUDA allocator would."""

    def __init__(self, forward, capacity: int):
        self.forward, self.capacity, self.sizes = forward, capacity, []

    def around(self, forward) -> "FakeAllocator":
        """This allocator in front of `forward` (`ModelRunner.wrap_forward`'s `wrap`)."""
        self.forward = forward
        return self

    def __call__(self, batch: th.Tensor) -> th.Tensor:
        self.sizes.append(batch.shape[0])
        if batch.shape[0] > self.capacity:
            raise th.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.forward(batch)


def test_backoff_halves_and_retries_until_the_batch_fits():
    inputs = th.arange(10.).reshape(10, 1)
    allocator = FakeAllocator(lambda batch: batch * 2, capacity=3)
    limit, freed = BatchLimit(8), []
    pieces = run_with_backoff(allocator, inputs, limit, lambda: freed.append(True))
    assert th.equal(th.cat(pieces), inputs * 2)
    assert limit.limit == 2 and limit.halvings == 2 and len(freed) == 2
    assert allocator.sizes[:3] == [8, 4, 2] and max(p.shape[0] for p in pieces) == 2


def test_backoff_gives_up_at_one_window_and_passes_other_errors():
    with pytest.raises(RuntimeError, match="single window"):
        run_with_backoff(FakeAllocator(lambda b: b, capacity=0), th.zeros(2, 1), BatchLimit(2))

    def broken(batch):
        raise ValueError("not a memory problem")
    limit = BatchLimit(4)
    with pytest.raises(ValueError):
        run_with_backoff(broken, th.zeros(4, 1), limit)
    assert limit.limit == 4


@pytest.mark.parametrize("message", ["cuFFT error: CUFFT_ALLOC_FAILED",
                                     "cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
                                     "CUDA error: out of memory"])
def test_library_allocation_failures_back_off_too(message):
    """cuFFT, cuDNN and cuBLAS report a failed workspace allocation in their own words."""
    def forward(batch):
        if batch.shape[0] > 1:
            raise RuntimeError(message)
        return batch
    limit = BatchLimit(4)
    assert len(run_with_backoff(forward, th.zeros(4, 1), limit)) == 4 and limit.limit == 1


def test_runner_survives_out_of_memory_with_the_same_stems(tiny_model):
    """A runner whose device holds only 2 windows still separates, with identical stems."""
    reference = separate(ModelRunner(copy.deepcopy(tiny_model), "cpu"), MIX, batch_size=8)
    runner = ModelRunner(copy.deepcopy(tiny_model), options=RunnerOptions("cpu", max_batch=8))
    allocator = FakeAllocator(None, capacity=2)
    runner.wrap_forward(0, allocator.around)
    stems = separate(runner, MIX, batch_size=8)
    assert th.equal(stems, reference)
    assert runner.batch_limit() == 2 and max(allocator.sizes) > 2  # it did run out first


def test_the_configs_gpu_levers_reach_the_model_runner(monkeypatch):
    """serve_config.yaml's GPU levers (precision, compile, group_norm, cudnn_benchmark, dconv)
    are what Separate's runner gets; each can be switched there."""
    from pathlib import Path

    import yaml

    from serve_graph.settings import MODEL_ENV, REPO_ENV, ServiceSettings
    monkeypatch.delenv(MODEL_ENV, raising=False)
    monkeypatch.delenv(REPO_ENV, raising=False)
    config = yaml.safe_load((Path(__file__).parents[1] / "serve_config.yaml").read_text())
    args = config["applications"][0]["args"]
    shipped = ServiceSettings.from_args(args).runner_options()
    levers = ("precision", "compile", "group_norm", "cudnn_benchmark", "dconv")
    assert {name: getattr(shipped, name) for name in levers} == {
        name: args[name] for name in levers}
    switched = ServiceSettings.from_args({**args, "precision": "bf16", "compile": "compile",
                                          "group_norm": "half", "cudnn_benchmark": False})
    options = switched.runner_options()
    assert (options.precision, options.compile, options.group_norm,
            options.cudnn_benchmark) == ("bf16", "compile", "half", False)
    fused = ServiceSettings.from_args({**args, "compile": "graphs", "dconv": "triton"})
    assert fused.runner_options().dconv == "triton"
    with pytest.raises(ValueError, match="cudnn_benchmark must be true or false"):
        ServiceSettings.from_args({**args, "cudnn_benchmark": "yes"})
    # a bad mode is refused where the settings are read (the launcher, before Ray starts), not
    # in the Separate replicas' constructors
    with pytest.raises(ValueError, match=r"compile must be one of \('none', 'graphs'"):
        ServiceSettings.from_args({**args, "compile": "fast"})
    with pytest.raises(ValueError, match="Inductor fuses the DConv layers itself"):
        ServiceSettings.from_args({**args, "compile": "compile", "dconv": "triton"})
