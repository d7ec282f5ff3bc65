"""Activation checkpointing (train.gradient_checkpointing, worker/checkpointing.py): selective checkpointing keeps
the matmuls' and attention's outputs and recomputes the rest; its gradients equal those without checkpointing
(LoRA dropout included: the recomputation draws the same masks), it keeps less than no checkpointing and more than
full checkpointing, and the config, plan and Trainer see the three kinds."""

import functools

import pytest
import torch

from conftest import run_cli_here
from fttool.worker import checkpointing


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    # hidden 128: the projections' inner dimension reaches checkpointing.KEEP_INNER_DIM, a LoRA's B (rank 4) does not
    cfg = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    return LlamaForCausalLM(cfg).float()


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 300, (3, 40), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0  # padded rows: attention takes a mask
    mask[2, 12:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def use(model, mode):
    """The model in training mode with train.gradient_checkpointing=mode, as the Trainer sets it."""
    kw = checkpointing.trainer_kwargs(mode)
    if kw["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw["gradient_checkpointing_kwargs"])
    else:
        model.gradient_checkpointing_disable()
    model.train()


def gradients(model, mode, b):
    """Loss and gradients of one training step with train.gradient_checkpointing=mode; dropout draws from seed 7."""
    use(model, mode)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    loss = model(**b).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def saved_bytes(model, mode, b):
    """What the forward keeps for backward: the process's tensors alive after forward minus before (selective
    checkpointing's kept outputs live in its own storage, not in autograd's saved tensors)."""
    import gc

    use(model, mode)
    live = []

    class Count(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.numel() > 1000:
                    live.append(t.untyped_storage())
            return out

    import weakref

    with Count():
        loss = model(**b).loss
    gc.collect()
    refs = {id(s): weakref.ref(s) for s in live}
    live.clear()
    gc.collect()
    held = sum(r().nbytes() for r in refs.values() if r() is not None)
    loss.backward()
    return held


@pytest.fixture(scope="module")
def lora_model():
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["q_proj", "v_proj", "o_proj"],
                     init_lora_weights=False)  # fmt: skip
    return get_peft_model(tiny_llama(), cfg)


@pytest.mark.parametrize("mode", ["selective", True])
def test_checkpointed_gradients_equal_the_plain_ones_with_lora_dropout(lora_model, mode):
    b = batch()
    loss0, want = gradients(lora_model, False, b)
    loss1, got = gradients(lora_model, mode, b)
    assert set(got) == set(want) and len(want) == 3 * 3 * 2
    assert loss1 == loss0
    for name in want:  # the same dropout masks in the recomputation: the same numbers
        assert torch.allclose(got[name], want[name], rtol=0, atol=1e-7), name


def test_selective_checkpointing_of_a_full_fine_tune_equals_no_checkpointing():
    model, b = tiny_llama(), batch()
    loss0, want = gradients(model, False, b)
    loss1, got = gradients(model, "selective", b)
    assert loss1 == loss0 and set(got) == set(want)
    assert max((got[n] - want[n]).abs().max().item() for n in want) < 1e-6


def test_selective_checkpointing_keeps_between_none_and_full(lora_model):
    b = batch()
    none, sel, full = (saved_bytes(lora_model, m, b) for m in (False, "selective", True))
    assert full < sel < none, (full, sel, none)
    assert sel < 0.8 * none  # this tiny model: 75% (logits and embeddings count too); SmolLM2: 49%


def test_the_policy_keeps_wide_matmuls_and_attention_and_recomputes_the_rest():
    from torch.utils.checkpoint import CheckpointPolicy

    aten = torch.ops.aten
    keep = functools.partial(checkpointing.keep, None)
    wide, narrow = torch.empty(5, checkpointing.KEEP_INNER_DIM), torch.empty(5, 16)
    assert keep(aten.mm.default, wide, torch.empty(checkpointing.KEEP_INNER_DIM, 8)) == CheckpointPolicy.MUST_SAVE
    assert keep(aten.mm.default, narrow, torch.empty(16, 300)) == CheckpointPolicy.PREFER_RECOMPUTE  # a LoRA's B
    assert keep(aten.addmm.default, torch.empty(8), wide, torch.empty(128, 8)) == CheckpointPolicy.MUST_SAVE
    sdpa = aten._scaled_dot_product_flash_attention_for_cpu.default
    assert keep(sdpa, wide, wide, wide) == CheckpointPolicy.MUST_SAVE
    assert keep(aten.mul.Tensor, wide, wide) == CheckpointPolicy.PREFER_RECOMPUTE
    assert keep(aten.native_dropout.default, wide, 0.1, True) == CheckpointPolicy.PREFER_RECOMPUTE


def test_trainer_arguments_for_each_kind():
    assert checkpointing.trainer_kwargs(False) == {"gradient_checkpointing": False}
    full = checkpointing.trainer_kwargs(True)
    assert full == {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}
    sel = checkpointing.trainer_kwargs("selective")["gradient_checkpointing_kwargs"]
    assert sel["use_reentrant"] is False and sel["context_fn"] is checkpointing.selective_context


def test_a_misspelt_kind_is_refused_with_the_choices(tmp_path):
    r = run_cli_here("check", "train.gradient_checkpointing=selectve", cwd=tmp_path)
    assert r.returncode != 0
    assert "train.gradient_checkpointing=selectve" in r.stderr and "selective" in r.stderr.split("expected")[1]


def test_fsdp2_refuses_it_and_names_its_own(tmp_path):
    r = run_cli_here(
        "check", "hardware=fsdp2", "hardware.device=cpu", "train.gradient_checkpointing=selective", cwd=tmp_path
    )
    assert r.returncode != 0 and "hardware.activation_checkpointing=true" in r.stderr
