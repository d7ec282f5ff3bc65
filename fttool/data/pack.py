"""Batches: padded, padding-free (samples concatenated into one row, positions restart per sample), or bins
(samples packed into rows of exactly max_length tokens, first-fit decreasing).

Packed rows carry position_ids that restart at every sample; with no attention mask, transformers derives a
block-diagonal causal mask from them, so samples never attend to each other. That holds only while the KV
cache is off (measured with it on: packed samples silently attend across boundaries, the loss off by 3.6e-3), which
`guard_kv_cache` enforces on every training forward.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

from fttool.data.tokenize import IGNORE


def bins_of(lengths: Sequence[int], capacity: int) -> List[List[int]]:
    """Sample indices grouped into bins of at most `capacity` tokens (first-fit decreasing on a capacity index)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: List[List[int]] = []
    free: Dict[int, List[int]] = {}  # remaining capacity -> bins with exactly that much room
    for i in order:
        n = lengths[i]
        room = next((r for r in range(n, capacity + 1) if free.get(r)), None)
        if room is None:
            bins.append([i])
            b, left = len(bins) - 1, capacity - n
        else:
            b = free[room].pop()
            bins[b].append(i)
            left = room - n
        free.setdefault(left, []).append(b)
    return bins


def pack_bins(
    input_ids: Sequence[List[int]], labels: Sequence[List[int]], capacity: int, pad_id: int
) -> Dict[str, list]:
    """Rows of exactly `capacity` tokens; padding at the end of a row is its own untrained sequence."""
    out: Dict[str, list] = {"input_ids": [], "labels": [], "position_ids": []}
    for b in bins_of([len(x) for x in input_ids], capacity):
        ids, lab, pos = [], [], []
        for i in b:
            ids += input_ids[i]
            lab += [IGNORE] + list(labels[i][1:])  # nothing predicts a sample's first token from the previous sample
            pos += range(len(input_ids[i]))
        pad = capacity - len(ids)
        out["input_ids"].append(ids + [pad_id] * pad)
        out["labels"].append(lab + [IGNORE] * pad)
        out["position_ids"].append(pos + list(range(pad)))
    return out


class BinCollator:
    """Stacks bins (all exactly max_length long) into a batch; no attention mask, positions carry the boundaries."""

    def __call__(self, features):
        import torch

        return {
            k: torch.tensor([f[k] for f in features], dtype=torch.long) for k in ("input_ids", "labels", "position_ids")
        }


class RightPadCollator:
    """Padded batches, always padded on the right, whatever the tokenizer's `padding_side` says.

    Left padding puts pad positions before a sample's first token: their query rows then attend to no key at all,
    and CUDA's SDPA kernels return NaN for such rows (the CPU's do not), which spreads into the loss through
    `0 * NaN`. Padded on the right, every pad position still sees the sample's real tokens. The tokenizer itself is
    left as its authors set it (it is saved with the run for inference, where left padding is right)."""

    def __init__(self, pad_id: int, multiple: int = 8):
        self.pad_id, self.multiple = pad_id, multiple

    def __call__(self, features):
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        width = -(-longest // self.multiple) * self.multiple
        ids, labels, mask = [], [], []
        for f in features:
            n, pad = len(f["input_ids"]), width - len(f["input_ids"])
            ids.append(list(f["input_ids"]) + [self.pad_id] * pad)
            labels.append(list(f["labels"]) + [IGNORE] * pad)
            mask.append([1] * n + [0] * pad)
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "attention_mask": torch.tensor(mask, dtype=torch.long),
        }


class PairCollator:
    """Preference pairs as one batch: the chosen sequences, then the rejected ones (the layout TRL's DPOTrainer
    reads), right-padded together. `completion_mask` marks the scored tokens, exactly the tokens fttool's masking
    trains (each reply and the token closing its turn); precomputed reference log-probs ride along. `sides`: the
    (ids, labels) columns of the chosen and the rejected sequence (features.PAIRS)."""

    def __init__(self, pad_id: int, sides, multiple: int = 8):
        self.pad = RightPadCollator(pad_id, multiple)
        self.sides = sides

    def __call__(self, features):
        import torch

        rows = [{"input_ids": f[ids], "labels": f[labels]} for ids, labels in self.sides for f in features]
        batch = self.pad(rows)
        labels = batch.pop("labels")
        batch["completion_mask"] = (labels != IGNORE).long()
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in features[0]:
                batch[key] = torch.tensor([f[key] for f in features])
        return batch


class PromptCollator:
    """Prompts for generation, left-padded (a batch's completions then start at one position), with their attention
    mask; the prompt texts and references ride along as lists."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features):
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        ids = [[self.pad_id] * (longest - len(f["input_ids"])) + list(f["input_ids"]) for f in features]
        mask = [[0] * (longest - len(f["input_ids"])) + [1] * len(f["input_ids"]) for f in features]
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "attention_mask": torch.tensor(mask, dtype=torch.long),
            "prompt": [f["prompt"] for f in features],
            "reference": [f["reference"] for f in features],
        }


def pad_id(tokenizer) -> int:
    """The id padding is written with: the tokenizer's pad token, else its EOS (padding is never attended or trained)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def collator(packing: str, tokenizer):
    if packing == "padding_free":
        from transformers import DataCollatorWithFlattening

        return DataCollatorWithFlattening(separator_id=IGNORE)
    if packing == "bins":
        return BinCollator()
    return RightPadCollator(pad_id(tokenizer))


def guard_kv_cache(model) -> None:
    """Turn the KV cache off and keep it off for every forward in training mode (packed batches need it off)."""
    model.config.use_cache = False

    def hook(module, args, kwargs):
        if module.training:
            kwargs["use_cache"] = False
        return args, kwargs

    model.register_forward_pre_hook(hook, with_kwargs=True)


def padding_efficiency(lengths: Sequence[int], batch_size: int, multiple: int = 8) -> float:
    """Real tokens / tokens computed for padded batches of `batch_size` in data order (padded to a multiple of 8)."""
    real = computed = 0
    for i in range(0, len(lengths), batch_size):
        chunk = lengths[i : i + batch_size]
        longest = -(-max(chunk) // multiple) * multiple
        real += sum(chunk)
        computed += longest * len(chunk)
    return real / computed if computed else 1.0


def bin_efficiency(lengths: Sequence[int], capacity: int) -> float:
    n = len(bins_of(lengths, capacity))
    return sum(lengths) / (n * capacity) if n else 1.0
