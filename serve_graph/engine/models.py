"""Model loading through Demucs' own path, and random-weight models in Demucs' checkpoint format.

`load_model` goes through `demucs.pretrained.get_model`: a pretrained name (downloaded by Demucs
into its caches) or a name/signature from a local model repo folder, which holds
`<sig>-<checksum>.th` checkpoints and `<name>.yaml` bags. When weights are missing the error names
the file and where to put it, since this may run where nothing can be downloaded.
"""
import hashlib
import io
import time
import typing as tp
from fractions import Fraction
from pathlib import Path

import torch as th
import yaml
from demucs.apply import BagOfModels
from demucs.demucs import Demucs
from demucs.hdemucs import HDemucs
from demucs.htdemucs import HTDemucs
from demucs.pretrained import get_model
from demucs.repo import ModelLoadingError

from . import roformer_files
from .errors import ModelNotFoundError
from .model_files import DEFAULT_MODEL, check_local_repo, remote_hint
from .plan import LengthRule, ModelGeometry
from .roformer import RoformerSeparator

SOURCES = ["drums", "bass", "other", "vocals"]

# The architecture of the pretrained `htdemucs` (signature 955717e8), from its checkpoint's kwargs.
HTDEMUCS_KWARGS: tp.Dict[str, tp.Any] = dict(
    sources=SOURCES, audio_channels=2, samplerate=44100, segment=Fraction(39, 5),
    channels=48, growth=2, nfft=4096, depth=4, rewrite=True, cac=True,
    wiener_iters=0, end_iters=0, freq_emb=0.2, emb_scale=10, emb_smooth=True,
    kernel_size=8, stride=4, time_stride=2, context=1, context_enc=0,
    norm_starts=4, norm_groups=4, dconv_mode=3, dconv_depth=2, dconv_comp=8, dconv_init=1e-3,
    bottom_channels=512, t_layers=5, t_hidden_scale=4.0, t_heads=8, t_dropout=0.0,
    t_emb="sin", t_layer_scale=True, t_gelu=True, rescale=0.1,
)

# A few-thousand-parameter HTDemucs with the same code paths, for tests (1 s segment).
TINY_KWARGS: tp.Dict[str, tp.Any] = dict(
    sources=SOURCES, audio_channels=2, samplerate=44100, segment=Fraction(1, 1),
    channels=8, growth=2, nfft=64, depth=2, dconv_comp=4, t_layers=1, t_heads=2,
    t_hidden_scale=1.0, bottom_channels=0, norm_starts=4,
)

# Tiny models of the other architectures Demucs ships, for tests: HDemucs (v3 hybrid:
# hdemucs_mmi, the mdx bags) runs on windows of any length; Demucs (v2 time domain, in the
# mdx bags) pads each window to its `valid_length`.
TINY_ARCHITECTURES: tp.Dict[str, tp.Tuple[type, tp.Dict[str, tp.Any]]] = {
    "htdemucs": (HTDemucs, TINY_KWARGS),
    "hdemucs": (HDemucs, dict(channels=8, depth=2, nfft=64, dconv_comp=4, segment=4)),
    "demucs": (Demucs, dict(channels=8, depth=3, lstm_layers=0, dconv_comp=4, segment=4)),
}



class StandInModel(th.nn.Module):
    """htdemucs' interface and exact window geometry (7.8 s windows of a fixed input length,
    four sources, 44.1 kHz stereo) with a forward that costs almost nothing: each source is the
    mix times a gain. For benchmarks of everything but the model (`make-repo --size standin`).

    `seconds_per_window` > 0 makes it a simulated accelerator: each forward also waits that
    long per window without using a core (the GIL released, as a CPU thread waits for a GPU's
    kernels), so that a pipeline can be shown to keep a model of a GPU's speed busy on a box
    without one (`benchmarks/batch_busy.py`).
    """

    def __init__(self, sources: tp.Sequence[str] = tuple(SOURCES), audio_channels: int = 2,
                 samplerate: int = 44100, segment: Fraction = Fraction(39, 5),
                 seconds_per_window: float = 0.):
        super().__init__()
        self.sources, self.audio_channels = list(sources), audio_channels
        self.samplerate, self.segment = samplerate, segment
        self.seconds_per_window = seconds_per_window
        self.use_train_segment = True  # every window padded to the segment, as HTDemucs does
        self.gains = th.nn.Parameter(th.linspace(0.1, 0.4, len(self.sources)))
        self._init_args_kwargs = ((), dict(sources=list(sources), audio_channels=audio_channels,
                                           samplerate=samplerate, segment=segment,
                                           seconds_per_window=seconds_per_window))

    def forward(self, mix: th.Tensor) -> th.Tensor:
        """`[B, C, L]` -> `[B, S, C, L]`."""
        if self.seconds_per_window:
            time.sleep(self.seconds_per_window * mix.shape[0])
        return mix[:, None] * self.gains[None, :, None, None]


