"""The worker's half of an objective's row (config/objectives.py owns the rest): the Trainer class that runs it and
its TrainingArguments class. Imported here, inside one function per objective, so a run pays only for its own
(TRL only for DPO, KTO and GRPO) and the architecture test sees every edge."""

from __future__ import annotations

from typing import Callable, Dict, Tuple


def _sft() -> Tuple[type, type]:
    from transformers import TrainingArguments

    from fttool.worker.safe_trainer import RunTrainer

    return RunTrainer, TrainingArguments


def _dpo() -> Tuple[type, type]:
    from trl import DPOConfig

    from fttool.worker.preference import DpoRunTrainer

    return DpoRunTrainer, DPOConfig


def _orpo() -> Tuple[type, type]:
    from transformers import TrainingArguments

    from fttool.worker.preference import OrpoRunTrainer

    return OrpoRunTrainer, TrainingArguments


def _grpo() -> Tuple[type, type]:
    from trl import GRPOConfig

    from fttool.worker.online import GrpoRunTrainer

    return GrpoRunTrainer, GRPOConfig


def _kto() -> Tuple[type, type]:
    from trl import KTOConfig

    from fttool.worker.preference import KtoRunTrainer

    return KtoRunTrainer, KTOConfig


CLASSES: Dict[str, Callable[[], Tuple[type, type]]] = {
    "sft": _sft,
    "dpo": _dpo,
    "orpo": _orpo,
    "grpo": _grpo,
    "kto": _kto,
}


def trainer_class(spec) -> type:
    return CLASSES[spec.objective.name]()[0]


def arguments_class(spec) -> type:
    return CLASSES[spec.objective.name]()[1]
