"""What the training optimises: one object per objective, answering what differs between them.

An objective owns its keys (a schema in spec.py), the features its rows become (data/features.py: sequences, pairs
or prompts, each with its columns, length unit, collator and what counts as trained), its extra TrainingArguments,
the learning rate it defaults to, the metrics its progress line shows and its rules against the rest of the spec.
The Trainer and arguments classes that run it are the worker's (worker/trainers.py, one row per objective). The
worker assembles these answers; nothing switches on an objective's name. A new objective is one row of OBJECTIVES,
a schema, one conf/objective/*.yaml and a row of worker/trainers.py (docs/ARCHITECTURE.md, "Adding an objective").
Light: no torch at module level.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from fttool.config import devices
from fttool.config.spec import DpoSpec, GrpoSpec, KtoSpec, OrpoSpec, SftSpec, world_size
from fttool.data.features import LABELED, PAIRS, PROMPTS, SEQUENCES, Features
from fttool.errors import UserError, suggestion

DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust")
GRPO_LOSSES = ("grpo", "dapo", "dr_grpo", "bnpo")
KTO_LOSSES = ("kto", "apo_zero_unpaired")
# objective.* keys that are GRPOConfig's own, under the same names
GRPO_ARGS = (
    "num_generations",
    "max_completion_length",
    "temperature",
    "top_p",
    "beta",
    "loss_type",
    "importance_sampling_level",
    "epsilon",
    "epsilon_high",
    "scale_rewards",
    "mask_truncated_completions",
    "use_vllm",
)
GRPO_CHOICES = {
    "loss_type": GRPO_LOSSES,
    "importance_sampling_level": ("token", "sequence"),
    "scale_rewards": ("group", "batch", "none"),
}


@dataclass(frozen=True)
class Objective:
    """Supervised fine-tuning: next-token loss on the trained tokens."""

    name: str
    schema: type  # the dataclass of its keys (spec.py)
    about: str  # one line for `fttool check`, the README and the model card
    features: Features = SEQUENCES  # what a row becomes (data/features.py)
    reference: bool = False  # scores against a frozen reference model (a forward per step unless precomputed)
    lr_full: Optional[float] = None  # train.lr when unset; None = the method's default_lr
    lr_adapter: Optional[float] = None
    progress: Tuple[Tuple[str, str], ...] = ()  # (metric key, label) shown on the progress line after the loss

    def default_lr(self, adapter: bool) -> Optional[float]:
        return self.lr_adapter if adapter else self.lr_full

    def uses_reference(self, o) -> bool:
        """Whether a run scores against a frozen reference model every step (the planner's figures)."""
        return self.reference and not getattr(o, "precompute_ref_log_probs", False)

    def completion_tokens(self, o) -> int:
        """Tokens the model generates per row before it trains on them (0: it trains on the data's own)."""
        return 0

    def samples_per_row(self, o) -> int:
        """Training samples one data row becomes per epoch (GRPO: one per completion sampled for its prompt)."""
        return 1

    def describe(self, o) -> str:
        return self.about

    def extra_args(self, o) -> Dict:
        """TrainingArguments beyond the ones every run sets."""
        return {}

    def trainer_kwargs(self, spec) -> Dict:
        return {}

    def derive(self, cfg) -> None:
        """Fill in what its keys leave to be derived from the rest of the config (after the checks)."""

    def check(self, cfg, formats: List[str]) -> None:
        """Rules against the rest of the composed config (formats: each data source's format). Keys of another
        objective never get here: its schema refuses them when the config is composed."""
        if "unpaired" in formats and self.features is not LABELED:
            raise UserError(
                f"data.format=unpaired rows are labelled desirable or not; objective={self.name} would train on the "
                "undesirable ones too. Use objective=kto (or keep only the desirable rows for sft)."
            )


@dataclass(frozen=True)
class Preference(Objective):
    """A preference objective: trained on (prompt, chosen, rejected) pairs, each reply scored on its own tokens."""

    features: Features = PAIRS

    def check(self, cfg, formats: List[str]) -> None:
        other = sorted({f for f in formats if f != "preference"})
        if other:
            raise UserError(
                f"objective={self.name} trains on preference pairs, but the data is data.format={other[0]}; use "
                "data=preference data.path=PAIRS (rows of prompt, chosen, rejected), or objective=sft."
            )
        if cfg.data.packing != "none":
            raise UserError(
                f"objective={self.name} with data.packing={cfg.data.packing}: a chosen and a rejected reply are "
                "scored as two padded sequences of one batch, so they cannot be packed; use data.packing=none."
            )
        if cfg.data.train_on_inputs:
            raise UserError(
                f"objective={self.name} with data.train_on_inputs=true: a preference objective compares the two "
                "replies only; drop data.train_on_inputs."
            )
        o = cfg.objective
        if not o.beta > 0:
            raise UserError(f"objective.beta={o.beta} is out of range; expected a number > 0 (common: 0.1).")


@dataclass(frozen=True)
class Dpo(Preference):
    def describe(self, o) -> str:
        ref = ", reference log-probs precomputed once" if o.precompute_ref_log_probs else ""
        return f"{self.about}: beta {o.beta:g}, loss {o.loss_type}{ref}"

    def extra_args(self, o) -> Dict:
        return dict(
            beta=o.beta,
            loss_type=[o.loss_type],
            label_smoothing=o.label_smoothing,
            precompute_ref_log_probs=o.precompute_ref_log_probs,
            max_length=None,  # fttool's length policy already applied (data.max_length, counted)
            disable_dropout=True,
        )

    def trainer_kwargs(self, spec) -> Dict:
        return reference_adapter(spec)

    def check(self, cfg, formats: List[str]) -> None:
        super().check(cfg, formats)
        o = cfg.objective
        if o.loss_type not in DPO_LOSSES:
            raise UserError(
                f"objective.loss_type={o.loss_type} is not allowed; expected one of: {', '.join(DPO_LOSSES)}."
                f"{suggestion(o.loss_type, DPO_LOSSES, '{}')}"
            )
        if not 0 <= o.label_smoothing < 0.5:
            raise UserError(f"objective.label_smoothing={o.label_smoothing} is out of range; expected [0, 0.5).")


@dataclass(frozen=True)
class Orpo(Preference):
    def describe(self, o) -> str:
        return f"{self.about}: beta (lambda) {o.beta:g}"

    def trainer_kwargs(self, spec) -> Dict:
        return {"beta": spec.objective.beta}


@dataclass(frozen=True)
class Kto(Objective):
    """KTO through TRL's KTOTrainer on fttool's labelled sequences."""

    features: Features = LABELED

    def describe(self, o) -> str:
        return (
            f"{self.about}: beta {o.beta:g}, desirable x{o.desirable_weight:g}, undesirable x{o.undesirable_weight:g}"
            f", loss {o.loss_type}"
        )

    def extra_args(self, o) -> Dict:
        return dict(
            beta=o.beta,
            desirable_weight=o.desirable_weight,
            undesirable_weight=o.undesirable_weight,
            loss_type=o.loss_type,
            max_length=None,  # fttool's length policy already applied (data.max_length, counted)
            train_sampling_strategy="sequential",  # KL pairs are built per batch; fttool shuffles the rows itself
            disable_dropout=True,
        )

    def trainer_kwargs(self, spec) -> Dict:
        return reference_adapter(spec)

    def check(self, cfg, formats: List[str]) -> None:
        o = cfg.objective
        other = sorted({f for f in formats if f != "unpaired"})
        if other:
            raise UserError(
                f"objective={self.name} trains on replies labelled desirable or not, but the data is "
                f"data.format={other[0]}; use data=unpaired data.path=ROWS (rows of prompt, completion, label)."
            )
        if cfg.data.packing != "none":
            raise UserError(f"objective={self.name} with data.packing={cfg.data.packing}: use data.packing=none.")
        if cfg.data.train_on_inputs:
            raise UserError(f"objective={self.name} scores the completion only; drop data.train_on_inputs.")
        if o.loss_type not in KTO_LOSSES:
            raise UserError(
                f"objective.loss_type={o.loss_type} is not allowed; expected one of: {', '.join(KTO_LOSSES)}."
                f"{suggestion(o.loss_type, KTO_LOSSES, '{}')}"
            )
        if not (o.beta > 0 and o.desirable_weight > 0 and o.undesirable_weight > 0):
            raise UserError("objective.beta, desirable_weight and undesirable_weight must be > 0.")
        if o.loss_type == "kto" and cfg.train.batch_size < 2:
            raise UserError(
                "objective=kto estimates its KL term from the other rows of a batch: train.batch_size >= 2."
            )


@dataclass(frozen=True)
class Grpo(Objective):
    """GRPO and its loss variants (DAPO, Dr. GRPO, GSPO) through TRL's GRPOTrainer, on prompts."""

    features: Features = PROMPTS

    def uses_reference(self, o) -> bool:
        return o.beta > 0

    def completion_tokens(self, o) -> int:
        return o.max_completion_length

    def samples_per_row(self, o) -> int:
        return o.num_generations

    def describe(self, o) -> str:
        rewards = ", ".join(f"{n} x{w:g}" for n, w in o.rewards.items())
        if o.reward_code:
            rewards += f"{', ' if rewards else ''}{o.reward_code} x{o.reward_code_weight:g}"
        kl = f"KL beta {o.beta:g}" if o.beta else "no reference model (beta 0)"
        level = ", sequence-level ratios (GSPO)" if o.importance_sampling_level == "sequence" else ""
        return (
            f"{self.about}: {o.num_generations} completions per prompt of at most {o.max_completion_length} tokens "
            f"(temperature {o.temperature:g}), loss {o.loss_type}{level}, {kl}; rewards {rewards}"
        )

    def derive(self, cfg) -> None:
        o = cfg.objective
        if not o.rewards and not o.reward_code:
            o.rewards = {"numeric_answer": 1.0}  # the GSM8K-style default

    def extra_args(self, o) -> Dict:
        return dict(
            {k: getattr(o, k) for k in GRPO_ARGS},
            reward_weights=rewards_weights(o),
            vllm_mode="colocate",
            log_completions=False,
            shuffle_dataset=True,
        )

    def trainer_kwargs(self, spec) -> Dict:
        """The reward functions, each checked; the user's code is imported here, in the run the command line started."""
        from fttool import rewards

        o = spec.objective
        user = rewards.load_code(o.reward_code) if o.reward_code else None
        return {"reward_funcs": rewards.functions(o, spec.data, user)}

    def check(self, cfg, formats: List[str]) -> None:
        from fttool import rewards

        o, t = cfg.objective, cfg.train
        text = sorted({f for f in formats if f in ("completion", "segments")})
        if text:
            raise UserError(
                f"objective={self.name} generates answers to prompts, but data.format={text[0]} rows have no prompt; "
                "use chat-like rows (chat, sharegpt, alpaca, prompt: a conversation ending with the user's turn, or a "
                "prompt with its reference answer)."
            )
        for key, allowed in GRPO_CHOICES.items():
            if o[key] not in allowed:
                raise UserError(
                    f"objective.{key}={o[key]} is not allowed; expected one of: {', '.join(allowed)}."
                    f"{suggestion(str(o[key]), allowed, '{}')}"
                )
        problem = rewards.names_problem(list(o.rewards))
        if problem:
            raise UserError(problem)
        if o.num_generations < 2:
            raise UserError(
                f"objective.num_generations={o.num_generations}: GRPO compares completions within a "
                "group; use at least 2 (common: 8)."
            )
        if o.max_completion_length < 1 or not 0 < o.top_p <= 1 or o.temperature <= 0 or o.beta < 0 or o.epsilon <= 0:
            raise UserError(
                "objective: max_completion_length >= 1, 0 < top_p <= 1, temperature > 0, beta >= 0 and "
                "epsilon > 0 are required."
            )
        per_step = t.batch_size * world_size(cfg.hardware) * t.grad_accum
        if per_step % o.num_generations:
            raise UserError(
                f"objective.num_generations={o.num_generations} must divide the completions of one optimizer step "
                f"(train.batch_size {t.batch_size} x {world_size(cfg.hardware)} processes x train.grad_accum "
                f"{t.grad_accum} = {per_step}); e.g. train.batch_size={o.num_generations}."
            )
        if cfg.data.packing != "none":
            raise UserError(
                f"objective={self.name} with data.packing={cfg.data.packing}: prompts are generated from "
                "one by one; use data.packing=none."
            )
        if o.use_vllm:
            if not devices.of(cfg.hardware).gpu:
                raise UserError(
                    "objective.use_vllm=true needs a CUDA GPU (vLLM does not run on the CPU); generation "
                    "with transformers runs everywhere: drop objective.use_vllm."
                )
            import importlib.util

            if importlib.util.find_spec("vllm") is None:
                raise UserError(
                    "objective.use_vllm=true: vllm is not installed (pip install vllm); or drop the key "
                    "to generate with transformers."
                )


def reference_adapter(spec) -> Dict:
    """Continuing an earlier run's adapter: TRL's frozen copy of it ("ref") is the reference (the SFT policy)."""
    return {"keep_ref_adapter": bool(spec.model.parent_adapter) and spec.model.from_run_adapter == "continue"}


def rewards_weights(o) -> List[float]:
    return [float(w) for w in o.rewards.values()] + ([float(o.reward_code_weight)] if o.reward_code else [])


PREFERENCE_PROGRESS = (
    ("rewards/accuracies", "acc"),
    ("rewards/margins", "margin"),
)
OBJECTIVES: Dict[str, Objective] = {
    o.name: o
    for o in (
        Objective("sft", SftSpec, "supervised: next-token loss on the trained tokens"),
        Dpo(
            "dpo",
            DpoSpec,
            "DPO: prefer the chosen reply over the rejected one relative to a frozen reference (TRL DPOTrainer)",
            reference=True,
            lr_full=5e-7,
            lr_adapter=5e-6,
            progress=PREFERENCE_PROGRESS,
        ),
        Orpo(
            "orpo",
            OrpoSpec,
            "ORPO: the chosen reply's loss plus an odds-ratio preference term, no reference model",
            lr_full=8e-6,
            lr_adapter=8e-5,
            progress=PREFERENCE_PROGRESS,
        ),
        Kto(
            "kto",
            KtoSpec,
            "KTO: raise desirable replies and lower undesirable ones relative to a frozen reference (TRL KTOTrainer)",
            reference=True,
            lr_full=5e-7,
            lr_adapter=5e-6,
            progress=(("rewards/chosen", "desirable"), ("rewards/rejected", "undesirable"), ("kl", "kl")),
        ),
        Grpo(
            "grpo",
            GrpoSpec,
            "GRPO: sample completions per prompt, reward them, raise the better ones' likelihood (TRL GRPOTrainer)",
            lr_full=1e-6,
            lr_adapter=1e-5,
            progress=(("reward", "reward"), ("reward_std", "reward_std"), ("completions/mean_length", "len")),
        ),
    )
}
NAMES = tuple(OBJECTIVES)
SCHEMAS: Dict[str, type] = {n: o.schema for n, o in OBJECTIVES.items()}


def of(spec_or_objective) -> Objective:
    """The objective object of a spec (or of its `objective` section)."""
    o = getattr(spec_or_objective, "objective", spec_or_objective)
    return OBJECTIVES[o.name]
