"""The chunked LM-head loss (train.loss_impl, worker/chunked_loss.py) equals the full path: loss and gradients
(adapters, a full fine-tune, lm_head itself, a LoRA on lm_head) within 1e-5 in fp32, on tiny models with
vocabularies of 654, 32k and 151k, tied and untied, padded and padding-free, normalised over an accumulated batch,
with Gemma 2's logit soft-capping; ORPO's and DPO's per-sequence log-probs too. Which path runs is decided from the
config (with its reasons) and checked at the first step against the model's own loss."""

import logging

import pytest
import torch

from conftest import make_spec, run_cli_here
from fttool.errors import UserError
from fttool.worker import chunked_loss, lm_head

TOL = 1e-5


def llama(vocab, tied, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)  # fmt: skip
    return LlamaForCausalLM(cfg).float()


def gemma2(vocab=654):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, final_logit_softcapping=3.0)  # fmt: skip
    return Gemma2ForCausalLM(cfg).float()


def with_lora(model, targets):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, init_lora_weights=False)
    return get_peft_model(model, cfg)


def padded_batch(vocab, seed=1):
    """3 rows of 24, 17 and 9 tokens, right-padded; the first 6 tokens of each are a prompt (not trained)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 24), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate((24, 17, 9)):
        mask[i, :n] = 1
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :6] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def packed_batch(vocab, seed=2):
    """Padding-free: 3 samples in one row, positions restarting per sample, each sample's first label -100 (and the
    KV cache off, as training keeps it: data/pack.py guard_kv_cache)."""
    g = torch.Generator().manual_seed(seed)
    lengths = (11, 7, 14)
    ids = torch.randint(0, vocab, (1, sum(lengths)), generator=g)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    labels = ids.clone()
    labels[position_ids == 0] = -100
    return {"input_ids": ids, "position_ids": position_ids, "labels": labels, "use_cache": False}


def loss_and_grads(model, batch, chunked, count=None):
    model.zero_grad(set_to_none=True)
    if chunked:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        loss = chunked_loss.token_loss(model(**inputs, chunked_labels=batch["labels"]), count)
    else:
        loss = model(**batch, **({"num_items_in_batch": count} if count is not None else {})).loss
    loss.backward()
    return loss.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(model, batch, count=None):
    full_loss, full_grads = loss_and_grads(model, batch, chunked=False, count=count)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    chunked_loss.install(base)
    loss, grads = loss_and_grads(model, batch, chunked=True, count=count)
    assert loss == pytest.approx(full_loss, abs=TOL)
    assert set(grads) == set(full_grads) and grads
    for name, g in full_grads.items():
        assert (grads[name] - g).abs().max().item() < TOL, name
    return grads


CASES = [  # vocabulary, method, tied embeddings, batch
    (654, "full", True, padded_batch),
    (654, "lora", False, packed_batch),
    (32000, "lora", True, padded_batch),
    (32000, "full", False, packed_batch),
    (151936, "lora", False, padded_batch),
]


@pytest.mark.parametrize(
    "vocab,method,tied,batch",
    CASES,
    ids=[f"{c[0]}-{c[1]}-{'tied' if c[2] else 'untied'}-{c[3].__name__}" for c in CASES],
)
def test_chunked_equals_full_loss_and_gradients(vocab, method, tied, batch):
    model = llama(vocab, tied)
    if method == "lora":
        model = with_lora(model, ["q_proj", "v_proj"])
    grads = assert_same(model, batch(vocab))
    if method == "full":  # the output layer (or the embedding it is tied to) gets its gradient through the chunks
        assert any("lm_head" in n or "embed_tokens" in n for n in grads)


def test_accumulated_batch_normalisation_and_small_chunks(monkeypatch):
    """Over num_items_in_batch (the trained tokens of every micro-batch of the step), as transformers normalises;
    chunks of 16 tokens give the same result as one."""
    model = with_lora(llama(654, tied=False), ["q_proj", "v_proj"])
    monkeypatch.setattr(chunked_loss, "chunk_tokens", lambda vocab, nbytes: 16)  # the name the forward calls
    assert_same(model, padded_batch(654), count=torch.tensor(97))


def test_a_lora_on_lm_head_trains_through_its_merged_weight():
    model = with_lora(llama(32000, tied=False), ["q_proj", "lm_head"])
    grads = assert_same(model, padded_batch(32000))
    assert any("lm_head.lora_A" in n for n in grads) and any("lm_head.lora_B" in n for n in grads)


def test_gemma2_logit_softcapping_is_applied_exactly():
    assert_same(gemma2(), padded_batch(654))


def test_orpo_log_probs_through_the_chunked_head():
    from fttool.worker.preference import mean_reply_logps

    model = with_lora(llama(32000, tied=True), ["q_proj", "v_proj"])
    b = padded_batch(32000)
    batch = {
        "input_ids": b["input_ids"],
        "attention_mask": b["attention_mask"],
        "completion_mask": (b["labels"] != -100).long(),
    }
    full = mean_reply_logps(model, batch)
    chunked_loss.install(model.get_base_model())
    chunked = mean_reply_logps(model, batch, chunked=True)
    for a, c in zip(full, chunked):
        assert torch.allclose(a, c, atol=TOL), (a, c)


def test_trl_fused_head_reads_a_lora_lm_head_through_its_merged_weight():
    """DPO, KTO and GRPO take TRL's fused head, which reads lm_head.weight: on a peft LoRA layer that is the frozen
    base, so the adapter would neither count nor learn. fttool's merged view makes the log-probs the full path's."""
    from trl.trainer.utils import add_fused_lm_head

    model = with_lora(llama(654, tied=False), ["q_proj", "lm_head"])
    b = padded_batch(654)
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
    labels = b["labels"][:, 1:]
    want = torch.log_softmax(logits, -1).gather(2, labels.clamp(min=0)[..., None])[..., 0] * (labels != -100)
    add_fused_lm_head(model.get_base_model())
    fused = lambda: model(**b, fused_lm_head=True).log_probs  # noqa: E731
    assert not torch.allclose(fused(), want, atol=1e-3)  # TRL alone: the adapter is ignored
    lm_head.merged_head_weight(model.get_base_model().get_output_embeddings())
    assert torch.allclose(fused(), want, atol=TOL)
    with model.disable_adapter():  # the reference (adapter off) reads the base weight again
        assert not torch.allclose(fused(), want, atol=1e-3)


# -- which path, and the check at the first step ----------------------------------------------------------------------
def test_the_path_is_decided_from_the_config_with_its_reason(tmp_path):
    r = run_cli_here("check", f"output_dir={tmp_path}")
    assert "loss        chunked: the LM head and loss over trained positions only" in r.stdout
    r = run_cli_here("check", "method.target_modules=[q_proj,lm_head]", f"output_dir={tmp_path}")
    assert "loss        full: the model's logits for every position (train.loss_impl=auto: LoRA dropout" in r.stdout
    r = run_cli_here("check", "method.target_modules=[q_proj,lm_head]", "method.dropout=0", f"output_dir={tmp_path}")
    assert "loss        chunked" in r.stdout


BAD = [
    (["train.loss_impl=chunkd"], "Did you mean train.loss_impl=chunked?"),
    (
        ["train.loss_impl=chunked", "method.target_modules=[q_proj,lm_head]"],
        "use method.dropout=0 or train.loss_impl=full",
    ),
    (["method=dora", "method.target_modules=[q_proj,lm_head]", "train.loss_impl=chunked"], "DoRA adapter on lm_head"),
    (["objective=dpo", "data=preference", "data.path=p.jsonl", "train.loss_impl=full"], "always computes log-probs"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_loss_impl(overrides, message, tmp_path):
    r = run_cli_here("check", *overrides, f"output_dir={tmp_path}")
    assert r.returncode == 2 and message in r.stderr, r.stderr


class _Probe(lm_head.HeadCheck):
    """HeadCheck's check outside a Trainer: the pieces of one it reads."""

    def __init__(self, fallback):
        from types import SimpleNamespace

        self.accelerator = SimpleNamespace(device=torch.device("cpu"), unwrap_model=lambda m: m)
        self.args = SimpleNamespace(bf16=False, fp16=False)
        self.chunked_head, self.head_fallback = True, fallback

    def compute_loss_context_manager(self):
        import contextlib

        return contextlib.nullcontext()

    def chunked_probe_loss(self, model, batch):
        labels = batch.pop("labels")
        return chunked_loss.token_loss(model(**batch, chunked_labels=labels))


