"""`fttool preview` and `fttool preprocess`: see exactly what will be trained, and build the cache ahead of time."""

from __future__ import annotations

import os
import sys
from typing import List, Optional, TextIO

from fttool.data.stats import histogram_lines
from fttool.data.tokenize import IGNORE

ON, OFF = "\033[42;30m", "\033[0m"  # trained tokens: black on green


def highlight(tokenizer, ids: List[int], labels: List[int], color: bool) -> str:
    """The sample's text with trained tokens marked: colour in a terminal, [[...]] otherwise."""
    out, run, trained = [], [], None
    for tok_id, label in list(zip(ids, labels)) + [(None, None)]:
        flag = label is not None and label != IGNORE
        if run and (tok_id is None or flag != trained):
            text = tokenizer.decode(run, skip_special_tokens=False)
            out.append((f"{ON}{text}{OFF}" if color else f"[[{text}]]") if trained else text)
            run = []
        if tok_id is not None:
            run.append(tok_id)
            trained = flag
    return "".join(out)


def _use_color(stream: TextIO) -> bool:
    return stream.isatty() and "NO_COLOR" not in os.environ


def stats_lines(spec, prepared) -> List[str]:
    from fttool.data import pack

    st, d = prepared.stats, spec.data
    lengths = prepared.train["length"]
    frac = st.trained_tokens / st.tokens if st.tokens else 0.0
    lines = [
        f"{st.unit:<14}{st.samples:,} (from {st.rows:,} rows; validation {st.validation:,}, test {st.test:,})",
        f"tokens        {st.tokens:,}, trained {st.trained_tokens:,} ({100 * frac:.1f}%)",
        f"length        max_length {d.max_length}, truncation={d.truncation}: truncated {st.truncated}, "
        f"dropped {st.dropped_too_long} over max_length, dropped {st.dropped_no_trained_tokens} with no trained tokens",
    ]
    for why, n in st.no_trained_why.items():
        lines.append(f"              {n:,} with no trained tokens because {why}")
    if st.bad_rows_skipped or st.duplicates_removed:
        lines.append(f"rows          skipped {st.bad_rows_skipped} bad, removed {st.duplicates_removed} duplicates")
    if len(st.per_source) > 1:
        lines.append("mixture       " + ", ".join(f"{os.path.basename(k)}: {v:,}" for k, v in st.per_source.items()))
    if st.eos_appended:
        lines.append(
            f"end of turn   EOS appended to {st.eos_appended:,} replies (the template closes them with no special token)"
        )
    if st.literal_markers:
        lines.append(
            f"literal text  {st.literal_markers:,} special-token texts inside messages kept as plain text (never the token)"
        )
    if st.empty_replies:
        lines.append(f"empty replies {st.empty_replies:,} trained replies the template rendered empty (not trained)")
    if st.tools_in_system:
        lines.append(f"tools         schemas written into the system message of {st.tools_in_system:,} rows")
    if st.unit == "samples":  # pairs are always padded batches (a chosen and a rejected sequence each)
        pad = pack.padding_efficiency(lengths, spec.train.batch_size)
        bins = pack.bin_efficiency(lengths, d.max_length)
        lines.append(
            f"packing       data.packing={d.packing}; real tokens per computed token: padded batches of "
            f"{spec.train.batch_size} {100 * pad:.1f}%, padding_free 100%, bins of {d.max_length} {100 * bins:.1f}%"
        )
    lines.append("lengths")
    lines += histogram_lines(st.histogram)
    return lines


def run(
    verb: str,
    spec,
    features,
    samples: Optional[int] = None,
    out: TextIO = sys.stdout,
    output: Optional[str] = None,
    sampler=None,
) -> None:
    """`features`: what the run's objective trains on (data/features.py). `sampler(tokenizer, rows)`: for prompt
    features, completions sampled for the shown rows with their rewards (given by the caller: data/ loads no model)."""
    try:
        if output is not None:
            _dump(spec, samples, output, out)
            return
        _run(verb, spec, features, 3 if samples is None else samples, out, sampler)
    except BrokenPipeError:  # `fttool preview | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _dump(spec, samples: Optional[int], output: str, out: TextIO) -> None:
    """`fttool preview ... output=FILE.jsonl`: the machine-readable mask of every row (see data.mask_dump)."""
    from fttool import data
    from fttool.data.tokenizer import load_tokenizer
    from fttool.logs import quiet_libraries

    quiet_libraries()
    counts = data.mask_dump(spec, load_tokenizer(spec), output, samples)
    print(
        f"wrote {output}: {counts['samples']:,} samples ({counts['truncated']:,} truncated to data.max_length, "
        f'{counts["dropped"]:,} that training drops, marked "dropped") and {counts["errors"]:,} refused rows '
        '(with "error")',
        file=out,
    )


def _run(verb: str, spec, features, samples: int, out: TextIO, sampler=None) -> None:
    from fttool import data
    from fttool.data.tokenizer import load_tokenizer
    from fttool.logs import quiet_libraries

    quiet_libraries()
    tok = load_tokenizer(spec)
    prepared = data.prepare_datasets(spec, tok, features)
    how = "loaded from the cache" if prepared.from_cache else "tokenized"
    print(f"# {how} in {prepared.seconds:.2f} s: {prepared.cache_dir}", file=out)
    if verb == "preview":
        rows = [prepared.train[i] for i in range(min(samples, len(prepared.train)))]
        sampled = sampler(tok, rows) if sampler and rows else [None] * len(rows)
        for i, (row, completions) in enumerate(zip(rows, sampled)):
            _show(tok, features, i, row, _use_color(out), out)
            for k, (text, scores) in enumerate(completions or []):
                rewards = ", ".join(f"{name} {value:.3g}" for name, value in scores.items())
                print(f"── sampled completion {k} ({rewards}):\n{text}", file=out)
        print(file=out)
    for line in stats_lines(spec, prepared):
        print(line, file=out)
    for example in prepared.stats.bad_row_examples:
        print(f"skipped: {example}", file=out)


def _show(tok, features, i: int, row, color: bool, out: TextIO) -> None:
    """One prepared row: each of its sequences with the tokens that count marked (a prompt: its text and reference)."""
    what = features.marked
    legend = f"{what} tokens on green" if color else f"{what} tokens in [[...]]"
    for name, (ids_key, labels_key) in zip(features.names, features.sides):
        ids = row[ids_key]
        if labels_key is None:
            print(f"\n── prompt {i} · {row['loc']} · {len(ids)} tokens (nothing trained)", file=out)
            print(tok.decode(ids, skip_special_tokens=False), file=out)
            if row.get("reference"):
                print(f"── reference: {row['reference']}", file=out)
            continue
        trained = sum(1 for x in row[labels_key] if x != IGNORE)
        print(f"\n── sample {i}{name} · {row['loc']} · {len(ids)} tokens, {trained} {what} ({legend})", file=out)
        print(highlight(tok, ids, row[labels_key], color), file=out)