Model = tp.Union[th.nn.Module, BagOfModels]  # a RoFormer: a `RoformerSeparator`


def load_model(name: str = DEFAULT_MODEL, repo: tp.Optional[tp.Union[str, Path]] = None) -> Model:
    """Load `name` (pretrained name, bag name or signature) the way `demucs.separate -n name
    [--repo repo]` does; a RoFormer when `repo` holds `<name>.ckpt` (`roformer_files`).
    Raises `ModelNotFoundError` saying which file is missing and where."""
    if roformer_files.is_roformer(name, repo):
        return RoformerSeparator(roformer_files.load(name, repo))
    if repo is not None:
        repo = Path(repo)
        check_local_repo(name, repo)
        try:
            model = get_model(name, repo=repo)
        except ModelLoadingError as exc:
            raise ModelNotFoundError(f"model repo {repo}: {exc}") from exc
    else:
        try:
            model = get_model(name)
        except Exception as exc:  # network errors, missing cache, unknown name
            raise ModelNotFoundError(remote_hint(name, exc)) from exc
    model.eval()
    return model


def sub_models(model: Model) -> tp.List[th.nn.Module]:
    """The models of a bag, or `[model]`."""
    return list(model.models) if isinstance(model, BagOfModels) else [model]


def model_geometry(model: Model) -> ModelGeometry:
    """Segment and input lengths (samples) of each sub-model, sources and bag weights."""
    if isinstance(model, RoformerSeparator):
        return roformer_geometry(model)
    models = sub_models(model)
    segment_lengths = tuple(int(m.samplerate * m.segment) for m in models)
    input_lengths = tuple(_input_length_rule(m, length)
                          for m, length in zip(models, segment_lengths))
    if isinstance(model, BagOfModels):
        weights = tuple(tuple(float(w) for w in ws) for ws in model.weights)
    else:
        weights = (tuple(1. for _ in model.sources),)
    return ModelGeometry(model.samplerate, model.audio_channels, tuple(model.sources),
                         segment_lengths, input_lengths, weights, isinstance(model, BagOfModels),
                         tuple(_forward_draw_bound(m) for m in models))


# GFLOP of one window of the full-size htdemucs (343,980 samples), as torch.utils.flop_counter
# counts them (benchmarks/roformer_windows.py measures it again): the unit of the budget
HTDEMUCS_WINDOW_GFLOP = 224.47


def roformer_geometry(model: RoformerSeparator) -> ModelGeometry:
    """One model on fixed windows of its chunk, MSST's windowing (`plan.plan_demix`); a
    window costs its GFLOP over an htdemucs window's (viperx's BS-RoFormer: 38.7)."""
    config = model.config
    return ModelGeometry(config.samplerate, config.channels, tuple(model.sources),
                         (config.chunk_size,), (config.chunk_size,),
                         (tuple(1. for _ in model.sources),), False, (0,),
                         family="roformer", num_overlap=config.num_overlap,
                         window_cost=model.roformer.window_gflop(config.chunk_size)
                         / HTDEMUCS_WINDOW_GFLOP)


def _forward_draw_bound(model: th.nn.Module) -> int:
    """`n` when a forward of `model` calls `random.randrange(n)` once, else 0."""
    transformer = getattr(model, "crosstransformer", None)
    if isinstance(model, HTDemucs) and transformer is not None and transformer.emb == "sin":
        return transformer.sin_random_shift + 1
    return 0


def _input_length_rule(model: th.nn.Module, segment_length: int) -> LengthRule:
    """What `apply_model` pads a window to: the training segment (HTDemucs), the model's
    `valid_length` (Demucs v2), or nothing (HDemucs)."""
    if isinstance(model, (HTDemucs, StandInModel)) and model.use_train_segment:
        return int(model.segment * model.samplerate)
    if hasattr(model, "valid_length"):
        return _steps(model.valid_length, segment_length)
    return None


