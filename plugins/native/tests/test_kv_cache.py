"""The KV cache's pages (kv_cache.py) on the CPU: what a row takes and gives back, where its slots land, and the
static layout as the one-page-per-row case."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from qwenhw_native.kv_cache import PAGE, KVCache  # noqa: E402


def _cache(pool: int, rows: int = 3, max_len: int = 600, prefix: bool = False) -> KVCache:
    return KVCache(layers=2, rows=rows, kv_heads=2, head_dim=4, max_len=max_len, dtype=torch.float32,
                   device=torch.device("cpu"), pool_tokens=pool, prefix=prefix)


def test_rows_take_whole_pages_and_give_them_back():
    c = _cache(4 * PAGE)
    assert c.paged and c.pool_tokens == 4 * PAGE and c.free_tokens == 4 * PAGE
    assert c.fits(PAGE + 1) and not c.fits(4 * PAGE + 1)
    c.admit(0, PAGE + 1)  # two pages
    c.admit(2, 1)  # one
    assert [len(h) for h in c.held] == [2, 0, 1] and c.free_tokens == PAGE
    assert not c.fits(PAGE + 1)
    pages = set(c.held[0]) | set(c.held[2])
    assert 0 not in pages and len(pages) == 3  # page 0 is the scratch page, never handed out
    c.upload()
    assert c.table[0, :2].tolist() == c.held[0] and c.table[1].tolist() == [0, 0, 0]  # a free row: scratch
    c.release(0)
    assert c.free_tokens == 3 * PAGE and c.held[0] == [] and c.table_host[0].tolist() == [0, 0, 0]
    with pytest.raises(RuntimeError, match="4 pages asked, 3 free"):
        c.admit(1, 4 * PAGE)


def test_slots_land_in_the_rows_pages():
    """A write at (row, slot) is read back there and lands in page table[row, slot // PAGE]; another row's pages
    and the scratch page stay as they were."""
    c = _cache(4 * PAGE)
    c.admit(1, 2 * PAGE)
    c.upload()
    rows, slots = torch.tensor([1, 1, 1]), torch.tensor([0, PAGE - 1, PAGE])
    k = torch.arange(3 * 2 * 4, dtype=torch.float32).view(3, 2, 4) + 1
    c.write(0, rows, slots, k, -k)
    got_k, got_v = c.read(0, rows, slots)
    assert torch.equal(got_k, k) and torch.equal(got_v, -k)
    first, second = c.held[1]
    assert torch.equal(c.k[0, second, :, 0], k[2]) and torch.equal(c.k[0, first, :, PAGE - 1], k[1])
    assert int(c.k[0].count_nonzero()) == k.numel() and int(c.k[1].count_nonzero()) == 0
    keys, values = c.rows_view(0, torch.tensor([1]), PAGE + 1)  # [rows, kv_heads, slots, head_dim]
    assert keys.shape == (1, 2, PAGE + 1, 4) and torch.equal(keys[0, :, PAGE], k[2])


def test_the_static_cache_is_one_page_per_row():
    c = _cache(0, rows=2, max_len=64)
    assert not c.paged and c.page == 64 and c.k.shape == (2, 2, 2, 64, 4)
    assert c.table.tolist() == [[0], [1]] and c.fits(10**9)
    c.admit(1, 64)  # nothing to take
    assert c.held == [[], []]
    keys, _ = c.rows_view(0, slice(None), 10)
    assert keys.data_ptr() == c.k[0].data_ptr()  # a view of the cache, no copy


def test_a_pool_must_hold_one_whole_sequence():
    with pytest.raises(ValueError, match="cannot hold one 600-token sequence"):
        _cache(512)


def test_a_row_grows_page_by_page_or_not_at_all():
    """`grow`: a row takes the pages it lacks for more slots, all of them or none (the runtime then preempts)."""
    c = _cache(4 * PAGE)
    c.admit(0, 10)  # one page
    assert c.grow(0, PAGE) and len(c.held[0]) == 1  # still within it
    assert c.grow(0, PAGE + 1) and len(c.held[0]) == 2
    c.admit(1, PAGE + 1)  # the last two
    assert not c.grow(0, 2 * PAGE + 1) and len(c.held[0]) == 2 and c.free == []  # nothing taken
    c.upload()
    assert c.table[0, :2].tolist() == c.held[0] and c.table[0, 2].item() == 0
    c.release(1)
    assert c.grow(0, 3 * PAGE) and len(c.held[0]) == 3 and c.usage == 0.75
    assert _cache(0).grow(2, 10**6)  # a static row holds its whole context


def test_prompts_that_start_alike_share_the_pages_the_first_left():
    """Prefix caching: a prompt's whole pages but the one holding its last token take names as they fill; a
    later prompt starting alike shares them (counted per holder) and goes in from the first token after them;
    pages no row holds keep their names until the pool needs them, free pages going first, then the named ones
    given back the longest ago."""
    c = _cache(6 * PAGE, max_len=1200, prefix=True)
    a = list(range(1000, 1000 + 2 * PAGE + 88))  # two whole pages, then 88 tokens
    b = a[:2 * PAGE] + list(range(5000, 5100))  # starts alike for two pages
    assert c.admit(0, len(a) + 1, a) == 0 and c.match(b) == []  # nothing named yet
    c.register(0, PAGE + 5)  # the prompt's first page has gone in
    assert c.match(b) == c.held[0][:1]
    c.register(0, len(a))
    assert c.match(b) == c.held[0][:2] and c.match(a[:2 * PAGE]) == c.held[0][:1]  # its last page: computed
    first = c.held[0][:2]
    assert c.fits(len(b) + 1, ids=b) and c.free_tokens == 3 * PAGE
    assert c.admit(1, len(b) + 1, b) == 2 * PAGE and c.held[1][:2] == first and len(c.held[1]) == 3
    assert c.queried == len(a) + len(b) and c.hit == 2 * PAGE
    c.release(0)
    assert c.usage == 3 / 6 and c.match(b) == first  # still held by row 1
    c.release(1)
    assert c.free_tokens == 6 * PAGE and list(c.idle) == first[::-1] and c.match(b) == first  # kept, named
    assert c.admit(2, len(b) + 1, b) == 2 * PAGE and not c.idle  # back from the named pages no row held
    c.release(2)
    c.admit(0, 4 * PAGE)  # the four free pages
    # the pool takes a named page back: the prompt's second (a row gives its pages back last first, so a
    # prefix's tail goes before its head)
    assert c.match(b) == first and c.grow(0, 5 * PAGE) and c.match(b) == first[:1]
    assert c.fits(PAGE) and not c.fits(2 * PAGE)
    plain = _cache(6 * PAGE)
    assert plain.admit(0, len(a) + 1, a) == 0 and plain.match(a) == [] and not plain.prefix
