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
    batch_tokens: int = 0  # tokens of the largest micro-batch of the sample (padding included): the expected peak
    reply_tokens: Optional[float] = None  # prompt features: the mean reference reply (a completion's likely length)
    trained_share: float = 1.0  # of the tokens, those trained (labels not -100): what a chunked loss computes on

    def tokens_per_epoch(self) -> Optional[int]:
        return None if self.rows is None else int(self.rows * self.mean_tokens)


def _gguf_tokenizer(model):
    """A `tokenizers.Tokenizer` rebuilt from a GGUF's byte-level BPE vocabulary and merges (no transformers), and the
    chat template the file carries; (None, None) for another tokenizer type."""
    from fttool import gguf_read

    path = gguf_read.file_of(model)
    if path is None or not path.is_file():
        return None, None
    r = gguf_read.reader(path)
    if gguf_read.value(r, "tokenizer.ggml.model") != "gpt2":
        return None, gguf_read.value(r, "tokenizer.chat_template")
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens = gguf_read.value(r, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in gguf_read.value(r, "tokenizer.ggml.merges")]
    types = gguf_read.value(r, "tokenizer.ggml.token_type") or []
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t, k in zip(tokens, types) if k == 3])
    return tok, gguf_read.value(r, "tokenizer.chat_template")


def _template(folder: Path) -> Optional[str]:
    """The chat template a model folder's tokenizer files hold (chat_template.jinja or tokenizer_config.json)."""
    import json

    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    config = folder / "tokenizer_config.json"
    try:
        value = json.loads(config.read_text()).get("chat_template") if config.is_file() else None
    except ValueError:
        return None
    return value if isinstance(value, str) else None


def _overhead(tok, template: Optional[str], roles: tuple, cache: dict) -> Optional[int]:
    """Tokens the chat template adds around a conversation with these roles (its markers, a default system prompt):
    the template rendered with empty messages, counted. None when the template cannot be rendered here."""
    if roles in cache:
        return cache[roles]
    n = None
    if template and tok is not None:
        try:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            text = env.from_string(template).render(
                messages=[{"role": r, "content": ""} for r in roles], add_generation_prompt=False, tools=None
            )
            n = len(tok.encode(text, add_special_tokens=False).ids)
        except Exception:  # noqa: BLE001 - a template needing variables: the fixed guess instead
            n = None
    cache[roles] = n
    return n


def _tokenizer(model):
    """(a `tokenizers.Tokenizer` from the model's tokenizer.json (local or in the hub cache) or its GGUF, the chat
    template), each None when not to be had without transformers or a download."""
    from fttool import assets

    if getattr(model, "gguf_file", None):
        return _gguf_tokenizer(model)
    name_or_path, revision = model.name_or_path, model.revision
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
        return None, None
    try:
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(f)), _template(f.parent)
    except Exception:  # noqa: BLE001 - an unreadable tokenizer.json: counted by characters instead
        return None, None


def _sequences(example, prompts_only: bool = False) -> List[tuple]:
    """(texts, roles) of each sequence a normalised example becomes (a preference pair: two; prompt features: the
    prompt alone, its reference is not computed on); roles None for raw text segments (no template)."""
    from fttool.data.prompts import prompt_of

    if example["kind"] == "segments":
        return [([t for t, _ in example["segments"]], None)]
    messages = prompt_of("", example)[0] if prompts_only else example["messages"]
    msgs = [m for m in messages if isinstance(m.get("content"), str)]
    prompt, roles = [m["content"] for m in msgs], tuple(m["role"] for m in msgs)
    if prompts_only:
        return [(prompt, roles)]
    if example["kind"] == "preference":
        return [
            (prompt + [example["chosen"]], roles + ("assistant",)),
            (prompt + [example["rejected"]], roles + ("assistant",)),
        ]
    if example["kind"] == "unpaired":
        return [(prompt + [example["completion"]], roles + ("assistant",))]
    return [(prompt, roles)]


