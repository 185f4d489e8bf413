"""The window plan of a separation: the recursion of `demucs.apply.apply_model` flattened.

`apply_model` recurses (bag of models -> shifts -> split -> one chunk) and runs one chunk at a
time. Here the same recursion is flattened into a `Plan`: a list of `Window`s, each an independent
model call, so that windows can be batched together (across songs, too) and their outputs
overlap-added afterwards in any order (`overlap_add.OverlapAdd`).

Positions and lengths are in samples. A *pass* is one model of the bag at one shift offset; it
sees the mix through a *view* (the shifted signal of `apply_model`), which it splits into windows
of the model's segment length with the given overlap. Plain Python, no torch: the Ingress and
Serve's build task handle plans and geometries without importing it.
"""
import bisect
import random
import typing as tp
from dataclasses import dataclass

from .errors import InvalidParameterError

MAX_SHIFT_SECONDS = 0.5


@dataclass(frozen=True)
class ModelGeometry:
    """What planning needs to know of a model or bag of models, without the weights.

    `input_lengths[m]` says how many samples sub-model `m` takes for a window of `L` samples
    (a `LengthRule`): an int when the model always runs on windows of one length (HTDemucs),
    None when it takes the window as it is (HDemucs), else its `valid_length` as steps
    `((L0, V0), (L1, V1), ...)`: windows of `Li` up to `Li+1 - 1` samples take `Vi` (Demucs v2).
    `forward_draws[m]` is `n` when every forward of sub-model `m` calls `random.randrange(n)`
    once (HTDemucs' sin embedding does), else 0.
    """
    samplerate: int
    audio_channels: int
    sources: tp.Tuple[str, ...]
    segment_lengths: tp.Tuple[int, ...]
    input_lengths: tp.Tuple["LengthRule", ...]
    weights: tp.Tuple[tp.Tuple[float, ...], ...]
    is_bag: bool = False
    forward_draws: tp.Tuple[int, ...] = ()
    # the family's conventions: "demucs" (`apply_model`'s windows and triangle weights, the
    # mix normalised) or "roformer" (MSST's `demix`: windows of `num_overlap` per sample by
    # default, linear fades, the mix reflected at its ends, not normalised)
    family: str = "demucs"
    num_overlap: int = 0
    # what one window costs, in windows of htdemucs (the request budget counts these)
    window_cost: float = 1.

    @property
    def normalises(self) -> bool:
        """Whether each window's input is the mix normalised by its mean and std (Demucs)."""
        return self.family == "demucs"

    @property
    def num_models(self) -> int:
        return len(self.segment_lengths)

    def input_length(self, model_index: int, length: int) -> int:
        """Samples fed to sub-model `model_index` for a window of `length` samples."""
        rule = self.input_lengths[model_index]
        if rule is None:
            return length
        if isinstance(rule, int):
            return rule
        return rule[bisect.bisect_right(rule, length, key=lambda step: step[0]) - 1][1]

    def models_for(self, stems: tp.Optional[tp.Sequence[str]]) -> tp.Tuple[int, ...]:
        """The sub-models whose output reaches `stems` (None: every stem): those of a bag
        with a non-zero weight on one of them. htdemucs_ft has one specialist per stem, so
        `vocals` alone needs one of its four models."""
        if stems is None or not self.is_bag:
            return tuple(range(self.num_models))
        wanted = [self.sources.index(stem) for stem in stems]
        return tuple(index for index, weights in enumerate(self.weights)
                     if any(weights[k] != 0 for k in wanted))


# How many samples a model takes for a window (see `ModelGeometry.input_lengths`).
LengthRule = tp.Union[int, None, tp.Tuple[tp.Tuple[int, int], ...]]


@dataclass(frozen=True)
class Pass:
    """One model of the bag at one shift.

    `view_start` is where the pass's view begins in mix coordinates (negative with a shift: the
    view starts inside the zero padding), `view_length` its length in samples; `shift` is the
    offset drawn for this pass (None without shifts).
    """
    model_index: int
    shift: tp.Optional[int]
    view_start: int
    view_length: int
    segment_length: int


