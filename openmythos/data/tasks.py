"""Synthetic reasoning tasks for depth-extrapolation experiments.

k-hop composition (the LTG task): E entities and R relations, each relation a random permutation
of the entities. The input is `<e_h> <r_1> ... <r_k>` and the target is the entity reached by
applying r_1, then r_2, ..., then r_k to e_h. Training uses chains of at most K hops; testing
uses longer chains, to see whether more loops at inference buy more hops.

Token layout: [PAD, QUERY, entities..., relations...]. QUERY ends the input; the model predicts
the target entity at that position.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KHopTask:
    n_entities: int = 200
    n_relations: int = 10
    seed: int = 0

    PAD = 0
    QUERY = 1
    TEST_EVERY = 10

    def __post_init__(self) -> None:
        for name in ("n_entities", "n_relations"):
            if getattr(self, name) < 1:
                raise ValueError(f"KHopTask.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def vocab_size(self) -> int:
        return 2 + self.n_entities + self.n_relations

    def entity_token(self, e: torch.Tensor | int):
        return e + 2

    def relation_token(self, r: torch.Tensor | int):
        return r + 2 + self.n_entities

    @property
    def relations(self) -> torch.Tensor:
        """(R, E): relations[r, e] is the entity that relation r maps e to."""
        g = torch.Generator().manual_seed(self.seed)
        return torch.stack([torch.randperm(self.n_entities, generator=g)
                            for _ in range(self.n_relations)])

    def follow(self, heads: torch.Tensor, chain: torch.Tensor) -> torch.Tensor:
        """Apply each row's relation chain (N, k) to its head entity (N,)."""
        table, e = self.relations, heads.clone()
        for step in range(chain.shape[1]):
            e = table[chain[:, step], e]
        return e

    def is_test(self, heads: torch.Tensor, chain: torch.Tensor) -> torch.Tensor:
        """Deterministic 1-in-`TEST_EVERY` split by a hash of the whole query."""
        h = heads.long() * 1_000_003 + self.seed
        for step in range(chain.shape[1]):
            h = (h * 1_000_033 + chain[:, step] + 1) % 2_147_483_647
        return (h * 2_654_435_761 % 4_294_967_291) % self.TEST_EVERY == 0

    def sample(self, n: int, hops: int, generator: torch.Generator, width: int | None = None,
               split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """n examples of exactly `hops` hops from `split`, left-padded to `width` tokens.

        Returns input ids (n, width) ending in QUERY and target token ids (n,).
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if hops < 1:
            raise ValueError(f"hops must be >= 1, got {hops}")
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if not self._split_has(hops, split == "test"):
            raise ValueError(f"the {split} split holds no {hops}-hop query with n_entities="
                             f"{self.n_entities} and n_relations={self.n_relations}: use more of either")
        width = hops + 2 if width is None else width
        if width < hops + 2:
            raise ValueError(f"width={width} cannot hold {hops} hops (needs {hops + 2} tokens)")
        heads, chain = self._draw(n, hops, generator, split == "test")
        ids = torch.full((n, width), self.PAD, dtype=torch.long)
        ids[:, width - hops - 2] = self.entity_token(heads)
        ids[:, width - hops - 1:width - 1] = self.relation_token(chain)
        ids[:, -1] = self.QUERY
        return ids, self.entity_token(self.follow(heads, chain))

    @functools.lru_cache(maxsize=64)  # noqa: B019 (a frozen dataclass: hashable, never mutated)
    def _split_has(self, hops: int, test: bool) -> bool:
        """Whether the split holds any query of `hops` hops: checked in full for a small query
        space, where the rejection sampling below could otherwise draw forever; a large one
        holds about a TEST_EVERY-th of test queries."""
        if self.n_entities * self.n_relations ** hops > 100_000:
            return True
        chains = torch.cartesian_prod(*[torch.arange(self.n_relations)] * hops).view(-1, hops)
        heads = torch.arange(self.n_entities).repeat_interleave(len(chains))
        return bool((self.is_test(heads, chains.repeat(self.n_entities, 1)) == test).any())

    def _draw(self, n: int, hops: int, generator: torch.Generator,
              test: bool) -> tuple[torch.Tensor, torch.Tensor]:
        heads, chains, have = [], [], 0
        while have < n:  # rejection sampling: oversample, keep this split's queries
            h = torch.randint(self.n_entities, (4 * n,), generator=generator)
            c = torch.randint(self.n_relations, (4 * n, hops), generator=generator)
            keep = self.is_test(h, c) == test
            heads.append(h[keep])
            chains.append(c[keep])
            have += int(keep.sum())
        return torch.cat(heads)[:n], torch.cat(chains)[:n]

    def batch(self, n: int, max_hops: int, generator: torch.Generator, width: int,
              split: str = "train") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A mixed batch with hop counts uniform in 1..max_hops. Returns ids, targets, hops."""
        if max_hops < 1:
            raise ValueError(f"max_hops must be >= 1, got {max_hops}")
        hops = torch.randint(1, max_hops + 1, (n,), generator=generator)
        ids = torch.full((n, width), self.PAD, dtype=torch.long)
        targets = torch.empty(n, dtype=torch.long)
        for k in hops.unique().tolist():
            rows = (hops == k).nonzero().squeeze(1)
            ids[rows], targets[rows] = self.sample(len(rows), k, generator, width, split)
        return ids, targets, hops
