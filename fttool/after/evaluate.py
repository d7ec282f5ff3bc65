"""Held-out evaluation: greedy replies to the test split scored by the data group's metrics, perplexity of the
reference replies, the same for the base model side by side, and a verdict (fttool/after/report.py).

Used by `fttool eval run=RUN` and at the end of training. Replies are generated with the training chat template
and stop at the template's end-of-turn token.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from fttool.config import methods
from fttool.data.features import LABELED, PAIRS, SEQUENCES
from fttool.data.tokenize import IGNORE
from fttool.data.tokenizer import load_tokenizer
from fttool.errors import UserError
from fttool.runfolder import runfiles

log = logging.getLogger("fttool")
PPL_TOKENS_PER_BATCH = 4096  # perplexity batches hold at most this many tokens (the logits are batch x length x vocab)


def stop_ids(tokenizer, model=None) -> List[int]:
    """Token ids that end a reply: the template's end-of-turn token, EOS, and the model's generation-config EOS."""
    from fttool.data.templates import end_of_turn

    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    gen = gen if isinstance(gen, list) else [gen]
    ids = [end_of_turn(tokenizer), tokenizer.eos_token_id, *gen]
    return sorted({t for t in ids if isinstance(t, int) and t >= 0})


def left_padded(prompts: Sequence[List[int]], pad: int, device):
    """(input_ids, attention_mask) of prompts padded on the left to the longest, as generation wants them."""
    import torch

    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


def generate(
    model,
    tokenizer,
    conversations: Sequence[List[Dict]],
    max_new_tokens: int,
    batch_size: int = 16,
    temperature: float = 0.0,
    top_p: float = 1.0,
    template_kwargs: Optional[Dict] = None,
) -> List[Tuple[str, bool]]:
    """(reply, stopped) per conversation: batched, left-padded; greedy unless temperature > 0. `stopped` is True when
    the reply ended with an end-of-turn token rather than at max_new_tokens. The pad positions' attention rows are
    repaired (fttool/after/attention.py), so a reply does not depend on the other prompts of its batch, on CUDA too."""
    from fttool.data import prompt_ids

    prompts = [prompt_ids(tokenizer, c, template_kwargs) for c in conversations]
    return generate_ids(model, tokenizer, prompts, max_new_tokens, batch_size, temperature, top_p)


def generate_ids(
    model,
    tokenizer,
    prompts: Sequence[List[int]],
    max_new_tokens: int,
    batch_size: int = 16,
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> List[Tuple[str, bool]]:
    """`generate` from prompts already rendered and tokenized (a run's prompt features)."""
    import torch

    from fttool.after.attention import no_fully_masked_rows

    device = next(model.parameters()).device
    stop = stop_ids(tokenizer, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    )
    out: List[Tuple[str, bool]] = []
    model.eval()
    for i in range(0, len(prompts), batch_size):
        ids, mask = left_padded(prompts[i : i + batch_size], pad, device)
        width = ids.shape[1]
        with torch.no_grad(), no_fully_masked_rows():
            gen = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                eos_token_id=stop,
                pad_token_id=pad,
                use_cache=True,
                **sampling,
            )
        for g in gen[:, width:].tolist():
            ends = [j for j, t in enumerate(g) if t in stop]
            reply = g[: ends[0]] if ends else g
            out.append((tokenizer.decode(reply, skip_special_tokens=True).strip(), bool(ends)))
    return out