@dataclass(frozen=True)
class Window:
    """One model call: `input_length` samples of the mix from `input_start` (mix coordinates,
    zero outside the mix) go in; the centre `length` samples of the output are added at `offset`
    of pass `pass_index`'s view."""
    index: int
    pass_index: int
    model_index: int
    offset: int
    length: int
    input_start: int
    input_length: int
    # MSST's input (RoFormer): outside the mix, its reflection (the whole mix padded so), and
    # the input past the window's `length` samples its own reflection (`tail_mirror`) or zeros
    mirror: bool = False
    tail_mirror: bool = False


@dataclass(frozen=True)
class Plan:
    """All windows of one separation of a mix of `length` samples."""
    length: int
    shifts: int
    max_shift: int
    transition_power: float
    passes: tp.Tuple[Pass, ...]
    windows: tp.Tuple[Window, ...]
    fade: int = 0  # MSST's linear fades of this many samples; 0: Demucs' triangle weights

    def windows_of_pass(self, pass_index: int) -> tp.List[Window]:
        return [w for w in self.windows if w.pass_index == pass_index]

    def ranks(self) -> tp.Dict[int, int]:
        """`{window index: its place among its pass's windows, 0 first}`."""
        ranks: tp.Dict[int, int] = {}
        count = [0] * len(self.passes)
        for window in self.windows:
            ranks[window.index] = count[window.pass_index]
            count[window.pass_index] += 1
        return ranks


@dataclass(frozen=True)
class Song:
    """A decoded song, ready for its windows: the mix `[C, T]` float32 (an array in process; in
    the service a boxed object-store ref), the window plan and the mix's normalisation (each
    window's input is normalised by it, the stems denormalised), for `model` (its name; None
    in process, where the runner is the model)."""
    mix: tp.Any
    plan: Plan
    mean: float
    std: float
    geometry: ModelGeometry
    model: tp.Optional[str] = None

    @property
    def seconds(self) -> float:
        return self.plan.length / self.geometry.samplerate


DEMUCS_OVERLAP = 0.25  # `apply_model`'s default


def plan_windows(length: int, geometry: ModelGeometry, shifts: int = 1,
                 overlap: tp.Optional[float] = None,
                 seed: tp.Optional[int] = 0, offsets: tp.Optional[tp.List[tp.List[int]]] = None,
                 transition_power: float = 1.,
                 models: tp.Optional[tp.Sequence[int]] = None) -> Plan:
    """Plan the windows of a separation of `length` samples by the sub-models `models` of the
    bag (None: all; `ModelGeometry.models_for` picks those a stem subset needs).

    `overlap` (None: the family's default) is the fraction of a window shared with the next.
    A RoFormer's plan is MSST's `demix` (`plan_demix`): no shifts, `num_overlap_for(overlap)`
    windows over each sample.

    Shift offsets are `offsets[model][shift]` when given, else drawn from `random.Random(seed)`
    (seed None: the global `random`) in `apply_model`'s order: model by model, shift by shift,
    with the draws that the model's forward makes for each window of a pass in between, so that
    seeding the global RNG with `seed` makes `apply_model` draw the very same offsets. The
    sub-models left out still draw theirs: the others' offsets stay those of the whole bag.
    """
    if length <= 0:
        raise ValueError("cannot separate an empty signal")
    if geometry.family == "roformer":
        if shifts > 1:  # not ignored: a caller asking for them would get one pass unawares
            raise InvalidParameterError("shifts is Demucs' option: a RoFormer model takes "
                                        "shifts 0 or 1 (none), as MSST's inference does")
        return plan_demix(length, geometry, num_overlap_for(overlap, geometry))
    overlap = DEMUCS_OVERLAP if overlap is None else overlap
    if not 0 <= overlap < 1:
        raise ValueError("overlap must be in [0, 1)")
    if transition_power < 1:
        raise ValueError("transition_power < 1 leads to weird behavior")
    rng = random if seed is None else random.Random(seed)
    max_shift = int(MAX_SHIFT_SECONDS * geometry.samplerate)
    passes: tp.List[Pass] = []
    windows: tp.List[Window] = []
    for model_index, segment_length in enumerate(geometry.segment_lengths):
        for shift_index in range(max(shifts, 1)):
            if shifts:
                shift = (rng.randint(0, max_shift) if offsets is None
                         else offsets[model_index][shift_index])
                pass_ = Pass(model_index, shift, shift - max_shift, length + max_shift - shift,
                             segment_length)
            else:
                pass_ = Pass(model_index, None, 0, length, segment_length)
            pass_windows = _split(pass_, len(passes), len(windows), overlap, geometry)
            if models is None or model_index in models:
                passes.append(pass_)
                windows.extend(pass_windows)
            draw_bound = geometry.forward_draws[model_index]
            if shifts and offsets is None and draw_bound:
                for _ in pass_windows:
                    rng.randrange(draw_bound)  # type: ignore
    return Plan(length, shifts, max_shift, transition_power, tuple(passes), tuple(windows))


