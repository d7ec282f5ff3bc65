"""Rewards for online objectives (GRPO): built-in ones chosen by name with weights, and a user's reward code named
on the command line. Pure Python: no torch.

A reward scores one completion of a prompt, given the row's reference answer (the reply or `answer` column; "" when
the row has none). Built-ins reuse the test-split metrics where one exists (metrics.py), so what training rewards
is what `fttool eval` scores:

- numeric_answer: the completion's final number (#### N, \\boxed{N}, else the last number) equals the reference's.
- exact_match: the completion equals the reference, surrounding whitespace aside.
- token_f1: F1 of the normalised words shared with the reference (partial credit).
- format: the completion matches objective.format_regex (default: a <think>...</think> block, then an answer).
- json_valid / json_schema: the completion parses as JSON / satisfies data.json_schema.
- length: 1 - (completion characters / objective.length_target), at least -1: shorter is better past the target.

User code: `objective.reward_code=FILE.py:function` (or `module:function`), TRL's signature: it gets `prompts`,
`completions` and the row's columns (`reference`, ...) as lists and returns one float per completion. It is
imported only when the person at the command line asked for it (`trust_code=true` when a recipe names it). A reward
that raises, returns None or NaN, or returns the wrong number of values stops the run: RewardFailed (exit 4) names
the function and the prompt.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from fttool import metrics
from fttool.errors import UserError, suggestion

DEFAULT_FORMAT = r"(?s)^\s*<think>.+?</think>\s*\S"


class RewardFailed(UserError):
    """A reward function raised, or returned None, NaN or the wrong number of values."""

    exit_code = 4


@dataclass(frozen=True)
class Reward:
    name: str
    about: str
    build: Callable  # (objective spec, data spec) -> (completion, reference) -> float


def _metric(name: str) -> Callable:
    return lambda o, d: metrics.METRICS[name].score


def _format(o, d):
    pattern = re.compile(getattr(o, "format_regex", None) or DEFAULT_FORMAT)
    return lambda completion, reference: float(bool(pattern.search(completion)))


def _json_schema(o, d):
    if not d.json_schema:
        raise UserError("the json_schema reward needs data.json_schema=FILE (the JSON Schema the completions satisfy).")
    return metrics.schema_checker(metrics.load_schema(d.json_schema))


def _length(o, d):
    target = max(1, int(getattr(o, "length_target", 0) or 1))
    return lambda completion, reference: max(-1.0, 1.0 - len(completion) / target)


REWARDS: Dict[str, Reward] = {
    r.name: r
    for r in (
        Reward("numeric_answer", metrics.METRICS["numeric_answer"].about, _metric("numeric_answer")),
        Reward("exact_match", metrics.METRICS["exact_match"].about, _metric("exact_match")),
        Reward("token_f1", metrics.METRICS["token_f1"].about, _metric("token_f1")),
        Reward(
            "format", "completion matches objective.format_regex (default <think>...</think> then an answer)", _format
        ),
        Reward("json_valid", metrics.METRICS["json_valid"].about, _metric("json_valid")),
        Reward("json_schema", "completion is JSON that satisfies data.json_schema", _json_schema),
        Reward("length", "1 - characters / objective.length_target (shorter is better), at least -1", _length),
    )
}
USER = "reward_code"  # the name a user's reward function is logged under, with its function name


def _text(completion) -> str:
    """A completion as text (TRL passes conversational completions as a list of messages)."""
    if isinstance(completion, list):
        return "".join(m.get("content", "") for m in completion if isinstance(m, dict))
    return str(completion)


def builtin(name: str, o, d) -> Callable:
    """A built-in reward as TRL calls it: a batch in, one float per completion out."""
    score = REWARDS[name].build(o, d)

    def reward(prompts, completions, reference=None, **kwargs) -> List[float]:
        refs = reference if reference is not None else [""] * len(completions)
        return [float(score(_text(c), r or "")) for c, r in zip(completions, refs)]

    reward.__name__ = name
    return reward


def split_ref(ref: str):
    """FILE.py:function or module:function -> (where, function); UserError when it is neither."""
    where, sep, name = ref.rpartition(":")
    if not sep or not where or not name.isidentifier():
        raise UserError(
            f"objective.reward_code={ref}: expected FILE.py:function or module:function (e.g. rewards.py:correct)."
        )
    return where, name


def code_hash(ref: str) -> Optional[str]:
    """sha256 of a reward file (recorded in the run folder); None for a module."""
    where, _ = split_ref(ref)
    path = Path(where).expanduser()
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.suffix == ".py" and path.is_file() else None


def check_code_ref(ref: str) -> None:
    """Config time, without importing anything: the file exists (a module is found when the run starts)."""
    where, _ = split_ref(ref)
    if where.endswith(".py") and not Path(where).expanduser().is_file():
        raise UserError(f"objective.reward_code={ref}: {where} not found.")


def load_code(ref: str) -> Callable:
    """Import the user's reward function (only ever called in the run the person at the command line started)."""
    import importlib
    import importlib.util

    where, name = split_ref(ref)
    try:
        if where.endswith(".py"):
            path = Path(where).expanduser().resolve()
            spec = importlib.util.spec_from_file_location(f"fttool_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except Exception as e:  # noqa: BLE001 - the user's file: name it and what went wrong
        raise UserError(f"objective.reward_code={ref}: could not import {where}: {type(e).__name__}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        found = [n for n in dir(module) if callable(getattr(module, n)) and not n.startswith("_")]
        raise UserError(f"objective.reward_code={ref}: {where} has no function {name}; it has: {', '.join(found)}.")
    return fn


def checked(fn: Callable, label: str) -> Callable:
    """`fn` wrapped so a failure never looks like a reward: an exception, None, NaN or a wrong count stops the run
    naming the function and the prompt."""

    def reward(prompts, completions, **kwargs) -> List[float]:
        try:
            out = fn(prompts=prompts, completions=completions, **kwargs)
        except Exception as e:  # noqa: BLE001 - named with its prompt, then the run stops
            raise RewardFailed(
                f"reward {label} raised {type(e).__name__}: {e} (prompt: {_clip(prompts[0])!r}); fix the function."
            ) from None
        out = list(out) if out is not None else []
        if len(out) != len(completions):
            raise RewardFailed(f"reward {label} returned {len(out)} values for {len(completions)} completions.")
        for i, v in enumerate(out):
            bad = v is None or not isinstance(v, (int, float)) or not math.isfinite(float(v))
            if bad:
                raise RewardFailed(
                    f"reward {label} returned {v!r} for completion {i} of prompt {_clip(prompts[i])!r} "
                    f"(completion: {_clip(_text(completions[i]))!r}); a reward must be a finite number."
                )
        return [float(v) for v in out]

    reward.__name__ = label
    return reward


def _clip(text, n: int = 120) -> str:
    text = _text(text)
    return text if len(text) <= n else text[: n - 3] + "..."


def functions(o, d, user: Optional[Callable] = None) -> List[Callable]:
    """The run's reward functions, each checked, in the order of objective.rewards (then the user's)."""
    out = [checked(builtin(n, o, d), n) for n in o.rewards]
    if user is not None:
        out.append(checked(user, f"{USER}:{getattr(user, '__name__', 'function')}"))
    return out


def combined(o, d) -> Callable[[str, str], float]:
    """The weighted sum of the built-in rewards for one completion (`fttool eval`'s `reward` metric)."""
    scores = {n: REWARDS[n].build(o, d) for n in o.rewards}
    return lambda completion, reference: sum(float(w) * scores[n](completion, reference) for n, w in o.rewards.items())


def names_problem(names: Sequence[str]) -> Optional[str]:
    for n in names:
        if n not in REWARDS:
            return (
                f"objective.rewards has {n}, which is not a built-in reward.{suggestion(n, REWARDS)} "
                f"Built-in: {', '.join(REWARDS)}; your own goes in objective.reward_code=FILE.py:function."
            )
    return None
