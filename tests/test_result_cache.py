"""The result cache on disk: keys (bytes, options, model, scope; never the name), whole
entries only, least recently used evicted, one folder shared by processes."""
import multiprocessing
import os
import time

import pytest

from serve_graph.result_cache import ResultCache, cache_key, remove_here

MODEL = {"model": "htdemucs", "precision": "fp32", "device": "cpu",
         "sources": ["drums", "bass", "other", "vocals"], "models_in_bag": 1}


def test_the_key_is_the_bytes_options_model_and_scope():
    key = cache_key(b"song", {"shifts": 1}, MODEL, "")
    assert key == cache_key(b"song", {"shifts": 1}, {**MODEL, "state": "loaded"}, "")
    assert key == cache_key(b"song", {"shifts": 1}, {**MODEL, "device": "cpu:0"}, "")
    for other in (cache_key(b"song!", {"shifts": 1}, MODEL, ""),
                  cache_key(b"song", {"shifts": 2}, MODEL, ""),
                  cache_key(b"song", {"shifts": 1}, {**MODEL, "precision": "bf16"}, ""),
                  cache_key(b"song", {"shifts": 1}, {**MODEL, "device": "cuda:0"}, ""),
                  cache_key(b"song", {"shifts": 1}, {**MODEL, "model": "htdemucs_ft"}, ""),
                  cache_key(b"song", {"shifts": 1}, MODEL, "key-a")):
        assert other != key


def test_an_entry_comes_back_whole(tmp_path):
    cache = ResultCache(tmp_path, 10 * 2**20)
    key = cache_key(b"a", {}, MODEL)
    assert cache.get(key) is None
    assert cache.put(key, b"zip bytes", {"X-Windows": "3"})
    assert cache.get(key) == (b"zip bytes", {"X-Windows": "3"})
    assert not list(tmp_path.glob("??/.*.partial"))  # written under a temporary name


def test_an_entry_removed_is_a_miss(tmp_path):
    """What a deleted job's removal does on each node (`remove_everywhere`)."""
    cache = ResultCache(tmp_path, 10 * 2**20)
    key = cache_key(b"a", {}, MODEL)
    cache.put(key, b"zip", {})
    assert remove_here(str(tmp_path), key)
    assert cache.get(key) is None and not remove_here(str(tmp_path), key)


def test_a_damaged_entry_is_a_miss(tmp_path):
    cache = ResultCache(tmp_path, 10 * 2**20)
    key = cache_key(b"a", {}, MODEL)
    cache.put(key, b"zip", {})
    path = next(tmp_path.glob("??/*"))
    path.write_bytes(path.read_bytes()[:5])
    assert cache.get(key) is None


def test_least_recently_used_entries_go_first(tmp_path):
    cache = ResultCache(tmp_path, 3000)
    keys = [cache_key(bytes([n]), {}, MODEL) for n in range(3)]
    for n, key in enumerate(keys):
        cache.put(key, b"x" * 900, {})
        past = time.time() - 100 + n
        os.utime(next(tmp_path.glob(f"??/{key}")), (past, past))
    cache.get(keys[0])  # used now: the newest
    cache.put(cache_key(b"new", {}, MODEL), b"y" * 900, {})
    assert cache.get(keys[1]) is None  # the least recently used
    assert cache.get(keys[0]) is not None and cache.get(keys[2]) is not None
    assert cache.bytes_used() <= 3000


def test_an_entry_over_half_the_cache_is_not_kept(tmp_path):
    cache = ResultCache(tmp_path, 1000)
    assert not cache.put(cache_key(b"big", {}, MODEL), b"z" * 600, {})
    assert cache.bytes_used() == 0


def test_a_malformed_key_is_refused(tmp_path):
    with pytest.raises(ValueError):
        ResultCache(tmp_path, 1000).get("../../etc/passwd")


def _put(folder: str, key: str) -> None:
    ResultCache(folder, 10 * 2**20).put(key, b"from another process", {"X-Model": "m"})


def test_processes_on_one_node_share_the_folder(tmp_path):
    key = cache_key(b"shared", {}, MODEL)
    writer = multiprocessing.get_context("spawn").Process(target=_put,
                                                          args=(str(tmp_path), key))
    writer.start()
    writer.join(60)
    assert writer.exitcode == 0
    assert ResultCache(tmp_path, 10 * 2**20).get(key) == (b"from another process",
                                                          {"X-Model": "m"})


def test_an_entry_past_its_age_is_a_miss_and_removed_though_it_was_used(tmp_path,
                                                                       monkeypatch):
    """`max_age_s` counts from the entry's writing: hits do not extend it. Past it, `get`
    misses and removes the file, and `evict` (the Ingress runs it while idle) removes every
    expired entry, those used recently included; the others stay."""
    from serve_graph import result_cache
    clock = [time.time()]
    monkeypatch.setattr(result_cache.time, "time", lambda: clock[0])
    cache = ResultCache(tmp_path, 10 * 2**20, max_age_s=60.)
    old, used, young = (cache_key(bytes([n]), {}, MODEL) for n in range(3))

    def at_the_clock(key):  # the file's times as the (moved) clock says, as a hit sets them
        os.utime(next(tmp_path.glob(f"??/{key}")), (clock[0], clock[0]))
    for key in (old, used):
        cache.put(key, b"zip", {"X-Windows": "3"})
        at_the_clock(key)
    clock[0] += 50
    assert cache.get(used) == (b"zip", {"X-Windows": "3"})  # 50 s old: answered
    at_the_clock(used)
    cache.put(young, b"zip", {})
    at_the_clock(young)
    clock[0] += 11  # 61 s after the first two were written, 11 s after the third
    assert cache.get(old) is None and not list(tmp_path.glob(f"??/{old}"))
    assert cache.evict() > 0
    assert [path.name for _, _, path in cache.entries()] == [young]
    assert cache.get(young) == (b"zip", {})


def test_without_an_age_limit_only_the_size_evicts(tmp_path, monkeypatch):
    from serve_graph import result_cache
    clock = [time.time()]
    monkeypatch.setattr(result_cache.time, "time", lambda: clock[0])
    cache = ResultCache(tmp_path, 10 * 2**20)
    key = cache_key(b"a", {}, MODEL)
    cache.put(key, b"zip", {})
    clock[0] += 10 * 365 * 86400.
    assert cache.evict() == 0 and cache.get(key) == (b"zip", {})


def test_an_entry_written_before_entries_said_when_counts_as_expired(tmp_path):
    """An entry left in `result_cache_dir` by an earlier version (its JSON without the time
    of writing): with an age limit, a miss, not an answer of unknown age."""
    import json

    from serve_graph.result_cache import HEADER
    key = cache_key(b"a", {}, MODEL)
    path = tmp_path / key[:2] / key
    path.parent.mkdir()
    meta = json.dumps({"X-Windows": "3"}).encode()
    path.write_bytes(HEADER.pack(len(meta)) + meta + b"zip")
    assert ResultCache(tmp_path, 10 * 2**20).get(key) == (b"zip", {"X-Windows": "3"})
    assert ResultCache(tmp_path, 10 * 2**20, max_age_s=3600.).get(key) is None
