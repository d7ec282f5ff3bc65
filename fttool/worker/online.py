"""The Trainers of the online objectives, with fttool's trusted checkpoints and non-finite guard.

GRPO is TRL's GRPOTrainer on fttool's prompt features (data/features.py PROMPTS): each prompt is rendered with the
run's template and tokenized once by fttool (counted by the length policy), and generation starts from exactly
those ids; TRL's own tokenization of the prompt text is not used. Rewards come from fttool/rewards.py, each
checked (a reward that raises or returns None/NaN stops the run, exit 4). The reference model is the
adapter-disabled base for LoRA/QLoRA and TRL's frozen copy for a full fine-tune; objective.beta=0 loads none.
Prompts are left-padded (TRL's layout); the attention masks are repaired so pad positions never give NaN on CUDA.

Generation randomness belongs to the completion, not to the process (worker/sampling.py): each completion is drawn
with its own generator, seeded from (seed, optimizer step, the prompt's ids, which of that prompt's completions it
is in the global batch). So 2 processes sample the completions 1 process samples at the same global batch and
seed, and a resumed run samples what the uninterrupted one did (vLLM, when used, samples with its own seed).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Dict, List

from accelerate.utils import gather_object
from trl import GRPOTrainer

from fttool.after.attention import no_fully_masked_rows
from fttool.worker.guard import GuardedTrainer
from fttool.worker.lm_head import HeadCheck
from fttool.worker.safe_trainer import TrustedCheckpoints
from fttool.worker.sampling import SeededRows, row_seeds

log = logging.getLogger("fttool")


class GrpoRunTrainer(HeadCheck, TrustedCheckpoints, GuardedTrainer, GRPOTrainer):
    """TRL's GRPOTrainer on fttool's prompts, checkpoints and guard."""

    def __init__(self, *args, reward_funcs, data_collator=None, **kwargs):
        # TRL batches prompts itself (its own collator); fttool's prompt collator is for inference only
        super().__init__(*args, reward_funcs=reward_funcs, **kwargs)
        self._prompt_ids: Dict[str, List[int]] = {}
        for ds in (kwargs.get("train_dataset"), kwargs.get("eval_dataset")):
            if ds is not None:
                self._prompt_ids.update(zip(ds["prompt"], ds["input_ids"]))

    # TRL pads prompts on the left, for generation and for the forward passes of the loss (prompt, then completion):
    # on CUDA the pad positions' fully masked attention rows give NaN, which reaches every token through 0 x NaN.
    # The masks are repaired for both (a row that admits no key admits every key; no real token attends to a pad).
    def training_step(self, *args, **kwargs):
        with no_fully_masked_rows():
            return super().training_step(*args, **kwargs)

    def prediction_step(self, *args, **kwargs):
        with no_fully_masked_rows():
            return super().prediction_step(*args, **kwargs)

    def _tokenize_prompts(self, prompts: list):
        """The ids fttool rendered and counted for each prompt (no second tokenization, no BOS added twice)."""
        missing = [p for p in prompts if p not in self._prompt_ids]
        if missing:  # never expected: every prompt comes from the datasets above
            return super()._tokenize_prompts(prompts)
        return [list(self._prompt_ids[p]) for p in prompts], None, {}

    def _generate_single_turn(self, prompt_ids, *args, **kwargs):
        if self.use_vllm or self.use_transformers_continuous_batching:
            return super()._generate_single_turn(prompt_ids, *args, **kwargs)
        with self._seeded_rows(prompt_ids):
            return super()._generate_single_turn(prompt_ids, *args, **kwargs)

    @contextlib.contextmanager
    def _seeded_rows(self, prompt_ids):
        """generate() draws each completion with its own generator (see the module docstring) for this call."""
        per_process = gather_object([[list(map(int, ids)) for ids in prompt_ids]])  # each process's rows, in order
        every = [row for rows in per_process for row in rows]
        first = sum(len(rows) for rows in per_process[: self.accelerator.process_index])
        seeds = row_seeds(self.args.seed, self.state.global_step, every, first, len(prompt_ids))
        g = self.generation_config
        sampler = SeededRows(seeds, self.accelerator.device, g.max_new_tokens, g.temperature, g.top_k, g.top_p, g.min_p)
        model = self.accelerator.unwrap_model(self.model_wrapped)
        generate = model.generate
        model.generate = lambda *a, **kw: generate(*a, logits_processor=[sampler], **kw)
        try:
            yield
        finally:
            del model.generate
