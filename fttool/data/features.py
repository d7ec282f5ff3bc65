"""What a row becomes for the objective that trains on it: its features.

An objective picks one of FEATURES (config/objectives.py); data/ builds whatever it is handed and never asks which
objective that is. A features object owns its columns, its length unit, what counts as trained (and so which rows
are dropped for having nothing to train), the tag that keeps its cache apart, how a batch of rows is encoded and the
collator that batches it:

- sequences: one masked sequence per row (supervised fine-tuning).
- pairs: a chosen and a rejected sequence per row, each masked exactly as SFT masks a reply (preference objectives:
  the reply and the token that closes its turn are scored). A pair is kept only when both are; truncation counts once.
- prompts: the conversation before the reply, rendered with the generation prompt, plus the row's reply as an
  optional reference (online objectives generate their own completions). Nothing is trained; a prompt is never cut.
- labeled: one masked sequence per row, as SFT masks it, with the row's label (1 = a desirable reply, 0 = not):
  unpaired feedback for KTO.

Light: no torch or datasets at module level.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from fttool.data.prompts import encode_prompts
from fttool.data.tokenize import COUNTERS, IGNORE

Side = Tuple[str, Optional[str]]  # (ids column, labels column or None)


@dataclass(frozen=True)
class Features:
    """One masked sequence per row."""

    name: str
    unit: str  # what one kept row is called in counts ("samples", "pairs", "prompts")
    sides: Tuple[Side, ...] = (("input_ids", "labels"),)  # the sequences a row becomes
    texts: Tuple[str, ...] = ()  # string columns carried along
    scalars: Tuple[str, ...] = ()  # integer columns carried along (a row's label)
    trains: bool = True  # a row needs a trained token to be kept
    about: str = ""
    names: Tuple[str, ...] = ("",)  # each side's name in `fttool preview`
    marked: str = "trained"  # what preview calls the tokens whose labels count

    @property
    def columns(self) -> Tuple[str, ...]:
        """The dataset columns its collator reads."""
        return tuple(c for side in self.sides for c in side if c) + self.texts + self.scalars

    def cache_tag(self) -> Dict[str, str]:
        """Its part of the data cache key (sequences have none, so existing caches stay valid)."""
        return {} if self.name == "sequences" else {"features": self.name}

    def encode(self, encoder, locs: Sequence[str], examples: Sequence[Dict], skip_bad: bool) -> Dict[str, list]:
        """Columns for a batch of normalised rows, with `error` ("" when fine) and the per-row counters."""
        return encoder.encode_batch(locs, examples, skip_bad=skip_bad)

    def collator(self, packing: str, tokenizer):
        from fttool.data import pack

        return pack.collator(packing, tokenizer)

    def drop_why(self, seqs: List[Tuple[list, Optional[list]]]) -> str:
        """Why a row whose sequences each passed the length policy is dropped anyway ("" = kept)."""
        return ""

    def schema(self):
        """The datasets.Features of a prepared split."""
        import datasets

        ints = datasets.Sequence(datasets.Value("int32"))
        out = {c: ints for side in self.sides for c in side if c}
        out.update({t: datasets.Value("string") for t in self.texts})
        out.update({t: datasets.Value("int32") for t in self.scalars})
        out.update(length=datasets.Value("int32"), loc=datasets.Value("string"))
        return datasets.Features(out)


@dataclass(frozen=True)
class Pairs(Features):
    """A chosen and a rejected sequence per row."""

    def encode(self, encoder, locs, examples, skip_bad):
        """The chosen sequences' columns plus the rejected side's; an error in either sequence is the pair's. One
        batched tokenizer call for both sides."""
        n = len(examples)
        rejected = [{**ex, "chosen": ex["rejected"]} for ex in examples]
        both = encoder.encode_batch(list(locs) * 2, list(examples) + rejected, skip_bad=skip_bad)
        out = {k: v[:n] for k, v in both.items()}
        for (ids, labels), (r_ids, r_labels) in zip(self.sides[:1], self.sides[1:]):
            out[r_ids], out[r_labels] = both[ids][n:], both[labels][n:]
        out["error"] = [a or b for a, b in zip(both["error"][:n], both["error"][n:])]
        for k in COUNTERS:
            out[k] = [a + b for a, b in zip(both[k][:n], both[k][n:])]
        return out

    def collator(self, packing: str, tokenizer):
        from fttool.data import pack

        return pack.PairCollator(pack.pad_id(tokenizer), self.sides)

    def drop_why(self, seqs):
        return NO_TRAINED_WHY["same"] if seqs[0][0] == seqs[1][0] else ""


@dataclass(frozen=True)
class Prompts(Features):
    """A prompt per row (and its reference reply); nothing trained."""

    def encode(self, encoder, locs, examples, skip_bad):
        return encode_prompts(encoder, locs, examples, skip_bad=skip_bad)

    def collator(self, packing: str, tokenizer):
        from fttool.data import pack

        return pack.PromptCollator(pack.pad_id(tokenizer))


@dataclass(frozen=True)
class Labeled(Features):
    """A masked sequence per row and the row's label."""

    def encode(self, encoder, locs, examples, skip_bad):
        out = encoder.encode_batch(locs, examples, skip_bad=skip_bad)
        out["label"] = [int(bool(ex.get("label"))) for ex in examples]
        return out

    def collator(self, packing: str, tokenizer):
        return None  # the Trainer's own (TRL's KTO collator builds its batches and KL pairs)


