"""The base-results cache (trainer.base_cache) on a real SQLite file: what it returns, what
makes a key, what it forgets. No model: the evaluation tests cover its use."""

from __future__ import annotations

from pathlib import Path

from trainer.base_cache import BaseCache

REQ = {"ids": [1, 2, 3], "mask": [0, 1], "n_ctx": 512}


def test_a_stored_result_comes_back_for_the_same_request_in_any_key_order(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite3"
    with BaseCache(path, base_sha256="b1", build="x") as cache:
        assert cache.get("nll", REQ) is None
        cache.put("nll", REQ, [3.5, 2])
    with BaseCache(path, base_sha256="b1", build="x") as cache:  # another night
        assert cache.get("nll", {"n_ctx": 512, "mask": [0, 1], "ids": [1, 2, 3]}) == [3.5, 2]
        assert (cache.hits, cache.misses) == (1, 0)


def test_another_base_build_kind_or_request_is_a_miss(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite3"
    with BaseCache(path, base_sha256="b1", build="x") as cache:
        cache.put("nll", REQ, [3.5, 2])
        assert cache.get("answer", REQ) is None
        assert cache.get("nll", REQ | {"mask": [1, 1]}) is None
        assert cache.get("nll", REQ | {"n_ctx": 256}) is None
    with BaseCache(path, base_sha256="b2", build="x") as cache:  # a new base file
        assert cache.get("nll", REQ) is None
    with BaseCache(path, base_sha256="b1", build="y") as cache:  # a rebuilt llama.cpp
        assert cache.get("nll", REQ) is None
        assert len(cache) == 1


def test_rows_unused_for_keep_days_are_deleted_when_it_opens(tmp_path: Path) -> None:
    path, clock = tmp_path / "c.sqlite3", [1_000_000.0]
    with BaseCache(path, base_sha256="b", build="x", now=lambda: clock[0]) as cache:
        cache.put("answer", {"tokens": [1]}, "old")
        cache.put("answer", {"tokens": [2]}, "used")
    clock[0] += 20 * 86400
    with BaseCache(path, base_sha256="b", build="x", now=lambda: clock[0]) as cache:
        assert cache.get("answer", {"tokens": [2]}) == "used"  # touched: kept 30 days from now
    clock[0] += 15 * 86400
    with BaseCache(path, base_sha256="b", build="x", keep_days=30, now=lambda: clock[0]) as cache:
        assert len(cache) == 1
        assert cache.get("answer", {"tokens": [1]}) is None
        assert cache.get("answer", {"tokens": [2]}) == "used"
