"""Scores of generated replies against references, and what each metric means. Pure Python: no torch.

Generation metrics score one reply against one reference and are averaged over the test split. Perplexity is
not computed here: it comes from the model's loss on the reference replies (fttool/after/evaluate.py).
"""

from __future__ import annotations

import json
import math
import re
import string
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional


@dataclass(frozen=True)
class Metric:
    name: str
    higher_is_better: bool
    about: str
    score: Optional[Callable[[str, str], float]] = None  # (prediction, reference) -> score; None: from the model's loss
    rate: bool = True  # a fraction of examples (shown as %); False: a value in its own units
    rows: str = ""  # the test rows it is scored on, when not generation tasks: "preference" pairs or "unpaired" rows

    @property
    def generative(self) -> bool:
        return self.score is not None


_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_WORDS = re.compile(r"[a-z0-9]+")


def normalize(text: str) -> str:
    """SQuAD's answer normalisation: lower case, punctuation and articles removed, whitespace collapsed."""
    text = _ARTICLES.sub(" ", _PUNCT.sub("", text.lower()))
    return " ".join(text.split())


def exact_match(pred: str, ref: str) -> float:
    """1.0 when the reply equals the reference exactly, surrounding whitespace aside."""
    return float(pred.strip() == ref.strip())


def token_f1(pred: str, ref: str) -> float:
    """F1 of the bag of normalised words shared by reply and reference (SQuAD's definition)."""
    p, r = normalize(pred).split(), normalize(ref).split()
    if not p or not r:
        return float(p == r)
    common: Dict[str, int] = {}
    counts = {w: r.count(w) for w in set(r)}
    for w in p:
        if counts.get(w, 0) > 0:
            counts[w] -= 1
            common[w] = common.get(w, 0) + 1
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(r)
    return 2 * precision * recall / (precision + recall)