def nll(model, encoded: Dict[str, list]) -> List[Tuple[float, int]]:
    """(summed negative log-likelihood, trained tokens) per example, over the tokens training would train."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    order = sorted(range(len(encoded["input_ids"])), key=lambda k: len(encoded["input_ids"][k]))
    out: List[Tuple[float, int]] = [(0.0, 0)] * len(order)
    model.eval()
    i = 0
    while i < len(order):
        width = len(encoded["input_ids"][order[i]])
        j = i
        while j < len(order) and (j - i + 1) * len(encoded["input_ids"][order[j]]) <= max(PPL_TOKENS_PER_BATCH, width):
            j += 1
        batch = order[i:j]
        width = max(len(encoded["input_ids"][k]) for k in batch)
        ids = torch.tensor(
            [encoded["input_ids"][k] + [0] * (width - len(encoded["input_ids"][k])) for k in batch], device=device
        )
        labels = torch.tensor(
            [encoded["labels"][k] + [IGNORE] * (width - len(encoded["labels"][k])) for k in batch], device=device
        )
        mask = (
            torch.arange(width, device=device)[None, :]
            < torch.tensor([len(encoded["input_ids"][k]) for k in batch], device=device)[:, None]
        ).long()
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        target = labels[:, 1:]
        loss = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=IGNORE, reduction="none"
        )
        loss = loss.view(target.shape).sum(dim=1).tolist()
        counts = (target != IGNORE).sum(dim=1).tolist()
        for k, lo, c in zip(batch, loss, counts):
            out[k] = (lo, c)
        i = j
    return out


def _encode(tokenizer, spec, examples: List[Dict], features) -> Dict[str, list]:
    """The test examples encoded as `features` (data/features.py), masked exactly as training masks them and cut to
    data.max_length: every sequence of the first side, then of the next (pairs: the chosen, then the rejected)."""
    from fttool.data.tokenize import Encoder

    encoder = Encoder(tokenizer, tokenizer.chat_template, spec.data)
    locs, rows = [e["loc"] for e in examples], [e["example"] for e in examples]
    enc = features.encode(encoder, locs, rows, skip_bad=False)
    n = spec.data.max_length
    out: Dict[str, list] = {"input_ids": [], "labels": []}
    for ids, labels in features.sides:
        out["input_ids"] += [x[:n] for x in enc[ids]]
        out["labels"] += [x[:n] for x in enc[labels]]
    return out


def preference_scores(model, pair_encoded: Dict[str, list]) -> Tuple[Dict[str, float], List[Dict]]:
    """Preference accuracy and mean margin: the chosen reply's summed log-prob minus the rejected one's, over the
    tokens training scores (each reply and its end-of-turn token)."""
    losses = nll(model, pair_encoded)
    n = len(losses) // 2
    margins = [rejected[0] - chosen[0] for chosen, rejected in zip(losses[:n], losses[n:])]
    per = [{"preference_accuracy": float(m > 0), "preference_margin": m} for m in margins]
    metrics = {
        "preference_accuracy": sum(p["preference_accuracy"] for p in per) / n if n else float("nan"),
        "preference_margin": sum(margins) / n if n else float("nan"),
    }
    return metrics, per


def label_scores(model, labeled: Dict[str, list]) -> Dict[str, float]:
    """How far the model separates held-out desirable completions from undesirable ones (unpaired rows): each
    completion's mean log-prob per trained token (the completion and its end of turn, as KTO trains them); AUC over
    every (desirable, undesirable) pair (ties count half) and the difference of the two means."""
    import bisect

    per = [(-lo / c, label) for (lo, c), label in zip(nll(model, labeled), labeled["label"]) if c]
    good = [v for v, label in per if label]
    bad = sorted(v for v, label in per if not label)
    above = sum(
        bisect.bisect_left(bad, g) + 0.5 * (bisect.bisect_right(bad, g) - bisect.bisect_left(bad, g)) for g in good
    )
    return {
        "label_auc": above / (len(good) * len(bad)),
        "label_margin": sum(good) / len(good) - sum(bad) / len(bad),
    }


def labeled_rows(spec, tokenizer, where: str) -> Dict[str, list]:
    """The held-out unpaired rows (at most eval.samples), encoded and masked as training masks them, with labels;
    a clear error when they lack either kind."""
    from fttool.data import test_rows

    rows, source = test_rows(spec, True)
    rows = rows[: spec.eval.samples] if spec.eval.samples else rows
    labels = [int(bool(ex.get("label"))) for _, ex in rows]
    if not rows or all(labels) or not any(labels):
        kind = "no rows" if not rows else f"only {'desirable' if any(labels) else 'undesirable'} rows"
        raise UserError(
            f"{where}: label_auc and label_margin compare desirable with undesirable completions, but the held-out "
            f"rows ({source}) have {kind}; give a test file with both (data.test_path=FILE) or drop them from "
            "data.metrics."
        )
    encoded = _encode(tokenizer, spec, [{"loc": loc, "example": ex} for loc, ex in rows], LABELED)
    encoded["label"] = labels
    log.info(f"eval: label metrics over {len(rows)} held-out rows, {sum(labels)} desirable ({source})")
    return encoded


def score(model, tokenizer, spec, examples: List[Dict], encoded, scorers, pair_encoded=None, labeled=None) -> Dict:
    """One model's scores on the examples: {"metrics": {name: value}, "replies": [...], "per_example": [...]}"""
    names = spec.data.metrics
    replies: List[Tuple[str, bool]] = []
    if scorers:
        replies = generate(
            model,
            tokenizer,
            [e["messages"] for e in examples],
            spec.eval.max_new_tokens,
            spec.eval.batch_size,
            template_kwargs=dict(spec.data.template_kwargs),
        )
    per = [{n: fn(r, e["reference"]) for n, fn in scorers.items()} for (r, _), e in zip(replies, examples)] or [
        {} for _ in examples
    ]
    metrics = {n: sum(p[n] for p in per) / len(per) for n in scorers}
    if "perplexity" in names:
        losses = nll(model, encoded)
        total, count = sum(lo for lo, _ in losses), sum(c for _, c in losses)
        mean = total / count if count else float("nan")
        metrics["perplexity"] = float("inf") if mean >= 709 else math.exp(mean)  # exp overflows a float past ~709
        if count and not math.isfinite(mean):
            log.warning(
                f"eval: the model's loss on the reference replies is {mean} (NaN/inf logits), so perplexity "
                "cannot be scored: its outputs overflow or its weights are broken. Try hardware.precision=fp32 "
                "(or bf16 instead of fp16), or an earlier checkpoint (checkpoint=N)."
            )
        for p, (lo, c) in zip(per, losses):
            p["nll"] = lo / c if c else None
    if pair_encoded is not None:
        pair_metrics, pair_per = preference_scores(model, pair_encoded)
        metrics.update(pair_metrics)
        for p, q in zip(per, pair_per):
            p.update(q)
    if labeled is not None:
        metrics.update(label_scores(model, labeled))
    return {"metrics": {n: metrics[n] for n in names if n in metrics}, "replies": replies, "per_example": per}


