"""`POST /separate`: a song in, its stems out in the answer (`router`), and the request's path
through the graph, which jobs share (`Separations`, a mixin of `Ingress`): Decode once (the
mix goes to the object store), then Encode once, which runs the windows through Separate."""
import asyncio
import contextlib
import dataclasses
import time
import typing as tp
from pathlib import PurePath
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Request, UploadFile
from fastapi.responses import Response

from .. import metrics, url_fetch
from ..engine import (InvalidAudioError, InvalidParameterError, SeparationError,
                      SeparationOptions, UploadTooLargeError)
from ..engine.options import MEDIA_TYPES
from ..jobs import key_id
from ..messages import SONG_LOST, awaited, retrying
from ..result_cache import cache_key
from .errors import ERROR_RESPONSES, RETRY_AFTER_S
from .forms import AUDIO_FILE, AUDIO_URL, check_form_fields, with_option_fields
from .replica import settings as replica
from .replica import this_replica

router = APIRouter()

RESULT_RESPONSE = {"content": {"application/zip": {}, **{media: {} for media in
                                                          dict.fromkeys(MEDIA_TYPES.values())}},
                   "description": "ZIP of the stems; with `remix`, the mixed audio file; "
                                  "with `format=stems`, the NI STEMS file"}


def request_key(request: Request) -> tp.Optional[str]:
    """The id of the API key the request came with (None without keys)."""
    return key_id(getattr(request.state, "api_key", None))


def ascii_name(name: str) -> str:
    return "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else "_"
                   for c in name)


def named(name: str, options: SeparationOptions) -> dict:
    """The answer's type and file name: a ZIP of stems, a remix's file or a STEMS file."""
    file_name = options.result_name(ascii_name(name))
    return {"Content-Type": options.result_media_type,
            "Content-Disposition": f'attachment; filename="{file_name}"'}


def result_headers(name: str, song, options: SeparationOptions, timing: str) -> dict:
    """The answer's headers: `named`, the song's facts and the timing."""
    return {**named(name, options), "X-Audio-Seconds": f"{song.seconds:.3f}",
            "X-Windows": str(len(song.plan.windows)), "X-Model": options.model or "",
            "Server-Timing": timing}


CACHED_HEADERS = ("X-Audio-Seconds", "X-Windows", "X-Model")  # the rest are per request


def _stem(name: str) -> str:
    """The song's name for the answer's file name: a file name or URL path without its
    folders and extension."""
    return PurePath(name).stem or "song"


def _checked(data: bytes, max_bytes: int) -> bytes:
    if len(data) > max_bytes:
        raise UploadTooLargeError(f"the upload is larger than the limit of "
                                  f"{max_bytes / 2**20:g} MB")
    if not data:
        raise InvalidAudioError("the file is empty")
    return data


class TooManyUploadsError(SeparationError):
    """This replica holds its limit of upload bytes in flight (`max_upload_memory_mb`)."""
    status_code = 429
    error = "too_many_uploads"
    headers = {"Retry-After": str(RETRY_AFTER_S)}


@dataclasses.dataclass(frozen=True)
class Song:
    """An accepted request: its options (model set), the song's bytes and name, and the
    model's facts (`ModelStates.ready_model`)."""
    options: SeparationOptions
    data: bytes
    name: str
    model: dict


class Answer(tp.NamedTuple):
    """A separated song as the Ingress answers it: the ZIP (or remix), its headers and the
    result cache's entry that holds it (`{"key", "dir"}`; None with the cache off): a job
    records the entry, and its deletion removes it (`JobStore.cancel`)."""
    archive: bytes
    headers: dict
    cache_entry: tp.Optional[dict]