def test_a_model_that_transforms_its_logits_falls_back_or_stops(caplog):
    """A model whose forward scales its logits in a way the chunked head does not know: auto falls back to the
    full path with a warning; asked for explicitly, the run stops with both losses named."""
    model = llama(654, tied=False)
    chunked_loss.install(model)
    ok = _Probe(fallback=True)
    ok._check_head(model)
    assert ok.chunked_head  # a plain Llama: the two agree
    original = model.lm_head.forward
    model.lm_head.forward = lambda x: original(x) * 2.0  # unknown to the chunked head
    with caplog.at_level(logging.WARNING, logger="fttool"):
        auto = _Probe(fallback=True)
        auto._check_head(model)
    assert not auto.chunked_head and "falls back to the full path" in caplog.text
    with pytest.raises(UserError, match="does something to its logits the chunked head does not know"):
        _Probe(fallback=False)._check_head(model)


def test_chunk_size_follows_the_vocabulary_and_the_device_memory():
    assert chunked_loss.chunk_tokens(49152, 24 * 2**30) == (24 * 2**30 // 256) // (49152 * 4)
    assert chunked_loss.chunk_tokens(151936, 80 * 2**30) == 128 * 2**20 // (151936 * 4)  # capped at 128 MiB
    assert chunked_loss.chunk_tokens(654, 2**30) > 4096  # a small vocabulary: one chunk for any micro-batch


def test_spec_default_is_auto(tmp_path):
    assert make_spec([], tmp_path).train.loss_impl == "auto"