def examples_of(spec, where: str) -> Tuple[List[Dict], str]:
    """The test split as generation tasks (at most eval.samples), and where it came from; a clear error when empty."""
    from fttool.config import objectives
    from fttool.data import eval_example, test_rows
    from fttool.metrics import METRICS

    rows, source = test_rows(spec, objectives.of(spec).features.trains)
    examples = [e for e in (eval_example(loc, ex) for loc, ex in rows) if e is not None]
    if not rows:
        raise UserError(
            f"{where}: the test split is empty ({source}); evaluate on a file with data.test_path=FILE, "
            "or train with data.test_ratio=0.05."
        )
    generative = [m for m in spec.data.metrics if METRICS[m].generative]
    if not examples:
        if generative:
            raise UserError(
                f"{where}: the test rows ({source}) are {spec.data.format} text with no prompt and reply "
                f"to generate, so {', '.join(generative)} cannot be scored; use data.metrics=[perplexity]."
            )
        examples = [{"loc": loc, "messages": [], "reference": "", "example": ex} for loc, ex in rows]
    return examples[: spec.eval.samples] if spec.eval.samples else examples, source


def evaluate(spec, tokenizer, load_tuned, load_base, where: str, checkpoint: str) -> Dict:
    """Score the fine-tuned model and (eval.compare_base) the base model on the test split.

    `load_tuned()` returns the fine-tuned model; `load_base()` returns the base model, or None when the base is the
    tuned model with its adapter switched off (LoRA/QLoRA)."""
    from fttool import metrics as metric_lib
    from fttool.after import report

    t0 = time.time()
    examples, source = examples_of(spec, where)
    schema = metric_lib.load_schema(spec.data.json_schema) if spec.data.json_schema else None
    reward = None
    if "reward" in spec.data.metrics:
        from fttool import rewards

        reward = rewards.combined(spec.objective, spec.data)
    scorers = metric_lib.scorers(spec.data.metrics, schema, reward)
    encoded = _encode(tokenizer, spec, examples, SEQUENCES) if "perplexity" in spec.data.metrics else None
    needs = {metric_lib.METRICS[m].rows for m in spec.data.metrics}
    pair_encoded = _encode(tokenizer, spec, examples, PAIRS) if "preference" in needs else None
    labeled = labeled_rows(spec, tokenizer, where) if "unpaired" in needs else None
    decoding = f"; greedy decoding, at most {spec.eval.max_new_tokens} new tokens" if scorers else ""
    log.info(f"eval: {len(examples)} test examples ({source}); metrics {', '.join(spec.data.metrics)}{decoding}")
    model = load_tuned()
    tuned = score(model, tokenizer, spec, examples, encoded, scorers, pair_encoded, labeled)
    base = None
    if spec.eval.compare_base:
        separate = load_base()
        if separate is None:
            ctx, m = model.disable_adapter(), model
        else:
            del model
            ctx, m = nullcontext(), separate
        with ctx:
            base = score(m, tokenizer, spec, examples, encoded, scorers, pair_encoded, labeled)
    result = report.assemble(
        spec, examples, tuned, base, source=source, checkpoint=checkpoint, seconds=time.time() - t0
    )
    return result


