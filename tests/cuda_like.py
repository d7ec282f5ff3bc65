"""What CUDA's attention kernels do that the CPU's do not, emulated on the CPU.

On CUDA, `scaled_dot_product_attention` returns NaN for a query row whose mask admits no key at all (a left-padded
position attends to nothing), and the NaN then spreads through `0 * NaN` into every real token of the next layer.
The CPU kernels return finite numbers for such rows, so a CPU test never sees the bug. `cuda_like_sdpa` computes
attention the plain way (scores, mask, softmax, weighted sum) so that such a row gives NaN, exactly where CUDA does.
"""

from __future__ import annotations

import math

import pytest


def cuda_like_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """torch.nn.functional.scaled_dot_product_attention, computed the plain way: a fully masked query row is NaN."""
    import torch

    if enable_gqa and key.shape[-3] != query.shape[-3]:
        groups = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(groups, dim=-3), value.repeat_interleave(groups, dim=-3)
    L, S = query.shape[-2], key.shape[-2]
    scores = (query.float() @ key.float().transpose(-2, -1)) * (
        scale if scale is not None else 1 / math.sqrt(query.shape[-1])
    )
    allowed = torch.ones(L, S, dtype=torch.bool, device=query.device)
    if is_causal:
        allowed = allowed.tril()
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = allowed & attn_mask
        else:
            scores = scores + attn_mask.float()
            allowed = allowed & (attn_mask > float("-inf"))
    scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, dim=-1)  # a row of -inf only: exp(-inf - -inf) = NaN, as on CUDA
    if dropout_p > 0:
        weights = torch.nn.functional.dropout(weights, dropout_p)
    return (weights @ value.float()).to(query.dtype)


@pytest.fixture
def cuda_sdpa(monkeypatch):
    """Every attention call in the test behaves like CUDA's for fully masked rows."""
    import torch

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", cuda_like_sdpa)
    return cuda_like_sdpa
