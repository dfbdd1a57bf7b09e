"""Many branches on one cached prefix, in one batch-1 sequence.

The engine scores every region × every label (and decodes every region) on top of one image prefix.
Copying the prefix KV cache per branch would cost batch × ~1,070 tokens × layers of memory; instead all
branches are packed into one sequence after the prefix and a 4D attention mask lets each token see
only the prefix, its own branch's ancestors and its own earlier tokens. Position ids restart per
branch, so every branch computes what it would compute alone (tests check this against the plain path).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import DynamicCache


@dataclass
class PrefixState:
    """The KV cache of a shared prefix (batch 1), kept immutable and re-wrapped per call."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    length: int
    last_logits: torch.Tensor  # logits after the final prefix token (fp32, (vocab,))

    def new_cache(self, config) -> DynamicCache:
        cache = DynamicCache(config=config)
        for i, (k, v) in enumerate(self.kv):
            cache.update(k, v, i)
        return cache


def run_prefix(model, embeds: torch.Tensor) -> PrefixState:
    """Prefill (L, hidden) once; keep the per-layer keys/values."""
    logits, cache = model(embeds[None], use_cache=True)
    kv = [(layer.keys, layer.values) for layer in cache.layers]
    return PrefixState(kv=kv, length=embeds.shape[0], last_logits=logits[0, -1])


@dataclass
class PackedSequence:
    """Branch bookkeeping for tokens appended after the prefix (the cache grows by every step)."""

    prefix: PrefixState
    cache: DynamicCache
    parent: dict[int, int | None] = field(default_factory=dict)  # branch -> parent branch
    token_branch: list[int] = field(default_factory=list)  # branch of each token after the prefix

    @classmethod
    def start(cls, model, prefix: PrefixState) -> PackedSequence:
        return cls(prefix=prefix, cache=prefix.new_cache(model.llama_config))

    def add_branch(self, branch: int, parent: int | None = None) -> None:
        self.parent[branch] = parent

    def _visibility(self, query_branches: list[int], key_branches: list[int], device) -> torch.Tensor:
        """(n, m) bool: query token's branch is the key token's branch or one of its descendants."""
        index = {b: i for i, b in enumerate(self.parent)}
        anc = np.zeros((len(index), len(index)), dtype=bool)
        for b, i in index.items():
            a: int | None = b
            while a is not None:
                anc[i, index[a]] = True
                a = self.parent[a]
        q = np.fromiter((index[b] for b in query_branches), dtype=np.int64, count=len(query_branches))
        k = np.fromiter((index[b] for b in key_branches), dtype=np.int64, count=len(key_branches))
        return torch.from_numpy(anc[q][:, k]).to(device)

    def attention_mask(self, branches: list[int], dtype: torch.dtype, device) -> torch.Tensor:
        """The additive (n, prefix + old + n) mask for appending tokens of `branches`."""
        n = len(branches)
        old = len(self.token_branch)
        visible = self._visibility(list(branches), self.token_branch + list(branches), device)
        causal = torch.arange(old + n, device=device)[None, :] <= (old + torch.arange(n, device=device))[:, None]
        visible &= causal
        visible = torch.cat([torch.ones(n, self.prefix.length, dtype=torch.bool, device=device), visible], dim=1)
        mask = torch.zeros(visible.shape, dtype=dtype, device=device)
        return mask.masked_fill_(~visible, torch.finfo(dtype).min)

    def extend(
        self,
        model,
        embeds: torch.Tensor,
        branches: list[int],
        positions: list[int] | torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Append tokens (n, hidden) of the given branches at the given absolute positions -> logits (n, vocab).

        `mask` may be a precomputed `attention_mask(branches, ...)` (the engine caches it per layout).
        """
        if mask is None:
            mask = self.attention_mask(branches, embeds.dtype, embeds.device)
        pos = torch.as_tensor(positions, device=embeds.device)[None]
        logits, self.cache = model(embeds[None], attention_mask=mask[None, None], position_ids=pos,
                                   cache=self.cache, use_cache=True)
        self.token_branch = self.token_branch + list(branches)
        return logits[0]
