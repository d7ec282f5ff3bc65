"""Attention masks without fully masked rows, for batched generation.

Batched generation pads prompts on the left (a decoder continues each prompt from its last token). The pad
positions of such a batch are queries that may attend to no key at all: in transformers' SDPA mask their rows are
all False. CUDA's SDPA kernels return NaN for such a row (the CPU's return finite numbers), the NaN becomes the
pad positions' hidden states, and in the next layer it reaches every real token through `0 * NaN` — replies
change with the batch's composition (pytorch/pytorch#103749). transformers 5 no longer repairs these rows.

`no_fully_masked_rows()` repairs them the way transformers 4 did: a row that admits no key admits every key.
Only pad positions have such rows, and no real token attends to a pad position, so the replies are exactly
those of one prompt at a time; the mask of every other row is untouched. It wraps transformers' own SDPA mask
function through its public registry (AttentionMaskInterface) for the duration of the block, so it applies to
every architecture and to sliding-window layers alike.
"""

from __future__ import annotations

from contextlib import contextmanager


def admit_some_key(mask):
    """A boolean attention mask (True = attend) whose rows with no True become all True."""
    if mask is None or mask.dtype.is_floating_point or mask.dim() < 2:
        return mask
    return mask | ~mask.any(dim=-1, keepdim=True)


@contextmanager
def no_fully_masked_rows():
    """Within the block, SDPA masks built by transformers never hold a row that attends to nothing."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    original = ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]

    def sdpa_mask(*args, **kwargs):
        return admit_some_key(original(*args, **kwargs))

    AttentionMaskInterface.register("sdpa", sdpa_mask)
    try:
        yield
    finally:
        AttentionMaskInterface.register("sdpa", original)
