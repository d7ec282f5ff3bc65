"""`fttool preview output=FILE.jsonl`: the mask of every source row, machine-readable."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Optional

from fttool.data.features import fate
from fttool.data.formats import Formatter
from fttool.data.pipeline import sources_of, training_template
from fttool.data.sources import read_rows
from fttool.data.tokenize import COUNTERS, Encoder
from fttool.errors import UserError


def mask_dump(spec, tokenizer, path: str, limit: Optional[int] = None) -> Dict[str, int]:
    """`fttool preview output=FILE.jsonl`: one JSON object per row of the sources, in file order (no split, weights,
    dedup or packing): {"loc", "input_ids", "labels"} with labels -100 where nothing is trained, aligned with
    input_ids as Hugging Face models take them, after data.max_length ("truncated": true); a sample training would
    drop also has "dropped": why; a refused row is {"loc", "error"}. Written to a temporary file renamed into place."""
    d = spec.data
    template = training_template(spec, tokenizer)
    encoder = Encoder(tokenizer, template, d)
    counts = {"samples": 0, "errors": 0, "dropped": 0, "truncated": 0}
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for batch in _dump_batches(spec, limit):
                for rec in _dump_records(encoder, batch, d):
                    counts["errors" if "error" in rec else "samples"] += 1
                    counts["dropped"] += "dropped" in rec
                    counts["truncated"] += bool(rec.get("truncated"))
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return counts


def _dump_batches(spec, limit: Optional[int], size: int = 256):
    """[(loc, example or the UserError that refused the row)] in batches, over every source row in file order."""
    d, batch, n = spec.data, [], 0
    for s in sources_of(d):
        fmt = Formatter(s.format, s.columns, d.roles, d.system_prompt)
        for loc, rec in read_rows(s.path, s.split, s.key):
            if limit is not None and n >= limit:
                break
            try:
                batch.append((loc, fmt(loc, rec)))
            except UserError as e:
                batch.append((loc, e))
            n += 1
            if len(batch) >= size:
                yield batch
                batch = []
    if batch:
        yield batch


def _dump_records(encoder: Encoder, batch, d):
    good = [(loc, ex) for loc, ex in batch if not isinstance(ex, UserError)]
    enc = encoder.encode_batch([loc for loc, _ in good], [ex for _, ex in good], skip_bad=True) if good else None
    done = {}
    for k, (loc, _) in enumerate(good):
        if enc["error"][k]:
            done[loc] = {"loc": loc, "error": enc["error"][k]}
            continue
        counters = {c: enc[c][k] for c in COUNTERS}
        ids, labels, truncated, why = fate(enc["input_ids"][k], enc["labels"][k], d, counters["empty_replies"])
        rec = {"loc": loc, "input_ids": ids, "labels": labels}
        if truncated:
            rec["truncated"] = True
        if why:
            rec["dropped"] = why
        done[loc] = rec
    for loc, ex in batch:
        yield {"loc": loc, "error": str(ex)} if isinstance(ex, UserError) else done[loc]