class Separations:
    """How an Ingress replica takes a song in and runs it through the graph (a mixin of
    `Ingress`). Needs `_settings`, `_default`, `_max_bytes`, `_decode`, `_encode`,
    `_for_model`, `_geometries`, `_jobs`, `_cache` and `ready_model`
    (`health.ModelStates`)."""

    @contextlib.asynccontextmanager
    async def song_in(self, request: Request, audio_file: tp.Optional[UploadFile],
                      audio_url: tp.Optional[str], fields: dict) -> tp.AsyncIterator[Song]:
        """A separation request checked before any work: its fields, its model (loaded) and
        the model's stems, then the song, uploaded or downloaded (under the upload limits and
        the replica's budget of upload bytes, held until the block ends)."""
        options, info = await self._checked_options(request, fields)
        if (audio_file is None) == (audio_url is None):
            raise InvalidParameterError("send the song as audio_file (an upload) or as "
                                        "audio_url, one of them")
        if audio_file is not None:
            data = await audio_file.read(self._max_bytes + 1)
            name = audio_file.filename or "song"
            yield Song(options, _checked(data, self._max_bytes), _stem(name), info)
            return
        if not replica.upload_budget.try_take(self._max_bytes):
            raise TooManyUploadsError(f"this replica holds its limit of upload bytes in "
                                      f"flight (max_upload_memory_mb); retry after "
                                      f"{RETRY_AFTER_S} s")
        try:
            data = await asyncio.to_thread(
                url_fetch.fetch, audio_url, self._max_bytes, self._settings.url_timeout_s,
                self._settings.allowed_networks)
            yield Song(options, _checked(data, self._max_bytes),
                       _stem(urlsplit(audio_url).path), info)
        finally:
            replica.upload_budget.give_back(self._max_bytes)

    async def _checked_options(self, request: Request, fields: dict
                               ) -> tp.Tuple[SeparationOptions, dict]:
        """The request's options (model and defaults set), checked against the form and the
        model's stems, and the model's facts (it is loaded now if it was not)."""
        check_form_fields(request, await request.form())
        options = SeparationOptions.parse(**fields).with_model(
            self._default, self._settings.served_models).with_defaults(
            mp3_quality=self._settings.mp3_quality)
        info = await self.ready_model(options.model)
        options.validate_for(info["sources"])
        return options, info

    async def separated(self, song: Song, scope: tp.Optional[str],
                        job_id: tp.Optional[str] = None) -> Answer:
        """`song`'s answer: from the result cache when it holds it (for `scope`, the key's
        id), else separated now (and kept)."""
        key = await asyncio.to_thread(self._cache_key, song, scope)  # hashes the whole song
        entry = None if key is None else {"key": key, "dir": self._settings.result_cache_dir}
        if key is not None:
            start = time.perf_counter()
            kept = await asyncio.to_thread(self._cache.get, key)
            if kept is not None:
                archive, headers = kept
                metrics.cache_answer("hit")
                metrics.client_audio(scope, song.options.model,
                                     float(headers.get("X-Audio-Seconds", 0)), "cached")
                return Answer(archive, {**headers, **named(song.name, song.options),
                                        "X-Cache": "hit", "Server-Timing":
                                        f"cache;dur={(time.perf_counter() - start) * 1000:.0f}"},
                              entry)
        separated, archive, timing = await self.separate_song(song.data, song.options, job_id)
        metrics.client_audio(scope, song.options.model, separated.seconds, "separated")
        headers = result_headers(song.name, separated, song.options, timing)
        if key is not None:
            kept = {name: value for name, value in headers.items() if name in CACHED_HEADERS}
            await asyncio.to_thread(self._cache.put, key, archive, kept)
            metrics.cache_answer("miss")
            headers["X-Cache"] = "miss"
        return Answer(archive, headers, entry)

    def _cache_key(self, song: Song, scope: tp.Optional[str]) -> tp.Optional[str]:
        if self._cache is None:
            return None
        shared = self._settings.result_cache_shared or scope is None
        return cache_key(song.data, song.options.model_dump(), song.model,
                         "" if shared else scope)

    async def separate_song(self, data: bytes, options: SeparationOptions,
                             job_id: tp.Optional[str] = None):
        """Decode, then Encode (which runs the windows): `(song, zip, Server-Timing)`. An
        attempt that loses a replica or the song's mix starts again from the upload, until
        `retry_seconds` have passed. Stages are reported to job `job_id`, if any."""
        geometry = await self._geometry(options.model)

        def stage(**fields) -> None:
            if job_id is not None:
                self._jobs.update.remote(job_id, **fields)

        async def attempt():
            start = time.perf_counter()
            stage(stage="decoding")
            song = await awaited(self._decode.decode.remote(data, geometry, options))
            decoded = time.perf_counter()
            stage(stage="separating", windows_total=len(song.plan.windows),
                  audio_seconds=round(song.seconds, 3))
            zipped, stages = await awaited(
                self._encode.encode.remote(song, options, job_id))
            archive = zipped.tobytes()  # read from the object store
            stages = {"decode": decoded - start, **stages,
                      "total": time.perf_counter() - start}
            metrics.song_done(options.model, song.seconds, stages)
            return song, archive, ", ".join(f"{name};dur={seconds * 1000:.0f}"
                                            for name, seconds in stages.items())

        return await retrying(attempt, SONG_LOST, self._settings.retry_seconds,
                              "separation attempt lost; starting the song again",
                              delay=0.5, max_delay=0.5)

    async def _geometry(self, model: str):
        """The model's window geometry (what Decode plans with), asked of Separate once."""
        if model not in self._geometries:
            self._geometries[model] = await self._for_model[model].geometry.remote(model)
        return self._geometries[model]


@router.post("/separate", summary="Separate a song into stems, returned as a ZIP (with remix: "
             "the stems mixed, as one audio file)",
             response_class=Response, responses={200: RESULT_RESPONSE, **ERROR_RESPONSES})
@with_option_fields
async def separate(request: Request, audio_file: tp.Optional[UploadFile] = AUDIO_FILE,
                   audio_url: tp.Optional[str] = AUDIO_URL,
                   ingress: Separations = Depends(this_replica), **fields) -> Response:
    """The song as `audio_file` or `audio_url`; the form's other fields are
    `SeparationOptions`' (`with_option_fields`)."""
    async with ingress.song_in(request, audio_file, audio_url, fields) as song:
        archive, headers, _ = await ingress.separated(song, request_key(request))
    return Response(archive, media_type=headers.pop("Content-Type"), headers=headers)
