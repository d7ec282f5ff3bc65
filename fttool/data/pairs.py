"""Preference pairs as features for a preference objective (DPO, ORPO): each row becomes a chosen and a rejected
sequence, both rendered with the training template and masked exactly as SFT masks a reply (the reply and the token
that closes its turn are scored; the prompt and anything the template adds after the turn are not). The length
policy applies to each sequence; a pair is kept only when both are, and truncation is counted per pair."""

from __future__ import annotations

from typing import Dict, Sequence

from fttool.data.tokenize import Encoder

REJECTED = ("rejected_input_ids", "rejected_labels")


def encode_pairs(encoder: Encoder, locs: Sequence[str], examples: Sequence[Dict], skip_bad: bool) -> Dict[str, list]:
    """encode_batch's columns for the chosen sequences, plus rejected_input_ids / rejected_labels; an error in
    either sequence is the pair's. One batched tokenizer call for both sides."""
    n = len(examples)
    rejected = [{**ex, "chosen": ex["rejected"]} for ex in examples]
    both = encoder.encode_batch(list(locs) * 2, list(examples) + rejected, skip_bad=skip_bad)
    out = {k: v[:n] for k, v in both.items()}
    out["rejected_input_ids"] = both["input_ids"][n:]
    out["rejected_labels"] = both["labels"][n:]
    out["error"] = [a or b for a, b in zip(both["error"][:n], both["error"][n:])]
    for k in ("eos_appended", "tools_in_system", "literal_markers", "empty_replies"):
        out[k] = [a + b for a, b in zip(both[k][:n], both[k][n:])]
    return out
