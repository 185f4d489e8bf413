"""One separation job end to end, shared by the CLI and the service: validated options,
stems -> encoded files -> ZIP."""
import typing as tp
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch as th

from .audio import FORMATS, WAV_DEPTHS, decode, encode_stem, select_stems, zip_files
from .errors import InvalidParameterError, OverBudgetError
from .separator import ModelRunner, separate, timed
from .windows import Plan

MAX_SHIFTS = 20
MAX_OVERLAP = 0.99  # a stride of 1 % of the segment: beyond, windows multiply without gain
MP3_BITRATES = (128, 320)


@dataclass(frozen=True)
class SeparationOptions:
    """The parameters of `POST /separate` (and of the CLI)."""
    two_stems: tp.Optional[str] = None
    shifts: int = 1
    overlap: float = 0.25
    format: str = "mp3"
    mp3_bitrate: int = 192
    wav_depth: str = "int16"
    seed: int = 0

    def validate(self, sources: tp.Sequence[str]) -> "SeparationOptions":
        """Raise `InvalidParameterError` naming the first bad field; returns self."""
        if self.two_stems is not None and self.two_stems not in sources:
            raise InvalidParameterError(f"two_stems must be one of {', '.join(sources)}; "
                                        f"got {self.two_stems!r}")
        if not 0 <= self.shifts <= MAX_SHIFTS:
            raise InvalidParameterError(f"shifts must be between 0 and {MAX_SHIFTS}; "
                                        f"got {self.shifts}")
        if not 0 <= self.overlap <= MAX_OVERLAP:
            raise InvalidParameterError(f"overlap must be between 0 and {MAX_OVERLAP}; "
                                        f"got {self.overlap}")
        if self.format not in FORMATS:
            raise InvalidParameterError(f"format must be one of {FORMATS}; got {self.format!r}")
        low, high = MP3_BITRATES
        if not low <= self.mp3_bitrate <= high:
            raise InvalidParameterError(f"mp3_bitrate must be between {low} and {high} kbps; "
                                        f"got {self.mp3_bitrate}")
        if self.wav_depth not in WAV_DEPTHS:
            raise InvalidParameterError(f"wav_depth must be one of {WAV_DEPTHS}; "
                                        f"got {self.wav_depth!r}")
        return self


def check_budget(plan: Plan, max_windows: tp.Optional[int], samplerate: int) -> None:
    """Raise `OverBudgetError`, stating the limit, when `plan` needs more than `max_windows`
    model windows (duration x passes / stride; None: no limit)."""
    if max_windows is None or len(plan.windows) <= max_windows:
        return
    seconds = plan.length / samplerate
    raise OverBudgetError(
        f"this request needs {len(plan.windows)} model windows ({seconds:.1f} s of audio, "
        f"{len(plan.passes)} pass(es) of shifts and models, at this overlap); one request may "
        f"take at most {max_windows}: use fewer shifts, less overlap or a shorter song")


def stem_files(stems: tp.Dict[str, th.Tensor], samplerate: int,
               options: SeparationOptions) -> tp.Dict[str, bytes]:
    """Encode the selected stems `{name: [C, T]}` in parallel: `{"vocals.mp3": bytes, ...}`."""
    selected = select_stems(stems, options.two_stems)
    with ThreadPoolExecutor(len(selected)) as pool:
        encoded = pool.map(lambda wav: encode_stem(wav, samplerate, options.format,
                                                   options.mp3_bitrate, options.wav_depth),
                           selected.values())
        return {f"{name}.{options.format}": data for name, data in zip(selected, encoded)}


def separate_to_zip(data: bytes, runner: ModelRunner, options: SeparationOptions,
                    batch_size: int = 1, max_seconds: tp.Optional[float] = None,
                    progress: bool = False,
                    timings: tp.Optional[tp.Dict[str, float]] = None) -> bytes:
    """Audio file bytes -> ZIP of stems, in this process. `timings` collects seconds per
    stage: decode, plan, windows, model, overlap_add, encode, zip."""
    geometry = runner.geometry
    options.validate(geometry.sources)
    with timed(timings, "decode"):
        wav = decode(data, geometry.samplerate, geometry.audio_channels, max_seconds)
    stems = separate(runner, wav, options.shifts, options.overlap, options.seed, batch_size,
                     progress, timings=timings)
    with timed(timings, "encode"):
        files = stem_files(dict(zip(geometry.sources, stems)), geometry.samplerate, options)
    with timed(timings, "zip"):
        return zip_files(files)