def model_loaders(spec, weights: Path, precision: str, own=None):
    """(load_tuned, load_base) for a run's weights folder: `own` (the model in memory) or a reload of what was saved."""
    from fttool import models as model_lib

    def tuned():
        m = own if own is not None else model_lib.load_trained(spec, precision, weights)
        m.config.use_cache = True
        return model_lib.place(m, spec)

    def base():
        if methods.of(spec).adapter:  # the tuned model gives the base with its adapter disabled
            return None
        m = model_lib.load_base(spec, precision)
        m.config.use_cache = True
        return model_lib.place(m, spec)

    return tuned, base


def warn_if_data_changed(spec, run_dir: Path) -> None:
    """A test split cut by data.test_ratio is only held out if the sources are the ones training split."""
    import json

    from fttool.data import sources_of
    from fttool.data.sources import fingerprint

    record = run_dir / runfiles.DATA
    if spec.data.test_path or not spec.data.test_ratio or not record.is_file():
        return
    trained = [s[0] for s in json.loads(record.read_text()).get("key", {}).get("sources", []) if len(s) > 2]
    now = [fingerprint(s.path, s.split, s.key) for s in sources_of(spec.data)]
    if trained and now != trained[: len(now)]:
        log.warning(
            "eval: the data sources changed since training (their content hash differs from data.json): the "
            "test split may now contain rows the model was trained on; evaluate on a fixed file with "
            "data.test_path=FILE for scores you can trust."
        )


def run_eval(spec, run_dir: Path, weights: Path, own=None, tokenizer=None) -> Dict:
    """Evaluate a run folder's weights and write eval.json, eval.md and eval_samples.jsonl into the run folder."""
    from fttool import data
    from fttool import models as model_lib
    from fttool.after import report

    warn_if_data_changed(spec, run_dir)
    precision = model_lib.resolve_precision(spec)
    if tokenizer is None:
        tokenizer = load_tokenizer(spec)
        data.training_template(spec, tokenizer)
    tuned, base = model_loaders(spec, weights, precision, own)
    result = evaluate(spec, tokenizer, tuned, base, where=f"run={run_dir}", checkpoint=str(weights))
    written = report.write(run_dir, result)
    for line in report.console(result, spec.eval.show):
        log.info(line)
    log.info(f"eval: results in {', '.join(str(p) for p in written)}")
    return result
