"""Data: read rows -> normalise their format -> split -> weight -> render with the chat template, tokenize and
mask -> apply the length policy -> cache. Every count along the way ends up in DataStats.

`prepare_datasets(spec, tokenizer)` returns a `Prepared`: the tokenized training (and validation) datasets, the stats, and the
cache folder they live in. The held-out test rows are read by `test_rows(spec)` when an evaluation needs them.
"""

from __future__ import annotations

import itertools
import json
import logging
import multiprocessing
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from fttool.config import objectives
from fttool.data import cache, templates
from fttool.data.formats import Formatter
from fttool.data.pairs import encode_pairs
from fttool.data.sources import fingerprint, read_rows
from fttool.data.stats import DataStats, histogram
from fttool.data.tokenize import IGNORE, Encoder, auto_num_proc
from fttool.errors import UserError

log = logging.getLogger("fttool")
CHAT_KINDS = ("chat", "sharegpt", "alpaca", "preference")
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
    needs = any(s.format in CHAT_KINDS for s in sources_of(d))
    if needs and not tokenizer.chat_template:
        raise UserError(
            f"the tokenizer of {spec.model.name_or_path} has no chat template, which data.format={d.format} needs; "
            f"set data.template to one of {', '.join(templates.NAMED)} (or a .jinja file), "
            "or use data.format=completion."
        )
    return tokenizer.chat_template


def prepare_datasets(spec, tokenizer, use_cache: bool = True) -> Prepared:
    t0 = time.perf_counter()
    d = spec.data
    template = training_template(spec, tokenizer)
    srcs = sources_of(d)
    pairs = objectives.of(spec).pairs  # a chosen and a rejected sequence per row (a preference objective)
    extra = [(k, p) for k, p in (("data.val_path", d.val_path), ("data.test_path", d.test_path)) if p]
    parts = cache.key(
        d,
        spec.seed,
        tokenizer,
        template,
        [[fingerprint(s.path, s.split, s.key), s.format, s.split, s.columns, s.weight] for s in srcs]
        + [[k, fingerprint(p, "train", k)] for k, p in extra],
        pairs=pairs,
    )
    where = cache.folder(d, parts)
    paths = [s.path for s in srcs] + [p for _, p in extra]
    if use_cache and cache.is_complete(where):
        splits, stats = cache.read(where)
        splits = cache.relabel(splits, where, paths)
        return Prepared(
            splits["train"],
            splits["validation"],
            DataStats.from_dict({**stats, "unit": "pairs" if pairs else "samples"}),
            where,
            True,
            time.perf_counter() - t0,
            parts,
        )
    train_rows, val_rows, _, stats = _rows(spec, srcs)
    encoder = Encoder(tokenizer, template, d)  # only when tokenizing: a cache hit needs none
    stats.unit = "pairs" if pairs else "samples"
    train_ds = _encode(encoder, train_rows, d, stats, count=True, pairs=pairs)
    val_ds = _encode(encoder, val_rows, d, DataStats(), count=False, pairs=pairs) if val_rows else None
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


def _read(path: str, source: Source, d, stats: DataStats, key: str) -> Rows:
    rows = read_rows(path, source.split, key)
    stats.rows += len(rows)
    return _format_rows(rows, Formatter(source.format, source.columns, d.roles, d.system_prompt), d, stats)


def _rows(spec, srcs: List[Source]):
    d = spec.data
    stats = DataStats(max_length=d.max_length)
    rng = random.Random(spec.seed)
    seen: set = set()
    train, val, test = [], [], []
    for s in srcs:
        rows = _read(s.path, s, d, stats, s.key)
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
            bucket += _read(path, first, d, DataStats(), key)
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


def _test_example(loc: str, ex: Dict) -> Optional[Dict]:
    if ex["kind"] == "preference":
        return {"messages": ex["messages"], "reference": ex["chosen"], "loc": loc}
    if ex["kind"] != "chat":
        return None
    msgs = ex["messages"]
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    return {"messages": msgs[:last], "reference": msgs[last]["content"], "loc": loc}


# -- tokens -----------------------------------------------------------------------------------------------
def _encode_fn(encoder: Encoder, skip: bool, pairs: bool = False) -> Callable:
    def fn(batch):
        if multiprocessing.current_process().name != "MainProcess":
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle (no traceback per worker)
        examples = [json.loads(x) for x in batch["example"]]
        if pairs:
            return encode_pairs(encoder, batch["loc"], examples, skip)
        return encoder.encode_batch(batch["loc"], examples, skip_bad=skip)

    return fn


def _encode(encoder: Encoder, rows: Rows, d, stats: DataStats, count: bool, pairs: bool = False):
    import datasets

    datasets.disable_progress_bars()
    raw = datasets.Dataset.from_dict({"loc": [loc for loc, _ in rows], "example": [json.dumps(ex) for _, ex in rows]})
    nproc = auto_num_proc(len(rows), d.num_proc)
    enc = raw.map(
        _encode_fn(encoder, d.skip_bad_rows, pairs),
        batched=True,
        batch_size=256,
        remove_columns=["example"],
        num_proc=nproc if nproc > 1 else None,
        load_from_cache_file=False,
        desc=None,
    )
    return _length_policy(enc, d, stats, count, pairs)


NO_TRAINED_WHY = {
    "same": "its chosen and rejected replies are the same tokens",
    "truncated": "its replies were cut off by data.max_length",
    "empty": "the template rendered its trained replies empty (e.g. reasoning stripped from an earlier turn)",
    "none": "it has no turn of data.train_roles to train",
}


