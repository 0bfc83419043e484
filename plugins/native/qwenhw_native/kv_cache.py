"""The KV cache: per layer, keys and values in pages of `page` slots, and a table of each row's pages.

A sequence's slot s lives in page table[row, s // page], at s % page. Two layouts share that one address:
- static: a page per row of the whole context (page = max_len, table[row] = [row]); every row owns its
  context's memory, whether its sequence uses it or not.
- paged: pages of PAGE slots from a pool (vLLM's paged attention, its block tables): a sequence takes the pages
  of its prompt when it is admitted, one more each time its answer reaches the end of the last (`grow`), and
  gives them back when it leaves, so a pool of N tokens holds as many sequences as their lengths allow, not
  N / max_len. Page 0 is the scratch page: every entry of a free row points to it, so the scratch slot
  (max_len - 1, what rows that do not decode write and read) lands there, never in a page a sequence holds.

Prefix caching (paged, `prefix=True`; vLLM's automatic prefix caching): a page that holds PAGE tokens of a
prompt is named by those tokens and all before them (a chained hash); a sequence admitted with a prompt whose
first pages are named takes those very pages (shared, counted per holder) and its prompt goes in from the first
token after them. A page no sequence holds keeps its name, and its keys, until the pool needs it: the free pages
go first, then the named ones, least recently given back first.

The table lives on the device (the kernels and captured graphs read it); changes go up before the next pass
(`upload`, through graphs.Upload: without waiting for the GPU's queue).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

import torch

from .graphs import Upload
from .kernels.attention import CHUNK
from .limits import PAGE, pages_for

assert PAGE % CHUNK == 0, "a decode-attention program's chunk of slots lies in one page"


class KVCache:
    """Keys and values [layers, pages, kv_heads, page, head_dim] and the row -> pages table [rows, pages a row
    may hold]. `pool_tokens` 0: static (a page per row of max_len slots); else a pool of that many slots in pages
    of PAGE, rows taking them as sequences are admitted (`admit`, `release`)."""

    def __init__(self, layers: int, rows: int, kv_heads: int, head_dim: int, max_len: int, dtype: torch.dtype,
                 device: torch.device, pool_tokens: int = 0, prefix: bool = False):
        self.rows, self.max_len, self.device = rows, max_len, device
        self.paged = pool_tokens > 0
        self.prefix = prefix and self.paged
        if self.paged:
            if pool_tokens < max_len:
                raise ValueError(f"a KV pool of {pool_tokens} tokens cannot hold one {max_len}-token sequence")
            self.page = PAGE
            pages = 1 + max(pages_for(pool_tokens), rows)  # page 0: the scratch page; a page per row at least
            self.table_host = torch.zeros((rows, pages_for(max_len)), dtype=torch.int32)
            self.free = list(range(pages - 1, 0, -1))  # taken from the end: low pages first
        else:
            self.page, pages = max_len, rows
            self.table_host = torch.arange(rows, dtype=torch.int32)[:, None]
            self.free = []
        shape = (layers, pages, kv_heads, self.page, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.table = self.table_host.to(device)
        self._upload = Upload(self.table, buffers=1)
        self.held: list[list[int]] = [[] for _ in range(rows)]
        self._dirty = False
        # prefix caching: rows holding each page; page <-> name (hash) of the named ones; the named pages no row
        # holds, least recently given back first; each row's prompt pages' names and how many of them are named
        self.refs = [0] * pages
        self.named: dict[bytes, int] = {}
        self.name_of: dict[int, bytes] = {}
        self.idle: OrderedDict[int, None] = OrderedDict()
        self.names: list[list[bytes]] = [[] for _ in range(rows)]
        self.registered = [0] * rows
        self.queried = self.hit = 0  # prompt tokens looked up, and found (tokens)

    @property
    def pool_tokens(self) -> int:
        return (self.k.shape[1] - 1) * self.page if self.paged else 0

    @property
    def unheld(self) -> int:
        """Pages no sequence holds (named ones included: the pool takes them back as it needs)."""
        return len(self.free) + len(self.idle)

    @property
    def free_tokens(self) -> int:
        return self.unheld * self.page

    @property
    def usage(self) -> float:
        """The share of a pool's pages that sequences hold."""
        return 1 - self.unheld / (self.k.shape[1] - 1) if self.paged else 0.0

    # --- pages of the pool ------------------------------------------------------------------------------
    def slots(self, row: int) -> int:
        """The slots row `row` holds: its pages' (static: its whole context)."""
        return len(self.held[row]) * self.page if self.paged else self.max_len

    def fits(self, tokens: int, spare: int = 0, ids: list[int] | None = None) -> bool:
        """Whether the pool has the pages for a sequence of `tokens` slots now, `spare` pages left over (static:
        always); `ids`, its prompt: the named pages it would share need none."""
        if not self.paged:
            return True
        shared = self.match(ids) if ids is not None else []
        taken_idle = sum(1 for p in shared if p in self.idle)
        return pages_for(tokens, self.page) - len(shared) + spare <= self.unheld - taken_idle

    def admit(self, row: int, tokens: int, ids: list[int] | None = None) -> int:
        """Free row `row` takes the pages for `tokens` slots (its prompt and the first token of its answer);
        with its prompt `ids` (prefix caching) the named pages of its first tokens are shared. Returns the
        prompt tokens those pages hold (0: the prompt goes in from its first token)."""
        assert not self.held[row], "a row takes pages once, until it is released"
        shared = self.match(ids) if ids is not None else []
        for p in shared:
            self.refs[p] += 1
            self.idle.pop(p, None)
        if shared:
            self.held[row] = list(shared)
            self.table_host[row, :len(shared)] = torch.tensor(shared, dtype=torch.int32)
            self._dirty = True
        if ids is not None and self.prefix:
            self.names[row], self.registered[row] = self._names(ids), len(shared)
            self.queried, self.hit = self.queried + len(ids), self.hit + len(shared) * self.page
        if not self.grow(row, tokens):  # callers ask `fits` first
            raise RuntimeError(f"{pages_for(tokens, self.page) - len(shared)} pages asked, "
                               f"{self.unheld} free")
        return len(shared) * self.page

    def _names(self, ids: list[int]) -> list[bytes]:
        """The names of a prompt's whole pages but the one holding its last token, which a pass computes (its
        logits are the answer's first token): each the hash of the name before and the page's tokens."""
        out, name = [], b""
        for a in range(0, (len(ids) - 1) // self.page * self.page, self.page):
            name = hashlib.sha256(name + array("q", ids[a:a + self.page]).tobytes()).digest()
            out.append(name)
        return out

    def match(self, ids: list[int] | None) -> list[int]:
        """The named pages that hold the first pages of prompt `ids`, in order (prefix caching; else none)."""
        if not self.prefix or not ids:
            return []
        out = []
        for name in self._names(ids):
            if (p := self.named.get(name)) is None:
                break
            out.append(p)
        return out

    def register(self, row: int, tokens: int) -> None:
        """Row `row`'s prompt has its first `tokens` in its pages: the whole ones among them take their names,
        where no other page has it."""
        if not self.prefix:
            return
        names = self.names[row]
        while self.registered[row] < min(len(names), tokens // self.page):
            j = self.registered[row]
            if names[j] not in self.named:
                self.named[names[j]], self.name_of[self.held[row][j]] = self.held[row][j], names[j]
            self.registered[row] += 1

    def _take(self) -> int:
        """A page for a row: a free one, else the named page given back the longest ago (its name goes)."""
        if self.free:
            return self.free.pop()
        page, _ = self.idle.popitem(last=False)
        del self.named[self.name_of.pop(page)]
        return page

    def grow(self, row: int, tokens: int) -> bool:
        """Row `row` holds the pages for `tokens` slots: it takes the ones it lacks (a sequence's answer takes a
        page as it reaches it), or none where the pool has not that many free (False)."""
        if not self.paged:
            return True
        have, need = len(self.held[row]), pages_for(tokens, self.page)
        if need <= have:
            return True
        if need - have > self.unheld:
            return False
        new = [self._take() for _ in range(need - have)]
        for p in new:
            self.refs[p] = 1
        self.held[row] += new
        self.table_host[row, have:need] = torch.tensor(new, dtype=torch.int32)
        self._dirty = True
        return True

    def release(self, row: int) -> None:
        """The row's pages go back to the pool (a named one keeps its name and keys, for a prompt that starts
        alike, until the pool needs it); its entries to the scratch page."""
        if not self.paged or not self.held[row]:
            return
        for p in reversed(self.held[row]):
            self.refs[p] -= 1
            if self.refs[p] == 0:
                if p in self.name_of:
                    self.idle[p] = None
                else:
                    self.free.append(p)
        self.held[row], self.names[row], self.registered[row] = [], [], 0
        self.table_host[row] = 0
        self._dirty = True

    def upload(self) -> None:
        """The host table to the device, queued behind what runs (a pass or step reads it after)."""
        if self._dirty:
            self._dirty = False
            self._upload(self.table_host)

    # --- addressing for torch's indexing (prompt passes, the CPU) ----------------------------------------
    def where(self, rows: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(page, slot within it) of each (row, slot) pair (broadcast): index a layer's cache as
        k[page, :, within]."""
        return self.table[rows, torch.div(slots, self.page, rounding_mode="floor")].long(), slots % self.page

    def write(self, i: int, rows: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [..., kv_heads, head_dim] into layer i at each (row, slot) (rows and slots broadcast to ...)."""
        page, within = self.where(rows, slots)
        self.k[i][page, :, within] = k
        self.v[i][page, :, within] = v

    def read(self, i: int, rows: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's keys and values at each (row, slot): [..., kv_heads, head_dim]."""
        page, within = self.where(rows, slots)
        return self.k[i][page, :, within], self.v[i][page, :, within]

    def rows_view(self, i: int, rows: torch.Tensor | slice, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's keys and values of `rows` (row numbers, or a slice of them) at slots 0..end-1, as attention
        takes them: [rows, kv_heads, end, head_dim] (a static cache's slice of rows: a view, no copy)."""
        if not self.paged:
            return self.k[i][rows, :, :end], self.v[i][rows, :, :end]
        if isinstance(rows, slice):
            rows = torch.arange(self.rows, device=self.device)[rows]
        slots = torch.arange(end, device=self.device)
        k, v = self.read(i, rows[:, None], slots[None, :])
        return k.transpose(1, 2), v.transpose(1, 2)
