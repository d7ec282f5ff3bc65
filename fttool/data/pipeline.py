"""The data pipeline: read rows -> normalise their format -> split -> weight -> encode them as the objective's
features (data/features.py: render with the chat template, tokenize and mask) -> apply the length policy -> cache.
Every count along the way ends up in DataStats.

`prepare_datasets(spec, tokenizer, features)` returns a `Prepared`: the encoded training (and validation) datasets,
the stats, and the cache folder they live in.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from fttool.data import cache, templates
from fttool.data.features import Features, fate, trained_count
from fttool.data.formats import TEMPLATED, Formatter
from fttool.data.sources import fingerprint, read_rows
from fttool.data.stats import DataStats, histogram
from fttool.data.tokenize import COUNTERS, Encoder, auto_num_proc
from fttool.errors import UserError

log = logging.getLogger("fttool")
BAD_ROW_EXAMPLES = 5


@dataclass
class Source:
    path: str
    format: str
    split: str
    columns: Dict[str, str]
    weight: float
    key: str  # the config key that names it, for messages


@dataclass
class Prepared:
    train: object  # datasets.Dataset with input_ids, labels, length
    validation: Optional[object]
    stats: DataStats
    cache_dir: Path
    from_cache: bool
    seconds: float
    key: Dict  # the cache key's parts: source content hashes, tokenizer and template hashes, data fields

    def record(self) -> Dict:
        """What the run folder keeps about its data (data.json): fingerprints and counts."""
        return {
            "cache_dir": str(self.cache_dir),
            "from_cache": self.from_cache,
            "key": self.key,
            "stats": self.stats.to_dict(),
        }


def sources_of(d) -> List[Source]:
    if d.mix:
        return [
            Source(
                m.path,
                m.format or d.format,
                m.split or d.split,
                dict(m.columns or d.columns),
                m.weight,
                f"data.mix[{i}]",
            )
            for i, m in enumerate(d.mix)
        ]
    return [Source(d.path, d.format, d.split, dict(d.columns), 1.0, "data.path")]


def training_template(spec, tokenizer) -> Optional[str]:
    """The template the run trains with; set on the tokenizer so the saved tokenizer carries it."""
    d = spec.data
    template = templates.resolve(d.template)
    if template is not None:
        templates.check_change(tokenizer, template, d.allow_template_change, d.template)
        tokenizer.chat_template = template
    needs = any(s.format in TEMPLATED for s in sources_of(d))
    if needs and not tokenizer.chat_template:
        raise UserError(
            f"the tokenizer of {spec.model.name_or_path} has no chat template, which data.format={d.format} needs; "
            f"set data.template to one of {', '.join(templates.NAMED)} (or a .jinja file), "
            "or use data.format=completion."
        )
    return tokenizer.chat_template


def prepare_datasets(spec, tokenizer, features: Features, use_cache: bool = True) -> Prepared:
    """The training (and validation) rows encoded as `features` (the objective's), from the cache when it holds them."""
    t0 = time.perf_counter()
    d = spec.data
    template = training_template(spec, tokenizer)
    srcs = sources_of(d)
    extra = [(k, p) for k, p in (("data.val_path", d.val_path), ("data.test_path", d.test_path)) if p]
    parts = cache.key(
        d,
        spec.seed,
        tokenizer,
        template,
        [[fingerprint(s.path, s.split, s.key), s.format, s.split, s.columns, s.weight] for s in srcs]
        + [[k, fingerprint(p, "train", k)] for k, p in extra],
        tag=features.cache_tag(),
    )
    where = cache.folder(d, parts)
    paths = [s.path for s in srcs] + [p for _, p in extra]
    if use_cache and cache.is_complete(where):
        splits, stats = cache.read(where)
        splits = cache.relabel(splits, where, paths)
        return Prepared(
            splits["train"],
            splits["validation"],
            DataStats.from_dict({**stats, "unit": features.unit}),
            where,
            True,
            time.perf_counter() - t0,
            parts,
        )
    train_rows, val_rows, _, stats = rows_of(spec, srcs, needs_reply=features.trains)
    encoder = Encoder(tokenizer, template, d)  # only when tokenizing: a cache hit needs none
    stats.unit = features.unit
    train_ds = _encode(encoder, features, train_rows, d, stats, count=True)
    val_ds = _encode(encoder, features, val_rows, d, DataStats(), count=False) if val_rows else None
    if use_cache:
        cache.write(where, parts, {"train": train_ds, "validation": val_ds}, stats.to_dict(), paths)
    return Prepared(train_ds, val_ds, stats, where, False, time.perf_counter() - t0, parts)


# -- rows -------------------------------------------------------------------------------------------------
Rows = List[Tuple[str, Dict]]


def _format_rows(rows, fmt: Formatter, d, stats: DataStats) -> Rows:
    out = []
    for loc, rec in rows:
        try:
            out.append((loc, fmt(loc, rec)))
        except UserError as e:
            _bad_row(d, stats, e)
    return out


def _bad_row(d, stats: DataStats, e: UserError) -> None:
    if not d.skip_bad_rows:
        raise e
    stats.bad_rows_skipped += 1
    if len(stats.bad_row_examples) < BAD_ROW_EXAMPLES:
        stats.bad_row_examples.append(str(e))


def read_source(path: str, source: Source, d, stats: DataStats, key: str, needs_reply: bool = True) -> Rows:
    rows = read_rows(path, source.split, key)
    stats.rows += len(rows)
    return _format_rows(rows, Formatter(source.format, source.columns, d.roles, d.system_prompt, needs_reply), d, stats)


def rows_of(spec, srcs: List[Source], needs_reply: bool = True):
    """(train, validation, test rows, stats): read, deduplicated, split and weighted with the run's seed. `needs_reply`
    False (prompt features) also takes rows with no reply; the split is the same either way for the same rows."""
    d = spec.data
    stats = DataStats(max_length=d.max_length)
    rng = random.Random(spec.seed)
    seen: set = set()
    train, val, test = [], [], []
    for s in srcs:
        rows = read_source(s.path, s, d, stats, s.key, needs_reply)
        if d.dedup:
            rows = _dedup(rows, seen, stats)
        rng.shuffle(rows) if (d.val_ratio or d.test_ratio) else None
        n_val = round(len(rows) * d.val_ratio) if not d.val_path else 0
        n_test = round(len(rows) * d.test_ratio) if not d.test_path else 0
        val += rows[:n_val]
        test += rows[n_val : n_val + n_test]
        taken = _weighted(rows[n_val + n_test :], s.weight, rng)
        stats.per_source[s.path] = len(taken)
        train += taken
    first = srcs[0]
    for key, path, bucket in (("data.val_path", d.val_path, val), ("data.test_path", d.test_path, test)):
        if path:
            bucket += read_source(path, first, d, DataStats(), key, needs_reply)
    if len(srcs) > 1:
        rng.shuffle(train)  # a mixture is interleaved; one source keeps its file order (the Trainer shuffles anyway)
    if d.max_samples:
        train = train[: d.max_samples]
    if not train:
        raise UserError(
            f"{first.key}={first.path}: no rows left to train on ({stats.rows} read, {stats.bad_rows_skipped} bad, "
            f"{len(val)} validation, {len(test)} test)."
        )
    stats.validation, stats.test = len(val), len(test)
    return train, val, test, stats


def _dedup(rows: Rows, seen: set, stats: DataStats) -> Rows:
    out = []
    for loc, ex in rows:
        k = json.dumps(ex, sort_keys=True, ensure_ascii=False)
        if k in seen:
            stats.duplicates_removed += 1
            continue
        seen.add(k)
        out.append((loc, ex))
    return out


def _weighted(rows: Rows, weight: float, rng: random.Random) -> Rows:
    """weight x rows: whole copies for the integer part, a seeded sample for the fraction."""
    whole, frac = int(weight), weight - int(weight)
    return rows * whole + rng.sample(rows, round(len(rows) * frac))


# -- features ---------------------------------------------------------------------------------------------
def _encode_fn(encoder: Encoder, features: Features, skip: bool) -> Callable:
    def fn(batch):
        if multiprocessing.current_process().name != "MainProcess":
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle (no traceback per worker)
        examples = [json.loads(x) for x in batch["example"]]
        return features.encode(encoder, batch["loc"], examples, skip)

    return fn


def _encode(encoder: Encoder, features: Features, rows: Rows, d, stats: DataStats, count: bool):
    import datasets

    datasets.disable_progress_bars()
    raw = datasets.Dataset.from_dict({"loc": [loc for loc, _ in rows], "example": [json.dumps(ex) for _, ex in rows]})
    nproc = auto_num_proc(len(rows), d.num_proc)
    enc = raw.map(
        _encode_fn(encoder, features, d.skip_bad_rows),
        batched=True,
        batch_size=256,
        remove_columns=["example"],
        num_proc=nproc if nproc > 1 else None,
        load_from_cache_file=False,
        desc=None,
    )
    return _length_policy(enc, features, d, stats, count)


def _length_policy(enc, features: Features, d, stats: DataStats, count: bool):
    """data.max_length and data.truncation on every sequence of every row (a row is kept only when all its sequences
    are; truncation counts once per row), counted in stats."""
    import datasets

    cols = {c: enc[c] for c in ("loc", "error", *COUNTERS, *features.columns)}
    keep: Dict[str, list] = {c: [] for c in (*features.columns, "length", "loc")}
    lengths = []
    for k, loc in enumerate(cols["loc"]):
        if cols["error"][k]:
            stats.bad_rows_skipped += 1
            if len(stats.bad_row_examples) < BAD_ROW_EXAMPLES:
                stats.bad_row_examples.append(cols["error"][k])
            continue
        for c in COUNTERS:
            setattr(stats, c, getattr(stats, c) + cols[c][k])
        seqs, truncated, why = [], False, ""
        for ids_col, labels_col in features.sides:
            labels = cols[labels_col][k] if labels_col else None
            ids, labels, cut, side_why = fate(cols[ids_col][k], labels, d, cols["empty_replies"][k], features.trains)
            seqs.append((ids, labels))
            truncated, why = truncated or cut, why or side_why
        why = why or features.drop_why(seqs)
        stats.truncated += truncated
        if why:
            if why.startswith("longer than"):
                stats.dropped_too_long += 1
            else:
                stats.dropped_no_trained_tokens += 1
                stats.no_trained_why[why] = stats.no_trained_why.get(why, 0) + 1
            continue
        for (ids_col, labels_col), (ids, labels) in zip(features.sides, seqs):
            keep[ids_col].append(ids)
            if labels_col:
                keep[labels_col].append(labels)
            stats.tokens += len(ids)
            stats.trained_tokens += trained_count(labels)
        for t in features.texts + features.scalars:
            keep[t].append(cols[t][k])
        length = max(len(ids) for ids, _ in seqs)
        keep["length"].append(length)
        keep["loc"].append(loc)
        lengths.append(length)
        stats.samples += 1
    if count:
        stats.histogram = histogram(lengths, d.max_length)
        if not stats.samples:
            raise UserError(
                f"data: every sample was dropped ({stats.summary()}); raise data.max_length or fix the data."
            )
    return datasets.Dataset.from_dict(keep, features=features.schema())


def drift(old: Dict, new: Dict, spec) -> List[str]:
    """What differs in the data between a run and its resumption (their cache keys): a source file's content, the
    tokenizer, the template, fttool's tokenization. Empty when nothing does."""
    d = spec.data
    names = [f"{s.key}={s.path}" for s in sources_of(d)]
    names += [f"{k}={p}" for k, p in (("data.val_path", d.val_path), ("data.test_path", d.test_path)) if p]
    out = [
        f"{name} (its content changed)" for name, a, b in zip(names, old.get("sources", []), new["sources"]) if a != b
    ]
    if len(old.get("sources", [])) != len(new["sources"]):
        out.append("the list of sources")
    for part, what in (
        ("tokenizer", "the tokenizer"),
        ("template", "the chat template"),
        ("version", "fttool's tokenization (a newer fttool)"),
        ("data", "the data keys"),
        ("seed", "seed"),
    ):
        if old.get(part) != new.get(part):
            out.append(what)
    return out
