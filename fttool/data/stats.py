"""What preprocessing did to the data, in numbers: every dropped, truncated, skipped or changed sample is counted."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Sequence


@dataclass
class DataStats:
    rows: int = 0  # rows read from every source
    bad_rows_skipped: int = 0  # malformed rows skipped (data.skip_bad_rows=true)
    bad_row_examples: List[str] = field(default_factory=list)  # the first few skipped rows and why
    duplicates_removed: int = 0  # exact duplicates dropped (data.dedup=true)
    validation: int = 0  # rows held out for validation
    test: int = 0  # rows held out as the test split
    per_source: Dict[str, int] = field(default_factory=dict)  # training rows taken from each source after weights
    samples: int = 0  # training samples (preference objectives: pairs) kept
    unit: str = "samples"  # what a sample is: "samples", or "pairs" (a chosen and a rejected sequence) for dpo/orpo
    tokens: int = 0  # their tokens
    trained_tokens: int = 0  # their tokens with a label
    truncated: int = 0  # samples cut to data.max_length
    dropped_too_long: int = 0  # samples over data.max_length dropped (truncation=drop)
    dropped_no_trained_tokens: int = 0  # samples left with nothing to train (e.g. the reply was truncated away)
    no_trained_why: Dict[str, int] = field(default_factory=dict)  # why those samples had nothing to train -> count
    eos_appended: int = 0  # replies the template closed without a special token, closed with EOS by fttool
    tools_in_system: int = 0  # conversations whose tool schemas were written into the system message
    literal_markers: int = 0  # special-token text inside messages, kept as plain text (never the special token)
    empty_replies: int = 0  # trained replies the template rendered empty (reasoning stripped), not trained
    max_length: int = 0
    histogram: List[List[int]] = field(default_factory=list)  # [low, high, count] of sample lengths

    def dropped(self) -> int:
        return self.dropped_too_long + self.dropped_no_trained_tokens

    def summary(self) -> str:
        frac = self.trained_tokens / self.tokens if self.tokens else 0.0
        parts = [
            f"{self.samples:,} {self.unit} from {self.rows:,} rows, {self.tokens:,} tokens ({100 * frac:.1f}% trained)",
            f"truncated {self.truncated}",
            f"dropped {self.dropped_too_long} over max_length {self.max_length}",
            f"dropped {self.dropped_no_trained_tokens} with no trained tokens{self._why()}",
        ]
        if self.bad_rows_skipped:
            parts.append(f"skipped {self.bad_rows_skipped} bad rows")
        if self.duplicates_removed:
            parts.append(f"removed {self.duplicates_removed} duplicates")
        if self.validation or self.test:
            parts.append(f"held out {self.validation} validation / {self.test} test")
        if self.eos_appended:
            parts.append(
                f"EOS appended to {self.eos_appended} replies (the template closes them with no special token)"
            )
        if self.literal_markers:
            parts.append(f"{self.literal_markers} special-token texts inside messages kept as plain text")
        if self.empty_replies:
            parts.append(f"{self.empty_replies} replies rendered empty by the template not trained")
        if self.tools_in_system:
            parts.append(
                f"tool schemas put in the system message of {self.tools_in_system} rows (the template has no tools slot)"
            )
        return "; ".join(parts)

    def _why(self) -> str:
        return f" ({'; '.join(f'{n}: {why}' for why, n in self.no_trained_why.items())})" if self.no_trained_why else ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DataStats":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


def histogram(lengths: Sequence[int], max_length: int, buckets: int = 8) -> List[List[int]]:
    """[low, high, count] for equal-width buckets from the shortest to the longest sample."""
    if not lengths:
        return []
    lo, hi = min(lengths), min(max_length, max(lengths))
    width = max(1, -(-(hi - lo + 1) // buckets))
    n = -(-(hi - lo + 1) // width)
    counts = [0] * n
    for x in lengths:
        counts[min(n - 1, (x - lo) // width)] += 1
    return [[lo + i * width, min(hi, lo + (i + 1) * width - 1), c] for i, c in enumerate(counts)]


def histogram_lines(hist: List[List[int]], width: int = 40) -> List[str]:
    top = max((c for *_, c in hist), default=0) or 1
    return [f"  {lo:>6}-{hi:<6} {'#' * round(width * c / top):<{width}} {c:,}" for lo, hi, c in hist]