SEQUENCES = Features("sequences", "samples", about="one masked sequence per row")
LABELED = Labeled(
    "labeled", "samples", scalars=("label",), about="one masked sequence per row and its label (desirable or not)"
)
PAIRS = Pairs(
    "pairs",
    "pairs",
    sides=(("input_ids", "labels"), ("rejected_input_ids", "rejected_labels")),
    about="a chosen and a rejected sequence per row",
    names=(" chosen", " rejected"),
    marked="scored",
)
PROMPTS = Prompts(
    "prompts",
    "prompts",
    sides=(("input_ids", None),),
    texts=("prompt", "reference"),
    trains=False,
    about="the prompt before the reply (and the reply as a reference); nothing trained",
)
FEATURES: Dict[str, Features] = {f.name: f for f in (SEQUENCES, PAIRS, PROMPTS, LABELED)}

NO_TRAINED_WHY = {
    "same": "its chosen and rejected replies are the same tokens",
    "truncated": "its replies were cut off by data.max_length",
    "empty": "the template rendered its trained replies empty (e.g. reasoning stripped from an earlier turn)",
    "none": "it has no turn of data.train_roles to train",
}


def _any_trained(labels) -> bool:
    return any(x != IGNORE for x in labels)


def fate(ids: List[int], labels: Optional[List[int]], d, empty_replies: int = 0, trains: bool = True):
    """What the length policy does to one sequence: (ids, labels, truncated, why it is dropped or ""). A sequence
    without labels (a prompt) is never cut: one longer than data.max_length is dropped."""
    truncated = False
    if len(ids) > d.max_length:
        if labels is None:
            return ids, labels, False, f"longer than data.max_length={d.max_length} (a prompt is never cut)"
        if d.truncation == "drop":
            return ids, labels, False, f"longer than data.max_length={d.max_length} (data.truncation=drop)"
        had = _any_trained(labels)
        ids, labels, truncated = ids[: d.max_length], labels[: d.max_length], True
        if trains and had and not _any_trained(labels):
            return ids, labels, True, NO_TRAINED_WHY["truncated"]
    if trains and not _any_trained(labels):
        return ids, labels, truncated, NO_TRAINED_WHY["empty" if empty_replies else "none"]
    return ids, labels, truncated, ""


def trained_count(labels: Optional[List[int]]) -> int:
    return sum(1 for x in labels if x != IGNORE) if labels is not None else 0
