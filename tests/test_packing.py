"""Packing: the packed loss equals the unpacked loss on the same samples, and the KV cache stays off."""

import pytest
import torch

from conftest import FAST, make_spec, train_run
from fttool.config import objectives
from fttool.data.tokenizer import load_tokenizer

N = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from fttool import data
    from fttool import models as model_lib

    tmp = tmp_path_factory.mktemp("pack")
    spec = make_spec([f"data.max_samples={N}", "method=full"], tmp)
    tok = load_tokenizer(spec)
    ds = data.prepare_datasets(spec, tok, objectives.of(spec).features).train.select_columns(["input_ids", "labels"])
    model, _ = model_lib.load_model(spec)
    model.eval()
    return spec, tok, [ds[i] for i in range(N)], model


def loss_of(model, batch):
    with torch.no_grad():
        return model(**batch).loss.item()


def padded(setup):
    from fttool.data import pack

    spec, tok, feats, model = setup
    return loss_of(model, pack.collator("none", tok)(feats))


def test_padding_free_loss_equals_unpacked(setup):
    from fttool.data import pack

    spec, tok, feats, model = setup
    batch = pack.collator("padding_free", tok)(feats)
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch  # one row, no padding
    assert abs(loss_of(model, batch) - padded(setup)) < 1e-5


def test_bins_loss_equals_unpacked(setup):
    from fttool.data import pack

    spec, tok, feats, model = setup
    rows = pack.pack_bins([f["input_ids"] for f in feats], [f["labels"] for f in feats], 128, tok.pad_token_id)
    assert len(rows["input_ids"]) < N and all(len(r) == 128 for r in rows["input_ids"])  # several samples per row
    bins = [dict(zip(rows, vals)) for vals in zip(*rows.values())]
    assert abs(loss_of(model, pack.BinCollator()(bins)) - padded(setup)) < 1e-5


def test_kv_cache_guard(setup):
    """With use_cache on, packed samples attend to each other; the guard keeps it off."""
    from fttool import models as model_lib
    from fttool.data import pack

    spec, tok, feats, _ = setup
    batch = pack.collator("padding_free", tok)(feats)
    reference = padded(setup)
    model, _ = model_lib.load_model(spec)
    model.train()  # the guard acts in training mode, as in the Trainer; the tiny model has no dropout
    with torch.no_grad():
        contaminated = model(**batch, use_cache=True).loss.item()
        assert abs(contaminated - reference) > 1e-3  # the trap is real in this transformers version
        pack.guard_kv_cache(model)
        model.config.use_cache = True  # something turns it back on after the guard was installed
        guarded = model(**batch, use_cache=True).loss.item()
    assert abs(guarded - reference) < 1e-5


def test_bin_packing_fills_rows():
    from fttool.data.pack import bin_efficiency, bins_of

    lengths = [100, 60, 40, 30, 28, 20, 10, 5]
    bins = bins_of(lengths, 128)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    assert len(bins) == 3 and bin_efficiency(lengths, 128) == pytest.approx(293 / 384)


def test_packed_training_matches_unpacked_first_step(tmp_path):
    """Through the Trainer: the same batches give the same first loss packed (padding-free) and padded."""
    args = ["method=full", *FAST, "train.max_steps=2"]
    _, plain = train_run(args, tmp_path / "a")
    _, packed = train_run(args + ["data.packing=padding_free"], tmp_path / "b")
    _, bins = train_run(args + ["data.packing=bins"], tmp_path / "c")
    assert abs(plain["first_loss"] - packed["first_loss"]) < 1e-4
    assert bins["steps"] == 2 and bins["last_loss"] > 0
