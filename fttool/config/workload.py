"""How many tokens a run computes on, from a sample of its rows, and how fast this CPU multiplies: the inputs of the
plan's time estimate. Light: reads rows with fttool's own readers, counts tokens with the `tokenizers` library on the
model's tokenizer.json (no transformers), times numpy's matmul for the CPU."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

SAMPLE_ROWS = 512
PER_MESSAGE = 5  # template tokens around each message (role markers, end of turn): typical of chat templates
CHARS_PER_TOKEN = 4.0  # without a tokenizer.json: English text in BPE vocabularies


@dataclass
class Workload:
    rows: Optional[int]  # training rows per epoch (None: unknown, a hub dataset)
    mean_tokens: float  # per sample (a pair: both sequences), capped at max_length
    padded_tokens: float  # per sample as computed: padding to the longest of a micro-batch, or packed
    how: str  # where the figures come from

    def tokens_per_epoch(self) -> Optional[int]:
        return None if self.rows is None else int(self.rows * self.mean_tokens)


def _tokenizer(name_or_path: str, revision: Optional[str]):
    """A `tokenizers.Tokenizer` from the model's tokenizer.json (local or in the hub cache), or None."""
    from fttool import assets

    local = Path(assets.resolve(name_or_path)).expanduser()
    f: Optional[Path] = local / "tokenizer.json" if local.is_dir() else None
    if f is None:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name_or_path, "tokenizer.json", revision=revision)
            f = Path(cached) if isinstance(cached, str) else None
        except Exception:  # noqa: BLE001 - a malformed id: no tokenizer, the estimate says so
            f = None
    if f is None or not f.is_file():
        return None
    try:
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(f))
    except Exception:  # noqa: BLE001 - an unreadable tokenizer.json: counted by characters instead
        return None


def _sequences(example) -> List[List[str]]:
    """The texts of each sequence a normalised example becomes (a preference pair: two)."""
    if example["kind"] == "segments":
        return [[t for t, _ in example["segments"]]]
    prompt = [m["content"] for m in example["messages"] if isinstance(m.get("content"), str)]
    if example["kind"] == "preference":
        return [prompt + [example["chosen"]], prompt + [example["rejected"]]]
    return [prompt]


def sample(spec, limit: int = SAMPLE_ROWS) -> Optional[Workload]:
    """Token statistics from up to `limit` rows of each local source; None when no source is local."""
    from fttool.config.plan import local_rows
    from fttool.data import sources_of
    from fttool.data.formats import Formatter
    from fttool.data.sources import _read_file, is_local, local_files
    from fttool.errors import UserError

    d = spec.data
    tok = _tokenizer(spec.model.name_or_path, spec.model.revision)
    lengths: List[int] = []
    rows_total: Optional[int] = 0
    for s in sources_of(d):
        if not is_local(s.path):
            rows_total = None
            continue
        n = local_rows(s.path)
        rows_total = None if n is None or rows_total is None else rows_total + round(n * s.weight)
        try:
            fmt = Formatter(s.format, s.columns, d.roles, d.system_prompt)
            files = local_files(s.path)
        except UserError:
            continue
        taken = 0
        for p in files:
            if taken >= limit:
                break
            try:
                for loc, rec in _read_file(p):
                    try:
                        seqs = _sequences(fmt(loc, rec))
                    except UserError:
                        continue
                    for texts in seqs:
                        body = (
                            sum(len(t.ids) for t in tok.encode_batch(texts))
                            if tok
                            else sum(round(len(t) / CHARS_PER_TOKEN) for t in texts)
                        )
                        n_tok = body + PER_MESSAGE * len(texts) + 1
                        lengths.append(min(n_tok, d.max_length) if d.truncation == "truncate" else n_tok)
                    taken += 1
                    if taken >= limit:
                        break
            except UserError:
                continue
    if not lengths:
        return None
    pair = 2 if spec.objective.name != "sft" else 1
    kept = [n for n in lengths if n <= d.max_length] or lengths
    per_seq = sum(kept) / len(kept)
    padded = _padded(kept, spec.train.batch_size * pair, d.packing, d.max_length, spec.seed)
    if rows_total is not None:
        rows_total = round(rows_total * (1 - d.val_ratio - d.test_ratio))
        if d.max_samples:
            rows_total = min(rows_total, d.max_samples)
    counted = "tokenizer.json" if tok else f"~{CHARS_PER_TOKEN:g} characters per token (no tokenizer.json here)"
    return Workload(rows_total, per_seq * pair, padded * pair, f"a sample of {len(lengths):,} sequences, {counted}")


def _padded(lengths: List[int], batch: int, packing: str, max_length: int, seed: int) -> float:
    """Tokens computed per sequence: padded batches compute the longest of each micro-batch for every row; packing
    computes the tokens themselves (bins: rows of max_length, the last partly filled)."""
    if packing != "none" or batch <= 1:
        return sum(lengths) / len(lengths)
    rng = random.Random(seed)
    order = list(lengths)
    rng.shuffle(order)
    batches = [order[i : i + batch] for i in range(0, len(order), batch)]
    return sum(max(b) * len(b) for b in batches) / len(order)


def cpu_gflops(seconds: float = 0.1, tries: int = 3) -> float:
    """This CPU's fp32 matmul rate, GFLOP/s: the best of `tries` bursts of 1024 x 1024 products (numpy), so that a
    moment of load elsewhere on the machine does not count."""
    import time

    import numpy as np

    a = np.random.rand(1024, 1024).astype(np.float32)
    b = np.random.rand(1024, 1024).astype(np.float32)
    a @ b
    best = 0.0
    for _ in range(tries):
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            n += 1
        best = max(best, 2 * 1024**3 * n / (time.perf_counter() - start) / 1e9)
    return best
