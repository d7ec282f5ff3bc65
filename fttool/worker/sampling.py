"""Sampling whose randomness belongs to the completion, not to the process that generates it.

GRPO samples `num_generations` completions per prompt. With torch's global generator, a completion depends on which
process drew it and how many draws that process made before, so 2 processes sample other completions than 1
process at the same global batch and seed. Here every completion has its own generator, seeded from
(run seed, optimizer step, the prompt's ids, which of that prompt's completions it is in the global batch): the same
completions are sampled on any number of processes, and a resumed run samples what the uninterrupted one did.

`SeededRows` is a transformers LogitsProcessor. transformers runs user processors before its temperature / top-k /
top-p / min-p warpers, so it applies the same warpers itself (transformers' own classes, the run's settings), draws
each row's token with that row's generator, and leaves only the drawn token possible; generate's own sampling then
has one choice, and its warpers change nothing. Each row's uniform numbers are drawn once per generate call (one
per new token), and a token is picked by inverse CDF over the warped distribution: a few vectorized operations per
token however many rows there are.
"""

from __future__ import annotations

import hashlib
from typing import List, Sequence

import torch
from transformers import LogitsProcessor
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


def row_seeds(seed: int, step: int, global_rows: Sequence[Sequence[int]], first: int, count: int) -> List[int]:
    """One seed per local row: `global_rows` are the prompts of the whole batch in process order (every process's
    rows gathered), the local rows are global_rows[first:first + count]. A prompt's k-th occurrence in the global
    batch gets the same seed whichever process holds it."""
    seen: dict = {}
    seeds = []
    for i, ids in enumerate(global_rows[: first + count]):
        key = tuple(int(t) for t in ids)
        k = seen.get(key, 0)
        seen[key] = k + 1
        if i >= first:
            text = f"{seed}|{step}|{k}|{','.join(map(str, key))}".encode()
            seeds.append(int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & (2**63 - 1))
    return seeds


class SeededRows(LogitsProcessor):
    """Draws row i's next token with generator i (see the module docstring)."""

    def __init__(
        self, seeds: Sequence[int], device, max_new_tokens: int, temperature=1.0, top_k=None, top_p=None, min_p=None
    ):
        self.uniform = torch.stack(
            [torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(s), dtype=torch.float64) for s in seeds]
        ).to(device)
        self.position = 0
        self.warpers = []
        if temperature is not None and temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(temperature))
        if top_k:
            self.warpers.append(TopKLogitsWarper(top_k=top_k))
        if top_p is not None and top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p=top_p))
        if min_p is not None:
            self.warpers.append(MinPLogitsWarper(min_p=min_p))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows, steps = self.uniform.shape
        if scores.size(0) != rows or self.position >= steps:
            raise RuntimeError(f"SeededRows: row {scores.size(0)} / token {self.position + 1} has no random number")
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        cdf = torch.softmax(scores.double(), dim=-1).cumsum(-1)
        u = self.uniform[:, self.position : self.position + 1] * cdf[:, -1:]
        self.position += 1
        # the first token whose cumulative mass exceeds u: never one of zero mass (filtered by top-k / top-p)
        drawn = torch.searchsorted(cdf, u, right=True).clamp(max=scores.size(-1) - 1)[:, 0]
        only = torch.full_like(scores, float("-inf"))
        only.scatter_(1, drawn[:, None], 0.0)
        return only