def num_overlap_for(overlap: tp.Optional[float], geometry: ModelGeometry) -> int:
    """MSST's `num_overlap` (windows covering each sample; step = chunk // num_overlap) for
    the request's `overlap` fraction: the config's own when left out, else
    round(1 / (1 - overlap)), at least 1 (0.5 -> 2, 0.75 -> 4, 0.25 -> 1)."""
    if overlap is None:
        return geometry.num_overlap
    if not 0 <= overlap < 1:
        raise ValueError("overlap must be in [0, 1)")
    return max(1, round(1 / (1 - overlap)))


def plan_demix(length: int, geometry: ModelGeometry, num_overlap: int) -> Plan:
    """MSST's `demix` (utils/model_utils.py, generic mode) as a plan: windows of `chunk`
    samples every `chunk // num_overlap`; when the mix is longer than twice the `border`
    (chunk - step), it is reflected by `border` at both ends first (the pass's view starts
    at -border) and trimmed after. The last windows reach past the view: their input is
    padded by reflection when more than half of it is inside, else by zeros. Weights:
    `demix_weight` (fades of chunk // 10)."""
    chunk = geometry.segment_lengths[0]
    step = chunk // num_overlap
    border = chunk - step
    pad = border if length > 2 * border and border > 0 else 0
    view_length = length + 2 * pad
    pass_ = Pass(0, None, -pad, view_length, chunk)
    windows = []
    for offset in range(0, view_length, step):
        inside = min(chunk, view_length - offset)
        windows.append(Window(len(windows), 0, 0, offset, inside, offset - pad, chunk,
                              mirror=True, tail_mirror=inside > chunk // 2))
    return Plan(length, 0, 0, 1., (pass_,), tuple(windows), fade=chunk // 10)


def _split(pass_: Pass, pass_index: int, first_index: int, overlap: float,
           geometry: ModelGeometry) -> tp.List[Window]:
    """The windows of one pass: `apply_model`'s split branch."""
    stride = int((1 - overlap) * pass_.segment_length)
    windows = []
    for offset in range(0, pass_.view_length, stride):
        chunk = min(pass_.segment_length, pass_.view_length - offset)
        input_length = geometry.input_length(pass_.model_index, chunk)
        start = pass_.view_start + offset - (input_length - chunk) // 2
        windows.append(Window(first_index + len(windows), pass_index, pass_.model_index, offset,
                              chunk, start, input_length))
    return windows


def in_order(plan: Plan) -> tp.List[Window]:
    """The plan's windows in the order that finishes the stems front to back: the first window
    of every pass, then the second of every pass... (passes of one model stay adjacent, so
    consecutive windows can share a batch)."""
    rank = plan.ranks()
    return sorted(plan.windows, key=lambda w: (rank[w.index], w.pass_index))
