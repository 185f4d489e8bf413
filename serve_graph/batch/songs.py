"""What a batch separates: INPUT resolved to songs, each a stable `song_id` and a URI.

INPUT is a folder (every audio file under it, recursively), a glob (`music/**/*.flac`), a text
list (`.txt`: one path or URI a line) or a manifest (`.csv`/`.parquet` with columns `song_id`
and `uri`). Paths are local or any fsspec URL (`s3://`, `gs://`... with that filesystem's fsspec
package installed). A song's id is its path relative to the folder, the glob's fixed part or
the list's common folder, without its extension (with it, when two files would share an id);
a manifest says its own.
"""
import posixpath
import re
import typing as tp

import fsspec

from ..engine.errors import SeparationError

AUDIO_SUFFIXES = (".mp3", ".wav", ".flac", ".ogg", ".opus", ".m4a", ".aac", ".mp4", ".aif",
                  ".aiff", ".wma", ".webm", ".mka", ".alac")
SONG_ID = re.compile(r"^[^/\x00-\x1f][^\x00-\x1f]*$")  # relative, no control characters
STATE_FOLDER = "_batch"  # OUTPUT's own records (`output.BatchOutput`): never a song's folder


class BatchInputError(SeparationError):
    """INPUT names no songs, or a manifest that is not one (the command exits 2)."""
    status_code = 400
    error = "invalid_input"


class SongRef(tp.NamedTuple):
    song_id: str
    uri: str


def list_songs(source: str) -> tp.List[SongRef]:
    """The songs INPUT names, sorted by id, each id once (`BatchInputError` otherwise)."""
    fs, path = fsspec.core.url_to_fs(source)
    if path.endswith((".csv", ".parquet")):
        songs = _from_manifest(source)
    elif path.endswith(".txt"):
        songs = _named(fs, [line.strip() for line in fs.cat_file(path).decode().splitlines()
                            if line.strip() and not line.startswith("#")])
    elif fsspec.core.has_magic(path):
        songs = _relative(fs, _base_of(path), sorted(fs.glob(path)))
    elif fs.isdir(path):
        files = [name for name in fs.find(path) if name.lower().endswith(AUDIO_SUFFIXES)]
        songs = _relative(fs, path, sorted(files))
    else:
        raise BatchInputError(f"{source!r} is not a folder, a glob, a .txt list or a "
                              f".csv/.parquet manifest")
    if not songs:
        raise BatchInputError(f"{source!r} names no audio files")
    return _checked(songs)


def _from_manifest(source: str) -> tp.List[SongRef]:
    import pyarrow.csv
    import pyarrow.parquet
    with fsspec.open(source, "rb") as file:
        table = (pyarrow.csv.read_csv(file) if source.endswith(".csv")
                 else pyarrow.parquet.read_table(file))
    missing = {"song_id", "uri"} - set(table.column_names)
    if missing:
        raise BatchInputError(f"the manifest {source!r} lacks the column(s) "
                              f"{', '.join(sorted(missing))}; it needs song_id and uri")
    return [SongRef(str(song_id), str(uri)) for song_id, uri in
            zip(table.column("song_id").to_pylist(), table.column("uri").to_pylist())]


def _named(fs, names: tp.List[str]) -> tp.List[SongRef]:
    """A list's songs: ids relative to the entries' common folder."""
    if not names:
        return []
    paths = [fsspec.core.url_to_fs(name)[1] if "://" in name else name for name in names]
    base = posixpath.commonpath(paths) if len(paths) > 1 else posixpath.dirname(paths[0])
    if base in paths:  # one file: its own folder
        base = posixpath.dirname(base)
    return [SongRef(song_id, uri) for song_id, uri in
            zip(_ids([posixpath.relpath(p, base) for p in paths]), names)]


def _relative(fs, base: str, paths: tp.List[str]) -> tp.List[SongRef]:
    relative = [posixpath.relpath(path, base) for path in paths]
    return [SongRef(song_id, fs.unstrip_protocol(path))
            for song_id, path in zip(_ids(relative), paths)]


def _ids(relative: tp.List[str]) -> tp.List[str]:
    """Relative paths -> ids: the extension dropped, unless another file keeps the same id."""
    bare = [posixpath.splitext(name)[0] for name in relative]
    taken: tp.Dict[str, int] = {}
    for name in bare:
        taken[name] = taken.get(name, 0) + 1
    return [name if taken[name] == 1 else full for name, full in zip(bare, relative)]


def _base_of(pattern: str) -> str:
    """The folder part of a glob before its first wildcard."""
    parts = pattern.split("/")
    fixed = []
    for part in parts:
        if fsspec.core.has_magic(part):
            break
        fixed.append(part)
    return "/".join(fixed) or "."


def _checked(songs: tp.List[SongRef]) -> tp.List[SongRef]:
    seen: tp.Dict[str, str] = {}
    for song in songs:
        parts = song.song_id.split("/")
        if not SONG_ID.match(song.song_id) or ".." in parts or parts[0] == STATE_FOLDER:
            raise BatchInputError(f"song_id {song.song_id!r} ({song.uri}) is not a relative "
                                  f"path: it names the song's folder in OUTPUT")
        if song.song_id in seen:
            raise BatchInputError(f"song_id {song.song_id!r} names both {seen[song.song_id]} "
                                  f"and {song.uri}")
        seen[song.song_id] = song.uri
    return sorted(songs)
