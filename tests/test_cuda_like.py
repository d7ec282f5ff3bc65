"""Correct on a real GPU: what the CPU hides, emulated (tests/cuda_like.py).

A left-padding tokenizer (phi-3-mini's, as several chat tokenizers are) with padded batches and SDPA trained into
NaN on an H100 from step 1 while every CPU test passed: CUDA's kernels return NaN for a query row that attends to
no key, the CPU's do not. Under `cuda_sdpa` the CPU does what CUDA does.
"""

import json
import math

import pytest

from conftest import SHARED_DATA, train_run
from cuda_like import cuda_like_sdpa, cuda_sdpa  # noqa: F401 - a fixture

PHI3 = SHARED_DATA / "tokenizers" / "phi-3-mini"
GSM8K = SHARED_DATA / "alpaca" / "alpacadatacleaned_gsm_8k_train.json"
needs_shared = pytest.mark.skipif(not (PHI3.is_dir() and GSM8K.is_file()), reason="../shared/data not present")


def test_emulation_is_sdpa_except_for_fully_masked_rows():
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 6, 8) for _ in range(3))
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool).tril()
    mask[1, :, :, :2] = False  # sample 1 is left-padded by two: its first two rows admit no key
    ours, theirs = cuda_like_sdpa(q, k, v, attn_mask=mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.isnan(ours[1, :, :2]).all() and torch.isfinite(theirs).all()  # CUDA's NaN, the CPU's finite rows
    assert torch.allclose(ours[0], theirs[0], atol=1e-5) and torch.allclose(ours[1, :, 2:], theirs[1, :, 2:], atol=1e-5)
    assert torch.allclose(
        cuda_like_sdpa(q, k, v, is_causal=True), F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-5
    )


@pytest.fixture(scope="module")
def phi3_model(tmp_path_factory):
    """A tiny randomly initialised Llama whose tokenizer is the real phi-3-mini one (padding_side: left)."""
    if not PHI3.is_dir():
        pytest.skip("../shared/data not present")
    from transformers import AutoTokenizer

    from fttool.testing import random_llama

    out = tmp_path_factory.mktemp("phi3-tiny")
    tok = AutoTokenizer.from_pretrained(PHI3)
    assert tok.padding_side == "left"
    random_llama(out, tok, tie_word_embeddings=True)
    return out


def _finite(xs):
    return all(x is not None and math.isfinite(x) for x in xs)


@needs_shared
@pytest.mark.parametrize(
    "method,packing",
    [("lora", "none"), ("qlora", "none"), ("full", "none"), ("lora", "padding_free"), ("lora", "bins")],
)
def test_left_padding_tokenizer_trains_finite_on_cuda_like_attention(method, packing, phi3_model, cuda_sdpa, tmp_path):  # noqa: F811
    """The H100 report, on the CPU: GSM8K in alpaca form, the real left-padding tokenizer, padded batches."""
    run_dir, summary = train_run(
        [
            f"model.name_or_path={phi3_model}",
            "data=alpaca",
            f"data.path={GSM8K}",
            f"method={method}",
            f"data.packing={packing}",
            "data.max_samples=24",
            "data.max_length=256",
            "data.val_ratio=0",
            "data.test_ratio=0",
            "train.max_steps=3",
            "train.batch_size=8",
            "train.grad_accum=1",
            "train.logging_steps=1",
            "train.save_steps=3",
            "eval.after_training=false",
        ],
        tmp_path,
    )
    rows = [r for r in (json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(rows) == 3
    assert _finite([r["loss"] for r in rows]) and _finite([r["grad_norm"] for r in rows]), rows
    # the tokenizer saved with the run keeps the side its authors chose, for inference
    assert json.loads((run_dir / "final" / "tokenizer_config.json").read_text())["padding_side"] == "left"


@needs_shared
def test_training_batches_are_padded_on_the_right(phi3_model):
    from transformers import AutoTokenizer

    from fttool.data import pack

    tok = AutoTokenizer.from_pretrained(phi3_model)
    batch = pack.collator("none", tok)(
        [
            {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
            {"input_ids": [5, 6, 7, 8, 9, 10, 11, 12, 13], "labels": [-100] * 9},
        ]
    )
    assert batch["input_ids"].shape == (2, 16)  # the longest, rounded up to a multiple of 8
    assert batch["input_ids"][0, :3].tolist() == [5, 6, 7] and (batch["input_ids"][0, 3:] == tok.pad_token_id).all()
    assert batch["attention_mask"][0].tolist() == [1] * 3 + [0] * 13
    assert (batch["labels"][0, 3:] == -100).all() and tok.padding_side == "left"


def test_repaired_mask_admits_a_key_in_every_row_and_changes_no_other():
    import torch

    from fttool.after.attention import admit_some_key

    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool).tril()
    mask[..., :2] = False
    fixed = admit_some_key(mask)
    assert fixed.any(dim=-1).all()
    assert torch.equal(fixed[..., 2:, :], mask[..., 2:, :]) and fixed[..., :2, :].all()
    assert admit_some_key(None) is None
