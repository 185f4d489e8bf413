"""The request, defined once: `SeparationOptions` holds every parameter of a separation with
its type, range or choices, default and description. `POST /separate`'s form fields
(`ingress.py`), the CLI's options (`__main__.py`) and the Modal client's arguments
(`modal_deploy/app.py`) are all generated from its fields (`request_fields`)."""
import typing as tp

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import InvalidParameterError

MAX_SHIFTS = 20
MAX_OVERLAP = 0.99  # a stride of 1 % of the segment: beyond, windows multiply without gain
MP3_BITRATES = (128, 320)
MP3_QUALITIES = (0, 9)  # LAME's -q: 0 slowest (most careful search) .. 9 fastest
DEFAULT_MP3_QUALITY = 2  # Demucs' setting
AAC_BITRATES = (64, 320)  # FFmpeg's AAC encoder, stereo: transparent from ~256
OPUS_BITRATES = (32, 256)  # libopus, stereo: transparent from ~128-160
FORMATS = ("mp3", "wav", "flac", "m4a", "opus", "stems")
STEMS_ORDER = ("drums", "bass", "other", "vocals")  # an NI STEMS file's tracks after the master
WAV_DEPTHS = ("int16", "int24", "float32")
CLIP_MODES = ("rescale", "clamp", "none")
# htdemucs' sources: the schema's choices. Other models have others (htdemucs_6s: guitar,
# piano); `validate_for` checks a request against the model that serves it.
DEFAULT_SOURCES = ("drums", "bass", "other", "vocals")
_ONE_OF = f"({'|'.join(DEFAULT_SOURCES)})"
MODEL_NAME = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"  # Demucs' names and signatures: never a path
EXCLUSIVE_FIELDS = ("two_stems", "stems", "remix")  # at most one of them in a request
# a stem's gain in a remix, in dB: -60 to +12 with up to two decimals, or -inf (left out)
_DECIMALS = r"(\.[0-9]{1,2})?"
_GAIN = (rf"(-inf|-(60(\.0{{1,2}})?|[1-5]?[0-9]{_DECIMALS})|"
         rf"\+?(12(\.0{{1,2}})?|1[01]{_DECIMALS}|[0-9]{_DECIMALS}))")
MEDIA_TYPES = {"mp3": "audio/mpeg", "wav": "audio/wav", "flac": "audio/flac",
               "m4a": "audio/mp4", "opus": "audio/ogg", "stems": "audio/mp4"}


