"""Data: what the rest of fttool asks of it, behind one small face.

- pipeline.py: read rows -> normalise -> split -> weight -> encode as the objective's features -> length policy ->
  cache (`prepare_datasets`), and what differs between a run's data and its resumption (`drift`).
- features.py: what a row becomes (sequences, pairs, prompts) and the length policy's rule for one sequence.
- heldout.py: the held-out test rows and prompts as training renders them, for evaluation and generation.
- dump.py: `fttool preview output=FILE.jsonl`, every row's mask.
- formats.py (row formats), sources.py (files and globs), tokenize.py and token_text.py (render, tokenize, mask),
  templates.py, cache.py, pack.py (batches), stats.py, preview.py.
"""

from fttool.data.dump import mask_dump
from fttool.data.features import FEATURES, NO_TRAINED_WHY, fate
from fttool.data.heldout import eval_example, prompt_ids, test_rows
from fttool.data.pipeline import Prepared, drift, prepare_datasets, sources_of, training_template
from fttool.data.stats import DataStats
from fttool.data.tokenize import IGNORE, Encoder

__all__ = [
    "prepare_datasets",
    "drift",
    "prompt_ids",
    "mask_dump",
    "fate",
    "FEATURES",
    "NO_TRAINED_WHY",
    "test_rows",
    "eval_example",
    "DataStats",
    "Prepared",
    "IGNORE",
    "Encoder",
    "sources_of",
    "training_template",
]
