"""Where each file of a stored (uncompressed) ZIP lies in it, so that one stem of a job's
result can be answered, or a byte range of it, straight from the stored ZIP on the job storage
(a local file or an fsspec one), without reading the rest."""
import struct
import typing as tp
import zipfile
from dataclasses import dataclass
from pathlib import PurePosixPath

LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., name length, extra length
LOCAL_SIGNATURE = b"PK\x03\x04"


@dataclass(frozen=True)
class Member:
    """One file of the ZIP: its name, and its bytes at `offset` (bytes from the ZIP's start),
    `size` bytes long."""
    name: str
    offset: int
    size: int

    @property
    def stem(self) -> str:
        """The stem it holds: its name without the extension (`vocals.mp3` -> `vocals`)."""
        return PurePosixPath(self.name).stem


def stored_members(file: tp.BinaryIO) -> tp.Dict[str, Member]:
    """`{stem: Member}` of the ZIP `file` (seekable), in the ZIP's order; reads its directory
    and one local header per file. ValueError if it is not a ZIP or a file in it is
    compressed (the service stores its ZIPs: stems are compressed already, or PCM)."""
    try:
        infos = zipfile.ZipFile(file).infolist()
    except zipfile.BadZipFile as exc:
        raise ValueError(f"not a ZIP: {exc}") from None
    members = {}
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED:
            raise ValueError(f"{info.filename} is compressed")
        file.seek(info.header_offset)
        signature, name_length, extra_length = LOCAL_HEADER.unpack(file.read(LOCAL_HEADER.size))
        if signature != LOCAL_SIGNATURE:
            raise ValueError(f"no local header for {info.filename}")
        offset = info.header_offset + LOCAL_HEADER.size + name_length + extra_length
        member = Member(info.filename, offset, info.file_size)
        members[member.stem] = member
    return members

