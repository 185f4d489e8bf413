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
