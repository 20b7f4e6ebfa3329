"""Key/value storage for attention: a preallocated inference cache and the rolling buffer the
looped block uses without one.

Layout of `KVCache`: one slot per prelude layer, one per loop of the recurrent block, one per coda
layer. With `kv_cache_policy="ring"` the recurrent block has only kv_cache_ring slots and loop t
uses slot t % kv_cache_ring, so the cache stops growing with depth. GQA slots hold RoPE'd keys and values per KV head; MLA slots hold one tensor per token,
[c_kv | k_rope]: the normalised latent plus one RoPE key shared by all heads (DeepSeek-V2),
nothing per head. Kept side by side, the absorbed decode path reads the row as its key and its
first kv_lora_rank columns as its value, in place.

Tokens that halt early: a token that leaves the loop after loop t still has to be visible to later
tokens that run deeper. Its entry in every deeper loop's slot is its latest computed entry (the one
from loop t), copied, never recomputed. So halting saves compute in decode as well as in prefill.

Positions live inside the cache: `lengths` counts each row's written columns, `valid` marks real
tokens and `next_pos` is each row's next RoPE position. Left padding takes columns of its own
(marked not valid), unless the cache is `packed`: then a row holds only its real tokens, rows
grow apart, and every call with padding or ragged rows runs on its real tokens alone (the
serving engine, whose steps mix one decoded token for some rows with a chunk of prompt for
others).
"""

from __future__ import annotations

import torch

from openmythos.config import is_int


