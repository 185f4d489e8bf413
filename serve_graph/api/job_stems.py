"""`/jobs/{id}/stems`: a finished job's stems, each answered alone from its stored ZIP, whole
or the byte range a client asks for (an `<audio>` element seeking, a download resumed)."""
import asyncio
import typing as tp

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, Field

from ..engine.options import MEDIA_TYPES
from ..signed_urls import SIGNED_FOR_S
from ..stored_zip import Member, stored_members
from .byte_ranges import ranged_file
from .errors import StemNotFoundError, documented
from .job_routes import NOT_DONE, NOT_SATISFIABLE, PART, JobMethods, signed_for
from .replica import this_replica
from .separation import ascii_name

router = APIRouter()


SIGNED_HELP = (f"with API keys on: the same URL signed for this key, answered without it "
               f"(for an `<audio>` element or a link) for {SIGNED_FOR_S} s; without keys: "
               f"the URL")


class StemFile(BaseModel):
    """One stem of a finished job's ZIP."""
    name: str = Field(description="the stem, e.g. vocals or no_vocals")
    file: str = Field(description="its file name in the ZIP, e.g. vocals.mp3")
    bytes: int
    content_type: str
    url: str = Field(description="answers this stem alone, and byte ranges of it")
    signed_url: str = Field(description=SIGNED_HELP)


class JobStems(BaseModel):
    """A finished job's stems, in the ZIP's order."""
    id: str
    stems: tp.List[StemFile]
    result_signed_url: str = Field(description=f"the job's result_url: {SIGNED_HELP}")


def media_type(file_name: str) -> str:
    return MEDIA_TYPES.get(file_name.rsplit(".", 1)[-1], "application/octet-stream")


async def stored_stems(ingress: JobMethods, request: Request, job_id: str
                       ) -> tp.Tuple[tp.BinaryIO, tp.Dict[str, Member], str]:
    """Job `job_id`'s stored ZIP (open: the caller closes it), where each stem lies in it, and
    the song's name (`finished_result`'s errors); `StemNotFoundError` when its result is one
    file."""
    file, _, headers, song = await ingress.finished_result(request, job_id)
    try:
        if headers.get("Content-Type", "application/zip") != "application/zip":
            raise StemNotFoundError("this job's result is one file (a remix or a STEMS "
                                    "file), not stems: fetch its result_url")
        members = await asyncio.to_thread(stored_members, file)
    except BaseException:
        file.close()
        raise
    return file, members, ascii_name(song)


@router.get("/jobs/{job_id}/stems", summary="A finished job's stems: name, file, bytes, "
            "type and the URL that answers each alone",
            response_model=JobStems,
            responses={404: documented("no such job, or its result is one file (remix, "
                                       "STEMS)"), 409: NOT_DONE})
async def job_stems(request: Request, job_id: str,
                    ingress: JobMethods = Depends(this_replica)) -> JobStems:
    file, members, _ = await stored_stems(ingress, request, job_id)
    file.close()
    return JobStems.model_validate({"id": job_id, "stems": [
        {"name": stem, "file": member.name, "bytes": member.size,
         "content_type": media_type(member.name), "url": f"/jobs/{job_id}/stems/{stem}",
         "signed_url": signed_for(request, f"/jobs/{job_id}/stems/{stem}")}
        for stem, member in members.items()],
        "result_signed_url": signed_for(request, f"/jobs/{job_id}/result")})


@router.head("/jobs/{job_id}/stems/{stem}", include_in_schema=False)
@router.get("/jobs/{job_id}/stems/{stem}", summary="One stem of a finished job, read from its "
            "ZIP: whole, or the byte range a `Range` header asks for (206), as an `<audio>` "
            "element or a download manager asks", response_class=Response,
            responses={200: {"content": {t: {} for t in dict.fromkeys(MEDIA_TYPES.values())},
                             "description": "the stem's file"},
                       206: PART,
                       404: documented("no such job, or no such stem in its result"),
                       409: NOT_DONE, 416: NOT_SATISFIABLE})
async def job_stem(request: Request, job_id: str, stem: str,
                   ingress: JobMethods = Depends(this_replica)) -> Response:
    file, members, song = await stored_stems(ingress, request, job_id)
    member = members.get(stem)
    if member is None:
        file.close()
        raise StemNotFoundError(f"no stem {stem!r} in this job's result; it has: "
                                f"{', '.join(members)}")
    return ranged_file(request, file, member.size, f'"{job_id}-{stem}"',  # never changes
                       media_type(member.name),
                       {"Content-Disposition": f'inline; filename="{song}_{member.name}"'},
                       offset=member.offset)
