"""The job storage on its own: whole writes, reads, deletes and listings, on a local folder and
on an fsspec filesystem that is not one (fsspec's in-memory store standing in for a bucket)."""
import uuid

import pytest

from serve_graph.job_files import JobFiles


@pytest.fixture(params=["local", "memory"])
def files(request, tmp_path):
    root = str(tmp_path / "jobs") if request.param == "local" else f"memory://{uuid.uuid4().hex}"
    return JobFiles(root)


def test_bytes_and_records_round_trip(files):
    assert files.write("uploads", "a", b"song bytes") == 10
    assert files.read("uploads", "a") == b"song bytes"
    files.write_json("records", "a", {"id": "a", "status": "queued"})
    assert files.read_json("records", "a") == {"id": "a", "status": "queued"}
    with files.open("uploads", "a") as opened:
        assert opened.read() == b"song bytes"
    assert files.names("uploads") == ["a"] and files.names("results") == []
    files.delete("uploads", "a")
    files.delete("uploads", "a")  # twice: no error
    assert files.read("uploads", "a") is None and files.open("uploads", "a") is None


def test_a_partial_write_is_never_listed_and_a_write_replaces_whole(tmp_path):
    files = JobFiles(str(tmp_path))
    (tmp_path / "results" / "b.partial-1234abcd").write_bytes(b"half")  # a writer that died
    files.write("results", "b", b"old")
    files.write("results", "b", b"new and longer")
    assert files.names("results") == ["b"] and files.read("results", "b") == b"new and longer"


def test_a_replica_tells_whether_it_sees_the_store_s_own_root(tmp_path):
    ours, elsewhere = JobFiles(str(tmp_path / "shared")), JobFiles(str(tmp_path / "other"))
    ours.claim_root("store-1")
    assert JobFiles(str(tmp_path / "shared")).shared_with("store-1")
    assert not elsewhere.shared_with("store-1") and not ours.shared_with("store-2")
