"""The Trainers of the preference objectives (DPO, ORPO, KTO), with fttool's trusted checkpoints and non-finite guard.

- DPO is TRL's DPOTrainer. fttool hands it batches it already tokenized and masked (`data.pack.PairCollator`:
  chosen rows then rejected rows, `completion_mask` = the tokens SFT would train), so TRL's own prompt/completion
  split is not used. The reference is the adapter-disabled base for LoRA/QLoRA (no second model in memory) and a
  frozen copy of the starting weights for a full fine-tune (TRL loads it), or log-probs precomputed once
  (objective.precompute_ref_log_probs=true).
- ORPO (Hong et al. 2024) is the chosen reply's mean next-token loss minus beta x log sigmoid of the log odds ratio
  of the two replies' mean token log-probs, on the same batches; no reference model. TRL's ORPO trainer re-tokenizes
  the data itself and scores the prompt too, so its loss is written here on fttool's masks, in TRL's form.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import torch
import torch.nn.functional as F
from trl import DPOTrainer, KTOTrainer

from fttool.data.tokenize import IGNORE
from fttool.worker.guard import GuardedTrainer
from fttool.worker.lm_head import HeadCheck
from fttool.worker.safe_trainer import RunTrainer, TrustedCheckpoints

log = logging.getLogger("fttool")


class ReferenceAdapter:
    """TRL's DPO and KTO Trainers copy an adapter the model already carries into a frozen "ref" adapter. fttool's
    adapter is new (zero-initialised B), so that copy equals the base: it is dropped and the reference scored with
    the adapter disabled, as TRL does for an adapter it creates itself. Continuing an earlier run's adapter
    (keep_ref_adapter) keeps the copy: the reference is that adapter as it was (the SFT policy)."""

    def __init__(self, *args, keep_ref_adapter: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        model = self.accelerator.unwrap_model(self.model)
        if "ref" in getattr(model, "peft_config", {}) and not keep_ref_adapter:
            model.delete_adapter("ref")
            model.set_adapter("default")


class DpoRunTrainer(ReferenceAdapter, HeadCheck, TrustedCheckpoints, GuardedTrainer, DPOTrainer):
    """TRL's DPOTrainer on fttool's pairs, checkpoints and guard."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset  # tokenized, masked and length-checked by fttool.data (counted in data.json)


class KtoRunTrainer(ReferenceAdapter, HeadCheck, TrustedCheckpoints, GuardedTrainer, KTOTrainer):
    """TRL's KTOTrainer on fttool's labelled sequences (data/features.py LABELED), checkpoints and guard. Each row's
    prompt is its tokens before the first trained one and its completion the trained span (the reply and the token
    closing its turn, as SFT masks it); the template's tail after the turn is not scored."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        def split(row):
            trained = [i for i, x in enumerate(row["labels"]) if x != IGNORE]
            a, b = trained[0], trained[-1] + 1
            return {
                "prompt_ids": row["input_ids"][:a],
                "completion_ids": row["input_ids"][a:b],
                "label": bool(row["label"]),
            }

        dataset = dataset.map(split, remove_columns=dataset.column_names)
        if dataset_name == "train":
            # KTO's KL term pairs each prompt with another row's completion inside a fixed-order batch, so the Trainer
            # samples in order: the order is shuffled here, with the run's seed
            dataset = dataset.shuffle(seed=args.seed).flatten_indices()
        if self.calculate_KL:
            size = args.per_device_train_batch_size

            def rotate(batch):
                batch["KL_completion_ids"] = [batch["completion_ids"][-1]] + batch["completion_ids"][:-1]
                return batch

            dataset = dataset.map(rotate, batched=True, batch_size=size)
        return dataset


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends."""
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def mean_reply_logps(model, batch, chunked: bool = False) -> tuple:
    """(mean token log-prob of each sequence's scored tokens, the summed log-probs, the scored-token counts);
    `chunked`: through the chunked LM head, over the scored tokens only (worker/chunked_loss.py)."""
    if chunked:
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        out = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], chunked_labels=labels, use_cache=False
        )
        summed = out.log_probs.sum(dim=1)  # zero where not scored
        counts = out.label_mask.sum(dim=1).clamp(min=1).to(summed.dtype)
        return summed / counts, summed, counts
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    logits = out.logits[:, :-1].float()
    targets = batch["input_ids"][:, 1:]
    scored = batch["completion_mask"][:, 1:].to(logits.dtype)
    token_logps = torch.gather(logits, 2, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    summed = (token_logps * scored).sum(dim=1)
    counts = scored.sum(dim=1).clamp(min=1)
    return summed / counts, summed, counts


def orpo_loss(chosen_mean, rejected_mean, chosen_nll, beta: float):
    """ORPO: NLL(chosen) - beta * mean(log sigmoid(log odds(chosen) - log odds(rejected))); log odds from the mean
    token log-probs. Returns (loss, per-pair log odds ratio)."""
    log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))
    return chosen_nll - beta * F.logsigmoid(log_odds).mean(), log_odds


class OrpoRunTrainer(RunTrainer):
    """ORPO on fttool's pairs (PairCollator batches), checkpoints and guard."""

    def __init__(self, *args, beta: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.beta = beta
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mean, summed, counts = mean_reply_logps(model, inputs, self.chunked_head)
        chosen, rejected = mean.chunk(2)
        chosen_sum, _ = summed.chunk(2)
        chosen_count, _ = counts.chunk(2)
        nll = -chosen_sum.sum() / chosen_count.sum()
        loss, log_odds = orpo_loss(chosen, rejected, nll, self.beta)
        mode = "train" if model.training else "eval"
        gather = self.accelerator.gather_for_metrics
        with torch.no_grad():
            c, r, lo = gather(chosen.detach()), gather(rejected.detach()), gather(log_odds.detach())
            m = self._metrics[mode]
            m["rewards/chosen"].append((self.beta * c).mean().item())
            m["rewards/rejected"].append((self.beta * r).mean().item())
            m["rewards/accuracies"].append((c > r).float().mean().item())
            m["rewards/margins"].append((self.beta * (c - r)).mean().item())
            m["log_odds_ratio"].append(lo.mean().item())
            m["nll_loss"].append(gather(nll.detach()).mean().item())
        return (loss, {"logits": None}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs, start_time=None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = {k: sum(v) / len(v) for k, v in self._metrics[mode].items() if v}
        if mode == "eval":
            metrics = {f"eval_{k}": v for k, v in metrics.items()}
        logs.update(metrics)
        super().log(logs, start_time)
        self._metrics[mode].clear()
