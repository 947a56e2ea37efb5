"""The prefix cache's host side (fi_engine.runtime.sched.kv_cache), no GPU: the hash chain of full pages, reference
counts, LRU eviction, running out of pages, the cap that leaves a prompt's last token to compute, chunked commits, the
metrics, bad input, the disabled mode against PageAllocator, and a randomized run of 20,000 operations that checks
the bookkeeping after every one and that a matched page always holds the tokens it was matched for.
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from fi_engine.runtime.sched.kv_cache import HASH_BYTES, KVCacheManager, PrefixCacheStats, page_hashes
from fi_engine.runtime.sched.pages import OutOfPagesError, PageAllocator, pages_for
from fi_engine.runtime.sched.scheduler import Scheduler

PS = 4


def admit(kv: KVCacheManager, prompt: list[int], extra_key: object = None) -> tuple[list[int], int]:
    """What a scheduler does for a new request: match, then hold the matched pages and fresh ones for the rest."""
    prefix, cached = kv.match_prefix(prompt, extra_key)
    pages = kv.acquire(prefix, pages_for(len(prompt), kv.page_size) - len(prefix), num_tokens=len(prompt))
    return pages, cached


def prefilled(kv: KVCacheManager, prompt: list[int], extra_key: object = None) -> list[int]:
    """A request admitted and prefilled: its pages, the full ones registered."""
    pages, _ = admit(kv, prompt, extra_key)
    kv.commit(pages, prompt, len(prompt), extra_key)
    return pages


# ---------------------------------------------------------------------------------------------- the hash chain


def test_page_hashes_are_a_chain_over_full_pages():
    tokens = list(range(100, 114))  # 3 full pages of 4 and 2 tokens
    hashes = page_hashes(tokens, PS)
    assert len(hashes) == 3 and all(isinstance(h, bytes) and len(h) == HASH_BYTES for h in hashes)
    assert len(set(hashes)) == 3
    assert page_hashes(tokens[:12], PS) == hashes  # the partial page is not hashed
    assert page_hashes(np.array(tokens, np.int64), PS) == hashes  # a numpy array hashes as the list
    assert page_hashes([], PS) == [] and page_hashes(tokens[:3], PS) == []


def test_one_changed_token_breaks_the_chain_from_its_page_on():
    tokens = list(range(20))  # 5 pages
    base = page_hashes(tokens, PS)
    for k in range(5):
        changed = list(tokens)
        changed[k * PS + 2] += 1000
        other = page_hashes(changed, PS)
        assert other[:k] == base[:k]
        assert all(a != b for a, b in zip(other[k:], base[k:], strict=True))
    # the same page of tokens after a different first page hashes differently (the chain, not the page alone)
    swapped = tokens[4:8] + tokens[:4]
    assert page_hashes(swapped, PS)[1] != base[0]


def test_extra_key_separates_and_equal_keys_agree():
    tokens = list(range(8))
    keys = [None, 0, 1, True, "1", b"1", (1,), (), ("lora", 7), ("lora", 8), "", (None,)]
    chains = [page_hashes(tokens, PS, k) for k in keys]
    firsts = [c[0] for c in chains]
    assert len(set(firsts)) == len(keys)  # every key gives its own chain from the first page on
    assert page_hashes(tokens, PS, ("lora", 7)) == chains[keys.index(("lora", 7))]


def test_page_hash_format_is_fixed_and_the_same_in_another_process():
    # BLAKE2b-128 over the parent digest, the length-prefixed key and the int32 tokens: pinned here, and not
    # touched by Python's per-process hash randomization
    first = hashlib.blake2b(bytes(16) + bytes(4) + np.array([7, 8], "<i4").tobytes(), digest_size=16).digest()
    second = hashlib.blake2b(first + bytes(4) + np.array([9, 10], "<i4").tobytes(), digest_size=16).digest()
    assert page_hashes([7, 8, 9, 10, 11], 2) == [first, second]
    code = (
        "from fi_engine.runtime.sched.kv_cache import page_hashes; "
        "print(page_hashes([1, 2, 3, 4], 2, ('k', 1))[1].hex())"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": s},
        ).stdout.strip()
        for s in ("1", "2")
    }
    assert outs == {page_hashes([1, 2, 3, 4], 2, ("k", 1))[1].hex()}


# ---------------------------------------------------------------------------------------------- matching


def test_a_second_request_with_the_same_prefix_gets_the_same_pages():
    kv = KVCacheManager(32, PS)
    prompt = list(range(1, 15))  # 14 tokens: 3 full pages and 2 tokens
    a = prefilled(kv, prompt)
    pages, cached = kv.match_prefix([*prompt, 99, 98])
    assert pages == a[:3] and cached == 12
    b, cached = admit(kv, [*prompt, 99, 98])
    assert b[:3] == a[:3] and cached == 12 and set(b[3:]).isdisjoint(a)
    kv.check()


def test_a_changed_token_in_page_k_matches_k_pages():
    kv = KVCacheManager(32, PS)
    prompt = list(range(1, 22))  # 5 full pages, 1 token
    a = prefilled(kv, prompt)
    for k in range(5):
        changed = list(prompt)
        changed[k * PS + 1] = 500
        assert kv.match_prefix(changed) == (a[:k], k * PS)


def test_extra_key_separates_cached_pages():
    kv = KVCacheManager(32, PS)
    prompt = list(range(1, 10))
    a = prefilled(kv, prompt, extra_key=("lora", 1))
    assert kv.match_prefix(prompt) == ([], 0)
    assert kv.match_prefix(prompt, ("lora", 2)) == ([], 0)
    assert kv.match_prefix(prompt, ("lora", 1)) == (a[:2], 8)


@pytest.mark.parametrize(
    ("length", "pages"),
    [(0, 0), (1, 0), (4, 0), (5, 1), (8, 1), (9, 2), (12, 2), (13, 3)],
)
def test_a_match_never_covers_the_whole_prompt(length: int, pages: int):
    kv = KVCacheManager(32, PS)
    prompt = list(range(1, 17))
    prefilled(kv, [*prompt, 0])  # all four pages of `prompt` cached
    assert kv.num_cached == 4
    found, cached = kv.match_prefix(prompt[:length])
    assert len(found) == pages == (max(length - 1, 0)) // PS and cached == pages * PS < max(length, 1)


# ---------------------------------------------------------------------------------------------- references, LRU


def test_a_shared_page_stays_cached_and_unevictable_while_one_request_holds_it():
    kv = KVCacheManager(12, PS)  # 11 usable pages
    prompt = list(range(1, 10))  # 2 full pages + 1 token: 3 pages
    a = prefilled(kv, prompt)
    b, cached = admit(kv, prompt)
    assert b[:2] == a[:2] and cached == 8
    kv.free(a)
    assert kv.num_cached == 2 and kv.num_idle == 0  # b holds both cached pages
    assert kv.num_free == 11 - 3  # a's private last page came back; the shared ones did not
    rest = kv.allocate(kv.num_free)
    assert set(rest).isdisjoint(b)
    with pytest.raises(OutOfPagesError):
        kv.allocate(1)
    assert kv.match_prefix(prompt) == (a[:2], 8)  # still served
    kv.free(rest)
    kv.free(b)
    assert kv.num_idle == 2 and kv.num_free == 11
    kv.check()


def test_idle_pages_are_evicted_least_recently_used_first_and_a_chain_from_its_end():
    kv = KVCacheManager(1 + 9, PS)
    prompts = {"a": [1] * 12 + [0], "b": [2] * 12 + [0]}  # 3 full pages + 1 token each: 4 pages
    held = {name: prefilled(kv, p) for name, p in prompts.items()}
    kv.free(held["a"])  # a's 3 cached pages idle first, then b's
    kv.free(held["b"])
    assert kv.num_idle == 6 and kv.num_free == 9
    # touch a again (match, hold, give back): now b is the least recently used
    again, _ = admit(kv, prompts["a"])
    kv.free(again)
    got = kv.allocate(4)  # 3 free pages, then one eviction: the end of b's chain
    assert kv.stats.evictions == 1
    assert kv.match_prefix(prompts["b"]) == (held["b"][:2], 8)
    assert kv.match_prefix(prompts["a"]) == (held["a"][:3], 12)
    assert held["b"][2] in got
    more = kv.allocate(2)  # the rest of b's chain, its first page last
    assert more == [held["b"][1], held["b"][0]] and kv.stats.evictions == 3
    assert kv.match_prefix(prompts["b"]) == ([], 0)
    kv.check()


def test_free_pages_are_used_before_any_cached_page_is_evicted():
    kv = KVCacheManager(1 + 8, PS)
    a = prefilled(kv, [5] * 8 + [1])  # 2 cached pages + 1
    kv.free(a)
    assert kv.num_idle == 2 and kv.num_free == 8
    kv.allocate(6)
    assert kv.stats.evictions == 0 and kv.num_cached == 2


def test_a_duplicate_page_is_not_registered_twice_and_goes_back_free():
    kv = KVCacheManager(16, PS)
    prompt = list(range(1, 10))
    a, _ = admit(kv, prompt)
    b, _ = admit(kv, prompt)  # admitted before a's pages were committed: its own copies
    assert set(a).isdisjoint(b)
    assert kv.commit(a, prompt, 9) == 2
    assert kv.commit(b, prompt, 9) == 0  # the cache serves a's copies
    assert kv.commit(b, prompt, 9) == 0  # idempotent
    kv.free(b)
    assert kv.num_idle == 0 and kv.num_free == 15 - 3
    kv.free(a)
    assert kv.num_idle == 2
    kv.check()


def test_a_copy_whose_cached_twin_was_evicted_takes_its_place_when_freed():
    kv = KVCacheManager(1 + 4, PS)
    prompt = [9] * 4 + [1]  # one full page + 1 token
    a, _ = admit(kv, prompt)
    b, _ = admit(kv, prompt)
    kv.commit(a, prompt, 5)
    kv.commit(b, prompt, 5)  # b's page 0: a copy, not served
    kv.free(a)
    assert kv.allocate(2) == [a[1], a[0]]  # the free page, then a's cached page evicted
    assert kv.match_prefix(prompt) == ([], 0)
    kv.free(b)  # b's copy holds the same tokens: now the cache serves it
    assert kv.match_prefix(prompt) == (b[:1], 4) and kv.num_idle == 1
    kv.check()


# ---------------------------------------------------------------------------------------------- commits, chunks


def test_chunked_commits_register_only_full_pages():
    kv = KVCacheManager(32, PS)
    prompt = list(range(1, 19))  # 18 tokens: 4 full pages
    pages = kv.allocate(5)
    registered = [kv.commit(pages, prompt, n) for n in (3, 6, 6, 13, 18)]
    assert registered == [0, 1, 0, 2, 1]
    assert kv.match_prefix([*prompt, 1]) == (pages[:4], 16)
    # the same pages and hashes as one commit of the whole prompt
    other = KVCacheManager(32, PS)
    whole = other.allocate(5)
    assert other.commit(whole, prompt, 18) == 4
    assert other.match_prefix([*prompt, 1]) == (whole[:4], 16)
    kv.check()


def test_decode_steps_register_a_page_each_time_one_fills():
    kv = KVCacheManager(32, PS)
    prompt = [3, 1, 4, 1, 5]
    pages, _ = admit(kv, prompt)
    kv.commit(pages, prompt, 5)
    tokens = list(prompt)
    counts = []
    for t in range(9):  # each step: one more token, its K/V written
        tokens.append(10 + t)
        if len(pages) * PS < len(tokens):
            pages += kv.allocate(1)
        counts.append(kv.commit(pages, tokens, len(tokens) - 1))  # the newest token is not written yet
    assert counts == [0, 0, 0, 1, 0, 0, 0, 1, 0]  # K/V of 8 and of 12 tokens: pages 2 and 3 full
    assert kv.match_prefix(tokens) == (pages[:3], 12)


def test_a_request_that_matched_commits_its_own_pages_after_the_prefix():
    kv = KVCacheManager(32, PS)
    system = list(range(1, 9))  # 2 pages
    a = prefilled(kv, [*system, 50, 51, 52, 53, 54])
    b, cached = admit(kv, [*system, 60, 61, 62, 63, 64])
    assert cached == 8 and b[:2] == a[:2]
    assert kv.commit(b, [*system, 60, 61, 62, 63, 64], 13) == 1  # its page 2 only
    assert kv.match_prefix([*system, 60, 61, 62, 63, 1]) == (b[:3], 12)
    assert kv.match_prefix([*system, 50, 51, 52, 53, 1]) == (a[:3], 12)


# ---------------------------------------------------------------------------------------------- running out


def test_out_of_pages_raises_paging_error_and_changes_nothing():
    kv = KVCacheManager(1 + 6, PS)
    a = prefilled(kv, [1] * 8 + [2])  # 3 pages, 2 cached
    kv.free(a)
    held = kv.allocate(2)
    with pytest.raises(OutOfPagesError, match="4 free pages of 6"):
        kv.allocate(5)
    assert kv.num_free == 4 and kv.num_cached == 2 and kv.stats.evictions == 0
    prefix, _ = kv.match_prefix([1] * 8 + [3])
    assert len(prefix) == 2 and kv.free_pages_needed(prefix, 3) == 5
    assert kv.stats.requests == 1  # a's admission
    with pytest.raises(OutOfPagesError):
        kv.acquire(prefix, 3, num_tokens=9)  # the 2 idle prefix pages leave only 2 others
    assert kv.num_free == 4 and kv.num_idle == 2 and kv.stats.requests == 1  # nothing held, nothing counted
    assert kv.match_prefix([1] * 8 + [3]) == (prefix, 8)
    pages = kv.acquire(prefix, 2, num_tokens=9)
    assert pages[:2] == prefix and kv.num_free == 0
    kv.free(pages + held)
    kv.check()


def test_a_stale_match_is_refused():
    kv = KVCacheManager(1 + 3, PS)
    a = prefilled(kv, [1] * 4 + [2])
    kv.free(a)
    prefix, _ = kv.match_prefix([1] * 4 + [3])
    kv.allocate(3)  # evicts the cached page
    with pytest.raises(ValueError, match=r"prefix\[0\]: page .* is not a page the cache serves"):
        kv.acquire(prefix, 0, num_tokens=5)
    kv.check()


# ---------------------------------------------------------------------------------------------- metrics, reset


def test_metrics_count_admissions_prompt_tokens_hits_and_evictions():
    kv = KVCacheManager(1 + 8, PS)
    assert kv.stats == PrefixCacheStats() and kv.stats.hit_rate == 0.0
    a = prefilled(kv, list(range(1, 10)))  # 9 tokens, nothing cached
    b, _ = admit(kv, [*range(1, 10), 7, 7, 7])  # 12 tokens, 8 cached
    assert (kv.stats.requests, kv.stats.queries, kv.stats.hits) == (2, 21, 8)
    assert kv.stats.hit_rate == pytest.approx(8 / 21)
    kv.match_prefix(list(range(1, 10)))  # a lookup counts nothing
    assert kv.stats.requests == 2
    kv.free(a)
    kv.free(b)
    kv.allocate(8)  # 8 free: 6, then the 2 idle cached pages evicted
    assert kv.stats.evictions == 2


def test_reset_refuses_while_pages_are_held_then_forgets_the_cache():
    kv = KVCacheManager(10, PS)
    prompt = list(range(1, 10))
    a = prefilled(kv, prompt)
    assert kv.reset() is False and kv.num_cached == 2
    kv.free(a)
    stats = PrefixCacheStats(**vars(kv.stats))
    assert kv.reset() is True
    assert kv.num_cached == 0 and kv.num_free == 9 and kv.match_prefix(prompt) == ([], 0)
    assert kv.stats == stats
    assert kv.allocate(9) == KVCacheManager(10, PS).allocate(9)  # as handed out by a new manager
    kv.check()


# ---------------------------------------------------------------------------------------------- caching off


def test_disabled_cache_hands_out_pages_as_page_allocator():
    rng = random.Random(7)
    for reserved in (0, 1, 3):
        kv = KVCacheManager(40, PS, reserved=reserved, enable_prefix_caching=False)
        ref = PageAllocator(40, reserved)
        held: list[list[int]] = []
        for _ in range(2000):
            if held and rng.random() < 0.45:
                pages = held.pop(rng.randrange(len(held)))
                rng.shuffle(pages)
                kv.free(pages)
                ref.free(pages)
            else:
                n = rng.randrange(0, 6)
                if n > ref.num_free:
                    with pytest.raises(OutOfPagesError):
                        ref.alloc(n)
                    with pytest.raises(OutOfPagesError):
                        kv.allocate(n)
                    continue
                pages = ref.alloc(n)
                assert kv.allocate(n) == pages
                held.append(pages)
            assert kv.num_free == ref.num_free and kv.capacity == ref.capacity
        kv.check()


def test_disabled_cache_caches_nothing_and_counts_nothing():
    kv = KVCacheManager(20, PS, enable_prefix_caching=False)
    assert kv.enable_prefix_caching is False
    prompt = list(range(1, 14))
    a = prefilled(kv, prompt)
    assert kv.commit(a, prompt, 13) == 0 and kv.num_cached == 0
    assert kv.match_prefix(prompt) == ([], 0)
    kv.free(a)
    assert kv.num_idle == 0 and kv.stats == PrefixCacheStats()
    kv.check()


def test_a_scheduler_runs_on_it_as_on_page_allocator():
    """The Scheduler takes the manager where it takes a PageAllocator (alloc, free, num_free, capacity), and with
    caching off gives every request the same pages step by step."""

    def run(allocator: object) -> list[tuple[int, ...]]:
        s = Scheduler(allocator, 16, 3, 128, 64, 1000)  # type: ignore[arg-type]
        rng = random.Random(3)
        for _ in range(8):
            s.submit([rng.randrange(1000) for _ in range(rng.randrange(1, 30))], rng.randrange(1, 40))
        trace = []
        while s.has_work:
            admitted = s.admit()
            if admitted:
                s.record(admitted, [1] * len(admitted), prefill=True)
            rows = s.decode_rows(False)
            s.record(rows, [2] * len(rows))
            trace += [tuple(r.pages) for r in s.active]
        return trace

    trace = run(PageAllocator(12))
    assert len(trace) > 20
    assert run(KVCacheManager(12, 16, enable_prefix_caching=False)) == trace
    assert run(KVCacheManager(12, 16)) == trace  # nothing committed: nothing cached, the same pages


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(num_pages=1), ValueError, "num_pages"),
        (dict(num_pages=4, reserved=4), ValueError, "num_pages"),
        (dict(num_pages=4, reserved=-1), ValueError, "reserved"),
        (dict(num_pages=4.0), TypeError, "num_pages"),
        (dict(num_pages=4, page_size=0), ValueError, "page_size"),
        (dict(num_pages=4, page_size=True), TypeError, "page_size"),
        (dict(num_pages=4, enable_prefix_caching="yes"), TypeError, "enable_prefix_caching"),
    ],
)
def test_the_constructor_refuses_bad_arguments_by_name(kwargs: dict, error: type, match: str):
    with pytest.raises(error, match=match):
        KVCacheManager(**{"page_size": PS, **kwargs})


@pytest.mark.parametrize(
    ("tokens", "error", "match"),
    [
        ("abc", TypeError, "token_ids: expected a 1-D list"),
        ([1.5, 2], TypeError, "token_ids"),
        ([[1, 2]], TypeError, "token_ids"),
        ([[1], [1, 2]], TypeError, "token_ids"),
        ([True], TypeError, "token_ids"),
        (None, TypeError, "token_ids"),
        ({1, 2}, TypeError, "token_ids"),
        ([1, -1], ValueError, r"token_ids\[1\]: expected a token id in \[0, 2\*\*31\)"),
        ([2**31], ValueError, r"token_ids\[0\]"),
        ([2**64], TypeError, "token_ids"),
        ([10**400], TypeError, "token_ids"),
    ],
)
def test_match_prefix_refuses_bad_token_ids_by_name(tokens: object, error: type, match: str):
    kv = KVCacheManager(8, PS)
    with pytest.raises(error, match=match):
        kv.match_prefix(tokens)  # type: ignore[arg-type]
    with pytest.raises(error, match=match):
        page_hashes(tokens, PS)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "key", [1.5, [1], {"a": 1}, {1}, (1, [2]), object(), np.int64(1), ((((((((((1,),),),),),),),),),)]
)
def test_bad_extra_keys_are_refused_by_name(key: object):
    kv = KVCacheManager(8, PS)
    with pytest.raises(TypeError, match="extra_key"):
        kv.match_prefix([1, 2, 3, 4, 5], key)
    pages = kv.allocate(2)
    with pytest.raises(TypeError, match="extra_key"):
        kv.commit(pages, [1, 2, 3, 4, 5], 5, key)
    assert kv.num_cached == 0


def test_page_methods_refuse_bad_pages_and_counts_by_name_and_change_nothing():
    kv = KVCacheManager(8, PS)
    a = kv.allocate(2)
    with pytest.raises(ValueError, match="pages: page 0 is not allocated"):
        kv.free([0])  # the padding page
    with pytest.raises(ValueError, match="is not allocated"):
        kv.free([a[0], a[0]])  # held once, freed twice
    with pytest.raises(ValueError, match="is not allocated"):
        kv.free([a[0], 99])
    with pytest.raises(TypeError, match=r"pages\[0\]: expected a page id"):
        kv.free(["1"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="pages"):
        kv.free(5)  # type: ignore[arg-type]
    assert kv.num_free == 5
    with pytest.raises(ValueError, match="n: expected an int >= 0"):
        kv.allocate(-1)
    with pytest.raises(TypeError, match="n: expected an int"):
        kv.allocate(1.0)  # type: ignore[arg-type]
    tokens = list(range(1, 9))
    with pytest.raises(ValueError, match="num_computed_tokens: 9 tokens exceed"):
        kv.commit(a, tokens, 9)
    with pytest.raises(ValueError, match=r"pages\[1\]: page 5 is not held"):
        kv.commit([a[0], 5], tokens, 8)
    with pytest.raises(TypeError, match="token_ids"):
        kv.commit(a, {1, 2}, 0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="token_ids"):
        kv.commit(a, [1, 2, 3, "x", 5, 6, 7, 8], 8)
    assert kv.num_cached == 0
    kv.commit(a, tokens, 8)
    prefix, _ = kv.match_prefix([*tokens, 1])
    with pytest.raises(ValueError, match="prefix: names a page twice"):
        kv.acquire(prefix + prefix[:1], 0, num_tokens=9)
    with pytest.raises(ValueError, match="num_tokens: 8 prompt tokens, but prefix holds 8"):
        kv.acquire(prefix, 0, num_tokens=8)
    with pytest.raises(ValueError, match=r"prefix\[0\]: page 3 is not a page the cache serves"):
        kv.acquire([3], 0, num_tokens=9)
    kv.free(a)
    assert kv.num_free == 7 and kv.num_idle == 2
    kv.check()


# ---------------------------------------------------------------------------------------------- randomized


def test_twenty_thousand_random_operations_keep_the_bookkeeping_and_the_cached_tokens_right():
    """A seeded run of 20,000 operations (admit with a match, prefill or decode in chunks with commits, finish,
    hold and give back stray pages, reset) over a small cache, prompts drawn from a few shared prefixes so that
    pages are matched, shared and evicted. After every operation :meth:`check` holds, and a model of the device
    (the token each page slot holds, written by each request's passes) says every matched page holds exactly the
    tokens it was matched for, no pass writes a page another request holds, and no page handed out is held."""
    rng = random.Random(20_000)
    kv = KVCacheManager(1 + 48, PS)
    written: dict[int, list[int | None]] = {}  # page -> its slots' tokens on the "device"
    running: list[dict] = []
    stray: list[list[int]] = []
    prefixes = [[rng.randrange(50) for _ in range(rng.randrange(0, 14))] for _ in range(5)]
    matched_tokens = 0

    def holders(page: int) -> int:
        return sum(page in r["pages"] for r in running) + sum(page in s for s in stray)

    def fresh(pages: list[int]) -> None:
        for p in pages:
            assert holders(p) == 0, f"page {p} handed out while held"
            written[p] = [None] * PS

    for _ in range(20_000):
        op = rng.random()
        if op < 0.25 and len(running) < 6:  # admit
            key = rng.choice([None, None, None, "lora"])
            tokens = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(1, 10))]
            prefix, cached = kv.match_prefix(tokens, key)
            for i, p in enumerate(prefix):  # the cache's promise: these slots hold these tokens
                assert written[p] == tokens[i * PS : (i + 1) * PS]
            matched_tokens += cached
            new = pages_for(len(tokens), PS) - len(prefix)
            if kv.free_pages_needed(prefix, new) > kv.num_free:
                with pytest.raises(OutOfPagesError):
                    kv.acquire(prefix, new, num_tokens=len(tokens))
            else:
                pages = kv.acquire(prefix, new, num_tokens=len(tokens))
                fresh(pages[len(prefix) :])
                running.append(dict(tokens=tokens, pages=pages, done=cached, key=key))
        elif op < 0.7 and running:  # a pass: a chunk of the prompt, or one decode token
            r = rng.choice(running)
            if r["done"] == len(r["tokens"]):  # decoding: a new token to feed
                r["tokens"].append(rng.randrange(50))
            end = min(len(r["tokens"]), r["done"] + rng.randrange(1, 7))
            need = max(pages_for(end, PS) - len(r["pages"]), 0)
            if need > kv.num_free:
                continue
            got = kv.allocate(need)
            fresh(got)
            r["pages"] += got
            for pos in range(r["done"], end):
                page = r["pages"][pos // PS]
                assert holders(page) == 1, "a pass writes a page another request holds"
                written[page][pos % PS] = r["tokens"][pos]
            r["done"] = end
            kv.commit(r["pages"], r["tokens"], end, r["key"])
        elif op < 0.9 and running:  # finish
            r = running.pop(rng.randrange(len(running)))
            kv.free(r["pages"])
        elif op < 0.97:  # stray pages held and given back (another user of the pool)
            if stray and rng.random() < 0.5:
                kv.free(stray.pop())
            elif kv.num_free:
                got = kv.allocate(rng.randrange(1, min(kv.num_free, 4) + 1))
                fresh(got)
                stray.append(got)
        else:
            assert kv.reset() is (not running and not stray)
        kv.check()
        held = {p for r in running for p in r["pages"]} | {p for s in stray for p in s}
        assert len(held) + kv.num_free == kv.capacity
    assert kv.stats.evictions > 1_000 and matched_tokens > 5_000 and kv.stats.hits > 5_000  # the run exercised them


def test_check_finds_broken_bookkeeping():
    """check() is what the randomized run relies on: each corruption below (made through the private state, as a bug
    would) must be named."""
    corruptions = {
        "a page is twice in the free list": lambda kv, held: kv._free.append(kv._free[-1]),
        "a page is in two states": lambda kv, held: kv._free.append(held[0]),
        "a page is in no state": lambda kv, held: kv._free.pop(),
        "a free page keeps a hash": lambda kv, held: kv._hash_of.update({kv._free[-1]: b"x" * 16}),
        "a cached page lost its hash": lambda kv, held: kv._hash_of.pop(held[0]),
    }
    for broken, corrupt in corruptions.items():
        kv = KVCacheManager(16, PS)
        held = prefilled(kv, list(range(1, 10)))
        kv.check()
        corrupt(kv, held)
        with pytest.raises(AssertionError, match=broken):
            kv.check()