def _steps(rule: tp.Callable[[int], int], longest: int) -> tp.Tuple[tp.Tuple[int, int], ...]:
    """A non-decreasing `rule` over lengths 1..`longest` as `((first length, value), ...)`,
    one entry per value: found by bisection, a few hundred steps for a 44 s segment instead
    of a table of two million lengths."""
    steps = []
    length = 1
    while length <= longest:
        value = rule(length)
        low, high = length, longest  # the last length with this value
        while low < high:
            middle = (low + high + 1) // 2
            if rule(middle) == value:
                low = middle
            else:
                high = middle - 1
        steps.append((length, value))
        length = low + 1
    return tuple(steps)


def build_htdemucs(kwargs: tp.Optional[dict] = None, seed: int = 0) -> HTDemucs:
    """An HTDemucs (full-size `htdemucs` architecture by default) with random weights."""
    th.manual_seed(seed)
    model = HTDemucs(**dict(HTDEMUCS_KWARGS if kwargs is None else kwargs))
    return model.eval()


def save_checkpoint(model: th.nn.Module, repo: tp.Union[str, Path], sig: str) -> Path:
    """Save `model` as Demucs does (`states.serialize_model` + `save_with_checksum`):
    `{klass, args, kwargs, state}` in `repo/<sig>-<sha256[:8]>.th`."""
    args, kwargs = model._init_args_kwargs
    package = {"klass": model.__class__, "args": args, "kwargs": kwargs,
               "state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
               "training_args": {}}
    buf = io.BytesIO()
    th.save(package, buf)
    checksum = hashlib.sha256(buf.getvalue()).hexdigest()[:8]
    path = Path(repo) / f"{sig}-{checksum}.th"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return path


def save_bag(repo: tp.Union[str, Path], name: str, signatures: tp.List[str],
             weights: tp.Optional[tp.List[tp.List[float]]] = None,
             segment: tp.Optional[float] = None) -> Path:
    """Write the bag file `repo/<name>.yaml` that Demucs' `BagOnlyRepo` reads."""
    bag: tp.Dict[str, tp.Any] = {"models": list(signatures)}
    if weights is not None:
        bag["weights"] = weights
    if segment is not None:
        bag["segment"] = segment
    path = Path(repo) / f"{name}.yaml"
    path.write_text(yaml.safe_dump(bag))
    return path


def random_model(size: str = "full", arch: str = "htdemucs",
                 sources: tp.Optional[tp.Sequence[str]] = None, seed: int = 0) -> th.nn.Module:
    """A model with random weights: `size` "full" (htdemucs' architecture), "tiny" (a few
    thousand parameters of `arch`: htdemucs, hdemucs or demucs) or "standin"
    (`StandInModel`), separating `sources` (default: htdemucs' four)."""
    sources = list(sources or SOURCES)
    if size == "standin":
        return StandInModel(sources)
    if size == "full":
        if arch != "htdemucs":
            raise ValueError("full size exists for the htdemucs architecture only")
        return build_htdemucs({**HTDEMUCS_KWARGS, "sources": sources}, seed=seed)
    klass, kwargs = TINY_ARCHITECTURES[arch]
    th.manual_seed(seed)
    return klass(**{**kwargs, "sources": sources}).eval()


def make_random_repo(repo: tp.Union[str, Path], name: str = DEFAULT_MODEL, size: str = "full",
                     num_models: int = 1, weights: tp.Optional[tp.List[tp.List[float]]] = None,
                     seed: int = 0, sources: tp.Optional[tp.Sequence[str]] = None,
                     arch: tp.Union[str, tp.Sequence[str]] = "htdemucs",
                     segment: tp.Optional[float] = None) -> Path:
    """Create a local model repo holding bag `name` of `num_models` random models (see
    `random_model`; `arch` one name, or one per sub-model), with the bag's per-source
    `weights` and `segment` (seconds, as hdemucs_mmi's and the mdx bags' files set it).
    Returns the repo folder."""
    archs = [arch] * num_models if isinstance(arch, str) else list(arch)
    signatures = []
    for index, model_arch in enumerate(archs):
        sig = hashlib.sha1(f"{name}-{size}-{model_arch}-{seed}-{index}".encode()).hexdigest()[:8]
        save_checkpoint(random_model(size, model_arch, sources, seed + index), repo, sig)
        signatures.append(sig)
    save_bag(repo, name, signatures, weights, segment)
    return Path(repo)