def fate(ids: List[int], labels: List[int], d, empty_replies: int = 0):
    """What the length policy does to one sample: (ids, labels, truncated, why it is dropped or "")."""
    truncated = False
    if len(ids) > d.max_length:
        if d.truncation == "drop":
            return ids, labels, False, f"longer than data.max_length={d.max_length} (data.truncation=drop)"
        had = any(x != IGNORE for x in labels)
        ids, labels, truncated = ids[: d.max_length], labels[: d.max_length], True
        if had and not any(x != IGNORE for x in labels):
            return ids, labels, True, NO_TRAINED_WHY["truncated"]
    if not any(x != IGNORE for x in labels):
        return ids, labels, truncated, NO_TRAINED_WHY["empty" if empty_replies else "none"]
    return ids, labels, truncated, ""


def _length_policy(enc, d, stats: DataStats, count: bool, pairs: bool = False):
    """data.max_length and data.truncation on every sample (or both sequences of a pair: a pair is kept only when
    both are; truncation counts once per pair), counted in stats."""
    import datasets

    keep: Dict[str, list] = {"input_ids": [], "labels": [], "length": [], "loc": []}
    if pairs:
        keep.update({"rejected_input_ids": [], "rejected_labels": []})
    rejected = zip(enc["rejected_input_ids"], enc["rejected_labels"]) if pairs else itertools.repeat(None)
    lengths = []
    for loc, ids, labels, err, c, other in zip(
        enc["loc"], enc["input_ids"], enc["labels"], enc["error"], _counters(enc), rejected
    ):
        if err:
            stats.bad_rows_skipped += 1
            if len(stats.bad_row_examples) < BAD_ROW_EXAMPLES:
                stats.bad_row_examples.append(err)
            continue
        stats.eos_appended += c["eos_appended"]
        stats.tools_in_system += c["tools_in_system"]
        stats.literal_markers += c["literal_markers"]
        stats.empty_replies += c["empty_replies"]
        ids, labels, truncated, why = fate(ids, labels, d, c["empty_replies"])
        if other is not None:
            r_ids, r_labels, r_truncated, r_why = fate(other[0], other[1], d, c["empty_replies"])
            truncated, why = truncated or r_truncated, why or r_why or (NO_TRAINED_WHY["same"] if r_ids == ids else "")
        stats.truncated += truncated
        if why:
            if why.startswith("longer than"):
                stats.dropped_too_long += 1
            else:
                stats.dropped_no_trained_tokens += 1
                stats.no_trained_why[why] = stats.no_trained_why.get(why, 0) + 1
            continue
        trained = sum(1 for x in labels if x != IGNORE)
        length = len(ids)
        if other is not None:
            keep["rejected_input_ids"].append(r_ids)
            keep["rejected_labels"].append(r_labels)
            trained += sum(1 for x in r_labels if x != IGNORE)
            length = max(length, len(r_ids))
            stats.tokens += len(r_ids)
        keep["input_ids"].append(ids)
        keep["labels"].append(labels)
        keep["length"].append(length)
        keep["loc"].append(loc)
        lengths.append(length)
        stats.samples += 1
        stats.tokens += len(ids)
        stats.trained_tokens += trained
    if count:
        stats.histogram = histogram(lengths, d.max_length)
        if not stats.samples:
            raise UserError(
                f"data: every sample was dropped ({stats.summary()}); raise data.max_length or fix the data."
            )
    ints = datasets.Sequence(datasets.Value("int32"))
    features = {"input_ids": ints, "labels": ints, "length": datasets.Value("int32"), "loc": datasets.Value("string")}
    if pairs:
        features.update(rejected_input_ids=ints, rejected_labels=ints)
    return datasets.Dataset.from_dict(keep, features=datasets.Features(features))


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


def _counters(enc):
    for values in zip(*[enc[k] for k in COUNTERS]):
        yield dict(zip(COUNTERS, values))


COUNTERS = ("eos_appended", "tools_in_system", "literal_markers", "empty_replies")


def prompt_ids(tokenizer, messages, template_kwargs: Optional[Dict] = None) -> List[int]:
    """Token ids of a conversation up to where the assistant answers, with the tokenizer's current template and the
    run's data.template_kwargs (so inference renders prompts as training did)."""
    kwargs = dict(template_kwargs or {})
    text = tokenizer.apply_chat_template(
        messages,
        tools=kwargs.pop("tools", None),
        documents=kwargs.pop("documents", None),
        tokenize=False,
        add_generation_prompt=True,
        **kwargs,
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


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


def test_rows(spec) -> Tuple[Rows, str]:
    """The held-out test rows, read afresh (no tokenizing): data.test_path, or the seeded data.test_ratio split of
    the sources exactly as training made it. Also says where they come from."""
    d = spec.data
    if d.test_path:
        return _read(d.test_path, sources_of(d)[0], d, DataStats(), "data.test_path"), f"data.test_path={d.test_path}"
    if not d.test_ratio:
        return [], "no test split (data.test_ratio=0 and no data.test_path)"
    return _rows(spec, sources_of(d))[2], f"data.test_ratio={d.test_ratio} of the training sources"


def eval_example(loc: str, ex: Dict) -> Optional[Dict]:
    """A test row as a generation task: the conversation before the last reply, and that reply as the reference."""
    t = _test_example(loc, ex)
    if t is not None:
        t["example"] = ex
    return t


__all__ = [
    "prepare_datasets",
    "drift",
    "prompt_ids",
    "mask_dump",
    "fate",
    "NO_TRAINED_WHY",
    "test_rows",
    "eval_example",
    "DataStats",
    "Prepared",
    "IGNORE",
    "sources_of",
]
