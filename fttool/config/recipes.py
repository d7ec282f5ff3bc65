"""What a recipe file holds besides run keys: the `meta:` header (schema version, description, owner, expected hardware
and results), the keys renamed or removed between recipe schemas (MIGRATIONS, with the exact replacement), and the
check of a run's result.json against a recipe's expected figures. Plain data and OmegaConf only: `fttool recipes`
lists recipe files with it in well under a second.

A recipe file:

    # @package _global_
    meta:
      schema: 2
      description: LoRA on the support chats, one GPU
      owner: support-ml
      hardware: 1x GPU with 24 GB
      expected:
        - {on: 1x A10G 24 GB, tokens_per_s: 5200, peak_memory_gib: 19.5, final_loss: 1.1, tolerance: 0.5}
    defaults:
      - override /method: lora
    train: {epochs: 2}

`meta` is never a run key: it is taken out before the recipe reaches Hydra (registry.register)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from fttool.errors import UserError, suggestion

SCHEMA = 2  # the recipe schema this fttool reads; a recipe without meta.schema is taken to be this one
META = "meta"
META_FIELDS = {
    "schema": "the recipe schema version it was written for (an integer; unset = the current one)",
    "description": "one line: what the recipe trains",
    "owner": "the team or person to ask about it",
    "hardware": "the hardware it expects, free text (e.g. 1x GPU with 24 GB)",
    "expected": "expected results: a list of {on, tokens_per_s, peak_memory_gib, final_loss, tolerance}",
}
FIGURES = ("tokens_per_s", "peak_memory_gib", "final_loss")
EXPECTED_FIELDS = ("on",) + FIGURES + ("tolerance",)
DEFAULT_TOLERANCE = 0.5


# -- migrations ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Migration:
    """An old key and what replaced it. `write` is the replacement's value, {value} standing for the old value."""

    new: str  # the key that replaced it
    write: str  # the replacement value, e.g. "{{messages: {value}}}"
    schema: int  # the recipe schema in which it changed
    how: str = "was replaced by"
    only: Optional[str] = None  # only this old value is a migration (eval.samples: 0 meant "skip the evaluation")
    meaning: str = ""  # what `only` meant

    def message(self, key: str, value: Any, in_file: bool = False) -> str:
        text = self.write.format(value=_shown(value))
        if in_file:  # the replacement as the recipe writes it: data: {template: chatml}
            first, *rest = self.new.split(".")
            nested = text
            for part in reversed(rest):
                nested = f"{{{part}: {nested}}}"
            replacement = f"{first}: {nested}"
        else:
            replacement = f"{self.new}={text}"
        old = f"{key}={self.only}{self.meaning}" if self.only is not None else key
        return f"{old} {self.how} {self.new} in recipe schema {self.schema}: write {replacement}"


# old key -> its migration (git history of fttool/config/spec.py: 916601c for data.*, 60af71d for eval.samples)
MIGRATIONS: Dict[str, Migration] = {
    "data.chat_template": Migration("data.template", "{value}", 2, how="was renamed"),
    "data.messages_field": Migration("data.columns", "{{messages: {value}}}", 2),
    "data.text_field": Migration("data.columns", "{{text: {value}}}", 2),
    "eval.samples": Migration("eval.after_training", "false", 2, only="0", meaning=" (skip the evaluation)"),
}


def _shown(value: Any) -> str:
    text = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    if "\n" in text or len(text) > 80:
        return "<the same value>"
    return text if re.fullmatch(r"[\w./:@+-]*", text) and text else f"'{text}'"


def migration(key: str, value: Any, in_file: bool = False) -> Optional[str]:
    """The message for an old key (with this value), or None when the key is current."""
    row = MIGRATIONS.get(key)
    if row is None or (row.only is not None and str(value).strip("'\"") != row.only):
        return None
    return row.message(key, value, in_file)