def _rows_to_coords(rows: torch.Tensor, T: int, start: int,
                    cols: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, column) of each flattened (B*T) row; `cols` gives ragged rows their own start."""
    b = rows // T
    return b, (start if cols is None else cols[b]) + rows % T


def _all_rows(B: int, T: int, device: torch.device) -> torch.Tensor:
    return torch.arange(B * T, device=device)


class KVSlot:
    """One layer's storage: tensors (B, S_max, ...), written at [start, start + T)."""

    def __init__(self, tensors: list[torch.Tensor]):
        self.tensors = tensors

    def update(self, new: list[torch.Tensor], start: int, T: int, rows: torch.Tensor | None,
               cols: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Write this step's entries and return the visible prefix [0, start + T). With ragged
        rows (`cols`, each row's own first column) start is the largest of them."""
        if rows is None and cols is None:
            for buf, x in zip(self.tensors, new, strict=True):
                buf[:, start:start + T] = x
        else:
            if rows is None:  # every row, each at its own column
                rows, new = _all_rows(new[0].shape[0], T, new[0].device), [x.flatten(0, 1) for x in new]
            coords = _rows_to_coords(rows, T, start, cols)
            for buf, x in zip(self.tensors, new, strict=True):
                buf[coords] = x.to(buf.dtype)  # under autocast, x may be narrower
        return [buf[:, :start + T] for buf in self.tensors]

    def narrow(self, start: int, n: int) -> KVSlot:
        """Rows [start, start + n), sharing this slot's storage."""
        return KVSlot([t.narrow(0, start, n) for t in self.tensors])

    def copy_new_tokens(self, other: KVSlot, start: int, T: int, cols: torch.Tensor | None = None,
                        rows: torch.Tensor | None = None) -> None:
        """Give halted tokens their latest entry: copy the new columns from the shallower slot
        (only those of `rows`, the real tokens of a packed call, when given)."""
        for dst, src in zip(self.tensors, other.tensors, strict=True):
            if cols is None and rows is None:
                dst[:, start:start + T] = src[:, start:start + T]
            else:
                every = _all_rows(dst.shape[0], T, dst.device) if rows is None else rows
                coords = _rows_to_coords(every, T, start, cols)
                dst[coords] = src[coords]


class RollingKV:
    """The looped block's keys without a cache: loop t attends to loop t's entries, and a halted
    token keeps the entry of the last loop it ran. Updates are out of place so autograd sees them."""

    def __init__(self, tensors: list[torch.Tensor] | None = None) -> None:
        self.tensors = tensors

    def update(self, new: list[torch.Tensor], start: int, T: int,
               rows: torch.Tensor | None,
               cols: None = None) -> list[torch.Tensor]:
        if rows is None or self.tensors is None:
            assert rows is None, "the first loop must run every row"
            self.tensors = list(new)
        else:
            coords = _rows_to_coords(rows, T, start)
            self.tensors = [buf.index_put(coords, x) for buf, x in zip(self.tensors, new, strict=True)]
        return self.tensors


class KVCache:
    """Preallocated KV cache for prefill, chunked prefill and decode."""

    def __init__(self, cfg, batch_size: int, max_len: int, n_loops: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 packed: bool = False):
        n_loops = cfg.max_loop_iters if n_loops is None else n_loops
        for name, value in (("batch_size", batch_size), ("max_len", max_len), ("n_loops", n_loops)):
            if not is_int(value) or value <= 0:
                raise ValueError(f"KVCache: {name} must be a positive integer, got {value!r}")
        if max_len > cfg.max_seq_len:
            raise ValueError(f"KVCache: max_len={max_len} exceeds max_seq_len={cfg.max_seq_len}")
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.layout = self.layout_of(cfg, dtype, self.valid.device)
        # keys and values per head for GQA, one [c_kv | k_rope] row per token for MLA
        n_tensors = 2 if cfg.attn_type == "gqa" else 1

        def slot() -> KVSlot:
            return KVSlot([torch.zeros(batch_size, max_len, *self.layout["entry shape"], dtype=dtype,
                                       device=device) for _ in range(n_tensors)])

        self.batch_size, self.max_len, self.n_loops, self.packed = batch_size, max_len, n_loops, packed
        self.prelude = [slot() for _ in range(cfg.prelude_layers)]
        self.loop_slots = [slot() for _ in range(cfg.kv_cache_loop_slots(n_loops))]
        self.coda = [slot() for _ in range(cfg.coda_layers)]
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # columns per row
        self._flags = {"has_padding": False}  # shared with narrow views: padding seen through one
        # view (the engine's batched prefill) must make the whole cache read `valid`

    @staticmethod
    def layout_of(cfg, dtype: torch.dtype, device: torch.device) -> dict:
        """What a model needs of a cache to use it: `OpenMythos.forward` compares a cache's with
        its own (a cache from another model would fail deep inside, or silently decode wrong)."""
        entry = ((cfg.n_kv_heads, cfg.head_dim) if cfg.attn_type == "gqa"
                 else (cfg.kv_lora_rank + cfg.qk_rope_head_dim,))
        return {"attn_type": cfg.attn_type, "entry shape": entry, "prelude_layers": cfg.prelude_layers,
                "coda_layers": cfg.coda_layers, "kv_cache_policy": cfg.kv_cache_policy,
                "kv_cache_ring": cfg.kv_cache_ring if cfg.kv_cache_policy == "ring" else None,
                "dtype": dtype, "device": device}

    @property
    def has_padding(self) -> bool:
        """Some row holds left padding, so attention must mask by `valid`."""
        return self._flags["has_padding"]

    @has_padding.setter
    def has_padding(self, value: bool) -> None:
        self._flags["has_padding"] = value

    @property
    def slots(self) -> list[KVSlot]:
        """Every slot: the prelude layers', the loops', the coda layers'."""
        return self.prelude + self.loop_slots + self.coda

    @property
    def length(self) -> int:
        """Columns written: every row's, or the longest row's once rows are ragged."""
        return int(self.lengths.max())

    def narrow(self, start: int, n: int) -> KVCache:
        """Rows [start, start + n) as a cache of their own that shares this one's storage: the
        serving engine runs each step on a contiguous view, never a copy."""
        view = object.__new__(KVCache)
        view.batch_size, view.max_len, view.n_loops, view.packed = n, self.max_len, self.n_loops, self.packed
        view.layout = self.layout
        for name in ("prelude", "loop_slots", "coda"):
            setattr(view, name, [s.narrow(start, n) for s in getattr(self, name)])
        view.valid, view.next_pos, view.lengths = (t.narrow(0, start, n) for t in
                                                   (self.valid, self.next_pos, self.lengths))
        view._flags = self._flags
        return view

    def reset_rows(self, start: int, n: int) -> None:
        """Empty rows [start, start + n) for new sequences (stale entries become invisible)."""
        for t in (self.valid, self.next_pos, self.lengths):
            t[start:start + n] = 0

    def move_rows(self, src: list[int], dst: list[int]) -> None:
        """Row src[i] becomes row dst[i], for every i at once (a permutation of a few rows).
        Entries move only up to the longest moving row: past a row's length, `valid` hides them."""
        n = int(self.lengths[src].max())
        for s in self.slots:
            for t in s.tensors:
                t[dst, :n] = t[src, :n]
        for t in (self.valid, self.next_pos, self.lengths):
            t[dst] = t[src]

    def select_rows(self, index: torch.Tensor) -> None:
        """Row i continues from row index[i] (beam search), in place."""
        for s in self.slots:
            s.tensors = [t.index_select(0, index) for t in s.tensors]
        self.valid, self.next_pos, self.lengths = (t.index_select(0, index) for t in
                                                   (self.valid, self.next_pos, self.lengths))

    def copy_to(self, other: KVCache) -> None:
        """Everything written here into `other`, a cache of the same rows and slots with room for
        at least as many columns (a cache that outgrew its allocation)."""
        n = self.length
        for mine, theirs in zip(self.slots, other.slots, strict=True):
            for src, dst in zip(mine.tensors, theirs.tensors, strict=True):
                dst[:, :n] = src[:, :n]
        other.valid[:, :n] = self.valid[:, :n]
        other.next_pos.copy_(self.next_pos)
        other.lengths.copy_(self.lengths)
        other.has_padding = self.has_padding

    def rewind(self, n: int) -> None:
        """Forget every row's last n tokens (a draft that verification rejected): their columns
        become invisible and are written again by the next call."""
        if not (is_int(n) and 0 <= n <= int(self.lengths.min())):
            raise ValueError(f"rewind: n must be an integer in [0, {int(self.lengths.min())}], got {n!r}")
        n = int(n)
        cols = torch.arange(self.max_len, device=self.lengths.device)
        gone = (cols >= (self.lengths - n).unsqueeze(1)) & (cols < self.lengths.unsqueeze(1))
        self.next_pos -= (self.valid & gone).sum(1)  # real tokens only: left padding has no position
        self.valid &= ~gone
        self.lengths -= n

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for s in self.slots for t in s.tensors)

    def reset(self) -> None:
        self.reset_rows(0, self.batch_size)
        self.has_padding = False