def _lcs(a: List[str], b: List[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F-measure: longest common subsequence of lower-cased words (letters and digits), as rouge-score does."""
    p, r = _WORDS.findall(pred.lower()), _WORDS.findall(ref.lower())
    if not p or not r:
        return float(p == r)
    lcs = _lcs(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


_NUMBER = r"-?\$?\s*\d[\d,]*(?:\.\d+)?"
_HASHES = re.compile(r"####\s*(" + _NUMBER + ")")
_BOXED = re.compile(r"\\boxed\{\s*(" + _NUMBER + r")\s*\}")
_ANY_NUMBER = re.compile(_NUMBER)


def final_number(text: str) -> Optional[float]:
    """The final answer of a worked solution as a number: after `#### ` (GSM8K), else in the last `\\boxed{}`
    (MATH-style), else the last number in the text. Thousands separators and a `$` are ignored; None: no number."""
    for pattern in (_HASHES, _BOXED, _ANY_NUMBER):
        found = pattern.findall(text)
        if found:
            try:
                return float(found[-1].replace(",", "").replace("$", "").replace(" ", ""))
            except ValueError:
                return None
    return None


def numeric_answer(pred: str, ref: str) -> float:
    """1.0 when the reply's final number equals the reference's (the reasoning around it is not compared)."""
    want, got = final_number(ref), final_number(pred)
    return float(want is not None and got is not None and abs(want - got) <= 1e-6 * max(1.0, abs(want)))


_FENCE = re.compile(r"^```[A-Za-z0-9_-]*\s*\n(.*?)\n?```$", re.S)


def parse_json(text: str):
    """The reply as JSON (one surrounding ``` fence allowed); raises ValueError when it is not JSON."""
    text = text.strip()
    m = _FENCE.match(text)
    return json.loads(m.group(1) if m else text)


def json_valid(pred: str, ref: str = "") -> float:
    """1.0 when the reply parses as JSON."""
    try:
        parse_json(pred)
        return 1.0
    except ValueError:
        return 0.0


def schema_checker(schema: Dict) -> Callable[[str, str], float]:
    """A scorer: 1.0 when the reply parses as JSON and satisfies `schema` (its $schema draft, else the latest)."""
    import jsonschema

    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    validator = cls(schema)

    def score(pred: str, ref: str = "") -> float:
        try:
            return float(validator.is_valid(parse_json(pred)))
        except ValueError:
            return 0.0

    return score


def _built_per_run(pred: str, ref: str) -> float:
    raise RuntimeError("the reward metric's scorer is built from the run's objective (metrics.scorers)")


METRICS: Dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("exact_match", True, "reply equals the reference (surrounding whitespace aside)", exact_match),
        Metric("token_f1", True, "F1 of shared normalised words (SQuAD)", token_f1),
        Metric("rouge_l", True, "longest common word subsequence, F-measure", rouge_l),
        Metric(
            "numeric_answer",
            True,
            "final number of the reply equals the reference's (#### N, \\boxed{N}, else the last number)",
            numeric_answer,
        ),
        Metric("json_valid", True, "reply parses as JSON (one ``` fence allowed)", json_valid),
        Metric(
            "reward",
            True,
            "the run's built-in rewards, weighted as in objective.rewards (objective=grpo)",
            _built_per_run,
            rate=False,
        ),
        Metric(
            "json_schema", True, "reply is JSON that satisfies data.json_schema", None
        ),  # scorer built from the schema
        Metric(
            "perplexity",
            False,
            "exp of the mean loss on the reference replies' trained tokens (teacher-forced)",
            rate=False,
        ),
        Metric(
            "preference_accuracy",
            True,
            "fraction of held-out pairs whose chosen reply the model gives a higher log-prob than the rejected one",
            rows="preference",
        ),
        Metric(
            "preference_margin",
            True,
            "mean log-prob of the chosen reply minus the rejected one's, over held-out pairs (nats)",
            rate=False,
            rows="preference",
        ),
        Metric(
            "label_auc",
            True,
            "chance that a held-out desirable completion gets a higher mean log-prob per token than an undesirable one "
            "(unpaired rows; 50% = no separation)",
            rows="unpaired",
        ),
        Metric(
            "label_margin",
            True,
            "mean log-prob per token of held-out desirable completions minus undesirable ones (nats per token)",
            rate=False,
            rows="unpaired",
        ),
    )
}


def load_schema(path: str) -> Dict:
    """The JSON Schema file named by data.json_schema, checked; a UserError names the file and the problem."""
    from pathlib import Path

    from fttool.errors import UserError

    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"data.json_schema={path}: file not found.")
    try:
        schema = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"data.json_schema={path}:{e.lineno}: not valid JSON ({e.msg}).")
    try:
        schema_checker(schema)
    except Exception as e:  # jsonschema.SchemaError
        raise UserError(f"data.json_schema={path}: not a valid JSON Schema: {str(e).splitlines()[0]}")
    return schema


def scorers(
    names: List[str], schema: Optional[Dict], reward: Optional[Callable[[str, str], float]] = None
) -> Dict[str, Callable[[str, str], float]]:
    """name -> scorer for the generation metrics among `names` (`reward`: the run's weighted rewards, rewards.py)."""
    out = {}
    for n in names:
        if n == "json_schema":
            out[n] = schema_checker(schema or {})
        elif n == "reward":
            out[n] = reward
        elif METRICS[n].generative:
            out[n] = METRICS[n].score
    return out


def improvement(name: str, base: float, tuned: float) -> float:
    """How much better the fine-tuned score is (positive = better), in the metric's own units."""
    return tuned - base if METRICS[name].higher_is_better else base - tuned


def fmt(metric: str, value: Optional[float]) -> str:
    """A score as the reports show it: a rate in percent, another metric to three decimals."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:.1f}%" if METRICS[metric].rate else f"{value:.3f}"


def fmt_diff(metric: str, value: float) -> str:
    """A difference or margin: points for a rate (0.05 = +5.0 pts)."""
    return f"{100 * value:+.1f} pts" if METRICS[metric].rate else f"{value:+.3f}"