# -- the file ----------------------------------------------------------------------------------------------------
def flatten(tree: Any, prefix: str = "", leaves=()) -> Dict[str, Any]:
    """{dotted key: value} of a nested mapping; the keys in `leaves` (open mappings like data.columns) stay whole."""
    out: Dict[str, Any] = {}
    for k, v in (tree or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in leaves:
            out.update(flatten(v, key + ".", leaves))
        else:
            out[key] = v
    return out


def group_choices(tree: Dict[str, Any]) -> Dict[str, str]:
    """group -> option of each `override /group: option` (or `group: option`) in a recipe's defaults list."""
    out = {}
    for entry in tree.get("defaults") or []:
        if isinstance(entry, dict):
            for k, option in entry.items():
                out[str(k).replace("override", "").strip().lstrip("/")] = str(option)
    return out


def meta_of(tree: Any) -> Any:
    """A recipe's `meta:` header (None when it has none). YAML 1.1 reads an unquoted `on:` key as true: it is read
    back as `on` here."""
    meta = tree.get(META) if isinstance(tree, dict) else None
    if isinstance(meta, dict) and isinstance(meta.get("expected"), list):
        meta = dict(meta)
        meta["expected"] = [
            {("on" if k is True else k): v for k, v in e.items()} if isinstance(e, dict) else e
            for e in meta["expected"]
        ]
    return meta


def check_file(path, tree: Dict[str, Any]) -> None:
    """A recipe's meta header is valid, it was written for this fttool's schema or an older one, and it sets no key
    an older schema had (UserError naming the file, the field or key, and the fix)."""
    meta = meta_of(tree)
    if isinstance(meta, dict) and isinstance(meta.get("schema"), int) and meta["schema"] > SCHEMA:
        raise UserError(
            f"recipe {path} was written for a newer fttool (schema {meta['schema']} > {SCHEMA}): upgrade fttool "
            "(pip install -U fttool), or ask its owner for a schema-2 version."
        )
    if meta is not None:
        check_meta(path, meta)
    for key, value in flatten({k: v for k, v in tree.items() if k not in ("defaults", META)}).items():
        problem = migration(key, value, in_file=True)
        if problem:
            raise UserError(f"recipe {path}: {problem}.")


def check_meta(path, meta: Any) -> None:
    def bad(field: str, why: str):
        raise UserError(f"recipe {path}: meta.{field}: {why}.")

    if not isinstance(meta, dict):
        raise UserError(f"recipe {path}: meta must be a mapping of {', '.join(META_FIELDS)}; got {meta!r}.")
    for field, value in meta.items():
        if field not in META_FIELDS:
            bad(field, f"not a meta field.{suggestion(field, META_FIELDS, 'meta.{}')} Fields: {', '.join(META_FIELDS)}")
        if field == "schema" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            bad(
                field,
                f"expected the schema version as a whole number >= 1 (this fttool writes {SCHEMA}), got {value!r}",
            )
        if field in ("description", "owner", "hardware") and (not isinstance(value, str) or "\n" in value):
            bad(field, f"expected one line of text, got {value!r}")
    expected = meta.get("expected")
    if expected is None:
        return
    if not isinstance(expected, list):
        bad("expected", "expected a list of {on: HARDWARE, tokens_per_s: N, peak_memory_gib: X, final_loss: Y}")
    for i, entry in enumerate(expected):
        where = f"expected[{i}]"
        if not isinstance(entry, dict):
            bad(where, f"expected a mapping of {', '.join(EXPECTED_FIELDS)}, got {entry!r}")
        for field, value in entry.items():
            if field not in EXPECTED_FIELDS:
                hint = suggestion(field, EXPECTED_FIELDS, f"meta.{where}.{{}}")
                bad(
                    f"{where}.{field}", f"not a field of an expected result.{hint} Fields: {', '.join(EXPECTED_FIELDS)}"
                )
            if field in FIGURES and (not _number(value) or value <= 0):
                bad(f"{where}.{field}", f"expected a number > 0, got {value!r}")
        if not isinstance(entry.get("on"), str) or not entry["on"].strip():
            bad(f"{where}.on", "name the hardware these figures were measured on (e.g. on: 1x A100 80 GB)")
        tol = entry.get("tolerance", DEFAULT_TOLERANCE)
        tols = tol if isinstance(tol, dict) else {f: tol for f in FIGURES}
        for field, value in tols.items():
            if field not in FIGURES:
                bad(
                    f"{where}.tolerance.{field}",
                    f"not a figure.{suggestion(field, FIGURES)} Figures: {', '.join(FIGURES)}",
                )
            if not _number(value) or not 0 <= value <= 1:
                bad(f"{where}.tolerance", f"expected a fraction from 0 to 1 (0.5 = within 50%), got {value!r}")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# -- expected results ---------------------------------------------------------------------------------------------
def measured(result: Dict[str, Any]) -> Dict[str, Optional[float]]:
    """A run's figures from its result.json: tokens/s, peak memory (GPU memory reserved at the peak on CUDA, else the
    process's peak RSS) and the last logged training loss."""
    peak = result.get("peak_memory") or {}
    return {
        "tokens_per_s": result.get("tokens_per_s"),
        "peak_memory_gib": peak.get("gpu_reserved_gib", peak.get("peak_rss_gib")),
        "final_loss": result.get("last_loss", result.get("train_loss")),
    }


def check_expected(meta_entry: Dict[str, Any], result: Dict[str, Any]) -> List[str]:
    """What in a run's result.json falls outside one `meta.expected` entry ([] = within). tokens_per_s is a lower
    bound (at least (1 - tolerance) x the figure: a loaded machine is slower, a faster one is fine); peak_memory_gib
    and final_loss must be within tolerance x the figure either way. `tolerance` is one fraction for every figure
    or a mapping figure -> fraction; unset = 0.5."""
    tol = meta_entry.get("tolerance", DEFAULT_TOLERANCE)
    got = measured(result)
    problems = []
    for figure in FIGURES:
        want = meta_entry.get(figure)
        if want is None:
            continue
        t = tol.get(figure, DEFAULT_TOLERANCE) if isinstance(tol, dict) else tol
        value = got[figure]
        on = f" (measured on {meta_entry.get('on', '?')})"
        if value is None:
            problems.append(f"{figure}: the result has no figure; expected {want:g}{on}")
        elif figure == "tokens_per_s" and value < want * (1 - t):
            problems.append(f"{figure}: {value:.4g} is below {1 - t:g} x the expected {want:g}{on}")
        elif figure != "tokens_per_s" and abs(value - want) > t * want:
            problems.append(f"{figure}: {value:.4g} is not within {t:.0%} of the expected {want:g}{on}")
    return problems


__all__ = ["SCHEMA", "MIGRATIONS", "check_file", "check_meta", "check_expected", "measured", "migration"]