class SeparationOptions(BaseModel):
    """The parameters of one separation. Validated on construction (types, ranges, choices:
    `pydantic.ValidationError`), and against the model's sources by `validate_for`."""
    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    model: tp.Optional[str] = Field(
        None, pattern=MODEL_NAME, max_length=64, description="the model that separates: "
        "htdemucs (fast), htdemucs_ft (a bag of four, best quality), htdemucs_6s (adds guitar "
        "and piano), hdemucs_mmi, mdx_extra... as configured (GET /models); leave out for the "
        "service's default")
    two_stems: tp.Optional[str] = Field(
        None, description="return only this stem and no_<stem> (the sum of the others); "
        "leave out for every stem", json_schema_extra={"enum": list(DEFAULT_SOURCES)})
    stems: tp.Optional[str] = Field(
        None, pattern=r"^[a-z_]+(,[a-z_]+)*$", description="comma-separated subset of the "
        "model's stems to return, e.g. vocals,drums; leave out for every stem",
        json_schema_extra={"pattern": f"^{_ONE_OF}(,{_ONE_OF})*$"})
    remix: tp.Optional[str] = Field(
        None, pattern=rf"^[a-z_]+={_GAIN}(,[a-z_]+={_GAIN})*$", max_length=200,
        description="one audio file of the stems mixed, instead of a ZIP of them: "
        "comma-separated stem=gain in dB, e.g. vocals=-12 (karaoke with a guide vocal) or "
        "drums=-inf (no drums); stems not named are mixed at 0 dB (a stem named twice: its "
        "last gain); gains from -60 to +12 dB, or -inf to leave a stem out",
        json_schema_extra={"pattern": f"^{_ONE_OF}={_GAIN}(,{_ONE_OF}={_GAIN})*$"})
    shifts: int = Field(1, ge=0, le=MAX_SHIFTS, description="random time shifts averaged: "
                        "more is slightly better and proportionally slower")
    overlap: tp.Optional[float] = Field(
        None, ge=0, le=MAX_OVERLAP, allow_inf_nan=False, description="the share of a window "
        "that overlaps the next: Demucs models 0.25 when left out; a RoFormer model its "
        "config's num_overlap windows over each sample when left out, else "
        "round(1 / (1 - overlap)) of them (0.5: 2, 0.75: 4)")
    format: tp.Optional[tp.Literal[FORMATS]] = Field(  # type: ignore[valid-type]
        None, description="stem file format: mp3, wav, flac, m4a (AAC) or opus (Ogg Opus); "
        "stems: one Native Instruments STEMS file (.stem.mp4: the master and the four stems "
        "as AAC tracks, for Traktor and other DJ software; four-stem models, every stem); "
        "leave out for mp3 (or wav when mp3=false)")
    mp3: bool = Field(True, description="the original API's switch: MP3 stems (true) or "
                      "16-bit WAV (false) when format is left out")
    mp3_bitrate: int = Field(192, ge=MP3_BITRATES[0], le=MP3_BITRATES[1],
                             description="MP3 bitrate in kbps")
    mp3_quality: tp.Optional[int] = Field(
        None, ge=MP3_QUALITIES[0], le=MP3_QUALITIES[1], description="LAME's quality setting, "
        "0 (slowest) to 9 (fastest): same bitrate, a less careful encoder (q2, Demucs' "
        "setting, costs ~2x the CPU of q5, ~4x that of q7); leave out for the service's "
        "default")
    aac_bitrate: int = Field(256, ge=AAC_BITRATES[0], le=AAC_BITRATES[1],
                             description="AAC bitrate in kbps (format m4a)")
    opus_bitrate: int = Field(160, ge=OPUS_BITRATES[0], le=OPUS_BITRATES[1],
                              description="Opus bitrate in kbps (format opus)")
    wav_depth: tp.Literal[WAV_DEPTHS] = Field(  # type: ignore[valid-type]
        "int16", description="WAV sample format")
    clip: tp.Literal[CLIP_MODES] = Field(  # type: ignore[valid-type]
        "rescale", description="what to do with stems that would clip: rescale the whole "
        "stem (Demucs' default), clamp the samples, or none (float32 WAV keeps them)")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="seed of the shift offsets")

    @model_validator(mode="before")
    @classmethod
    def _blank_is_absent(cls, values: tp.Any) -> tp.Any:
        """A form sends an empty field for "not chosen": for a field whose default is None
        (left out), treat it as left out."""
        if isinstance(values, dict):
            return {key: value for key, value in values.items()
                    if not (value == "" and key in cls.model_fields and
                            cls.model_fields[key].default is None)}
        return values

    @model_validator(mode="after")
    def _one_stem_choice(self) -> "SeparationOptions":
        given = [name for name in EXCLUSIVE_FIELDS if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of {' or '.join(given)}, not both")
        if given and self.format == "stems":
            raise ValueError(f"format stems holds every stem: not with {given[0]}")
        return self

    @property
    def output_format(self) -> str:
        """`format`, or what the original `mp3` switch asks for when it is left out."""
        return self.format or ("mp3" if self.mp3 else "wav")

    @property
    def output_bitrate(self) -> int:
        """The bitrate (kbps) of `output_format`'s encoder; 0 for the lossless ones."""
        return {"mp3": self.mp3_bitrate, "m4a": self.aac_bitrate, "stems": self.aac_bitrate,
                "opus": self.opus_bitrate}.get(self.output_format, 0)

    @property
    def encoder_quality(self) -> int:
        """LAME's quality for MP3 stems: `mp3_quality`, or Demucs' when left out."""
        return DEFAULT_MP3_QUALITY if self.mp3_quality is None else self.mp3_quality

    @property
    def remix_gains(self) -> tp.Optional[tp.Dict[str, float]]:
        """`remix` as {stem: gain in dB} (-inf: left out; a stem named twice: its last
        gain); None without a remix."""
        if self.remix is None:
            return None
        pairs = (item.split("=") for item in self.remix.split(","))
        return {name: float(gain) for name, gain in pairs}

    @property
    def one_file(self) -> bool:
        """Whether the answer is one audio file (a remix, a STEMS file), not a ZIP."""
        return self.remix is not None or self.output_format == "stems"

    def result_name(self, song: str) -> str:
        """The file name of the answer for `song`: its ZIP of stems, remix or STEMS file."""
        if self.output_format == "stems":
            return f"{song}.stem.mp4"
        if self.remix is not None:
            return f"{song}_remix.{self.output_format}"
        return f"{song}_stems.zip"

    @property
    def result_media_type(self) -> str:
        return MEDIA_TYPES[self.output_format] if self.one_file else "application/zip"

    @property
    def stem_list(self) -> tp.Optional[tp.Tuple[str, ...]]:
        return None if self.stems is None else tuple(self.stems.split(","))

    def with_model(self, default: str, served: tp.Sequence[str]) -> "SeparationOptions":
        """These options with `model` set (`default` when left out); raises
        `InvalidParameterError` when it is not one of the `served` models."""
        name = self.model or default
        if name not in served:
            raise InvalidParameterError(f"model {name!r} is not served here; choose one of "
                                        f"{', '.join(served)} (GET /models)")
        return self.model_copy(update={"model": name})

    def with_defaults(self, mp3_quality: int) -> "SeparationOptions":
        """These options with what the request left out set to the service's defaults."""
        if self.mp3_quality is not None:
            return self
        return self.model_copy(update={"mp3_quality": mp3_quality})

    def validate_for(self, sources: tp.Sequence[str]) -> "SeparationOptions":
        """Raise `InvalidParameterError` when a stem named is not one of the model's
        `sources`; returns self."""
        named = (([self.two_stems] if self.two_stems else []) + list(self.stem_list or ())
                 + list(self.remix_gains or ()))
        unknown = [stem for stem in named if stem not in sources]
        if unknown:
            raise InvalidParameterError(f"the model's stems are {', '.join(sources)}; got "
                                        f"{', '.join(map(repr, unknown))}")
        if self.output_format == "stems" and tuple(sources) != STEMS_ORDER:
            raise InvalidParameterError(
                f"format stems holds four stems, {', '.join(STEMS_ORDER)}; model "
                f"{self.model or ''!r} has {', '.join(sources)}: choose a four-stem model or "
                f"another format")
        return self

    @classmethod
    def parse(cls, **values) -> "SeparationOptions":
        """Construct, turning pydantic's error into `InvalidParameterError` (422)."""
        try:
            return cls(**values)
        except ValidationError as exc:
            raise InvalidParameterError("; ".join(
                f"{'.'.join(map(str, error['loc'])) or 'options'}: {error['msg']}"
                for error in exc.errors())) from None


CONSTRAINTS = ("ge", "le", "gt", "lt", "pattern", "max_length", "allow_inf_nan")  # those the fields use


class RequestField(tp.NamedTuple):
    """One public field, as a form, a CLI or a client needs it."""
    name: str
    kind: type  # str, int, float or bool
    default: tp.Any
    description: str
    choices: tp.Optional[tp.Tuple[str, ...]]  # a Literal's values (stem names: the model's)
    annotation: tp.Any  # the declared type (Optional, Literal...)
    constraints: tp.Dict[str, tp.Any]  # ge, le, pattern, allow_inf_nan: as pydantic's Field
    schema_extra: tp.Dict[str, tp.Any]  # what the OpenAPI schema says beyond them (enum...)


def request_fields() -> tp.List[RequestField]:
    """`SeparationOptions`' fields in order, with their plain type and choices. Stem names
    have no fixed choices: they are the serving model's sources (`validate_for`); the schema
    lists htdemucs' (`schema_extra`)."""
    found = []
    for name, info in SeparationOptions.model_fields.items():
        annotation = info.annotation
        inner = [arg for arg in tp.get_args(annotation) if arg is not type(None)]
        if tp.get_origin(annotation) is tp.Union:  # Optional[X]
            annotation = inner[0]
        choices = tp.get_args(annotation) if tp.get_origin(annotation) is tp.Literal else None
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        kind = str if choices else annotation
        constraints = {key: getattr(item, key) for item in info.metadata for key in CONSTRAINTS
                       if getattr(item, key, None) is not None}
        found.append(RequestField(name, kind, info.default, info.description or "",
                                  choices, info.annotation, constraints, dict(extra)))
    return found