def sample(spec, limit: int = SAMPLE_ROWS) -> Optional[Workload]:
    """Token statistics from up to `limit` rows of each local source; None when no source is local."""
    from fttool.config import objectives
    from fttool.data import sources_of
    from fttool.data.features import PROMPTS
    from fttool.data.formats import Formatter
    from fttool.data.prompts import prompt_of
    from fttool.data.sources import _read_file, is_local, local_files
    from fttool.errors import UserError
    from fttool.plan.summary import local_rows

    d = spec.data
    features = objectives.of(spec).features
    tok, template = _tokenizer(spec.model)
    if d.template and "{" in d.template:
        template = d.template  # Jinja text given in the spec (a name or a file: the guess below)
    cache: dict = {}
    lengths: List[int] = []
    replies: List[int] = []
    trained = [0, 0]  # tokens trained (the replies and their end of turn), tokens in all
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
                        example = fmt(loc, rec)
                        seqs = _sequences(example, features is PROMPTS)
                        reply = prompt_of(loc, example)[1] if features is PROMPTS else None
                    except UserError:
                        continue
                    if reply:  # its tokens and the end of turn
                        n = (
                            len(tok.encode(reply, add_special_tokens=False).ids)
                            if tok
                            else len(reply) / CHARS_PER_TOKEN
                        )
                        replies.append(round(n) + 1)
                    for texts, roles in seqs:
                        each = (
                            [len(t.ids) for t in tok.encode_batch(texts, add_special_tokens=False)]
                            if tok
                            else [round(len(t) / CHARS_PER_TOKEN) for t in texts]
                        )
                        body = sum(each)
                        around = _overhead(tok, template, roles, cache) if roles else 0
                        n_tok = body + (PER_MESSAGE * len(texts) + 1 if around is None else around)
                        lengths.append(min(n_tok, d.max_length) if d.truncation == "truncate" else n_tok)
                        replies_of = [n + 1 for n, r in zip(each, roles or ()) if r == "assistant"]
                        trained[0] += n_tok if roles is None or d.train_on_inputs else sum(replies_of)
                        trained[1] += n_tok
                    taken += 1
                    if taken >= limit:
                        break
            except UserError:
                continue
    if not lengths:
        return None
    pair = len(features.sides)  # sequences per sample: a preference pair is two
    kept = [n for n in lengths if n <= d.max_length] or lengths
    per_seq = sum(kept) / len(kept)
    padded, longest = _padded(kept, spec.train.batch_size * pair, d.packing, d.max_length, spec.seed)
    if rows_total is not None:
        rows_total = round(rows_total * (1 - d.val_ratio - d.test_ratio))
        if d.max_samples:
            rows_total = min(rows_total, d.max_samples)
    counted = "the model's tokenizer" if tok else f"~{CHARS_PER_TOKEN:g} characters per token (no tokenizer.json here)"
    counted += ", the chat template rendered" if any(v is not None for v in cache.values()) else ""
    return Workload(
        rows_total,
        per_seq * pair,
        padded * pair,
        f"a sample of {len(lengths):,} sequences, {counted}",
        longest,
        sum(replies) / len(replies) if replies else None,
        min(1.0, trained[0] / trained[1]) if trained[1] else 1.0,
    )


def _padded(lengths: List[int], batch: int, packing: str, max_length: int, seed: int) -> tuple:
    """(tokens computed per sequence, tokens of the largest micro-batch): padded batches compute the longest of each
    micro-batch for every row; packing computes the tokens themselves (bins: rows of max_length, the last partly
    filled)."""
    rng = random.Random(seed)
    order = list(lengths)
    rng.shuffle(order)
    batches = [order[i : i + batch] for i in range(0, len(order), batch)]
    if packing == "bins":
        return sum(lengths) / len(lengths), batch * max_length
    if packing != "none" or batch <= 1:
        return sum(lengths) / len(lengths), max(sum(b) for b in batches)
    return sum(max(b) * len(b) for b in batches) / len(order), max(max(b) * len(b) for b in batches)


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
