"""KTO (objective=kto through TRL's KTOTrainer) on unpaired feedback: the row format, the masks (as SFT's), the
rules, and a short run in which desirable replies pull away from undesirable ones."""

import json

import pytest

from conftest import make_spec, run_cli_here, train_run
from cuda_like import cuda_sdpa  # noqa: F401 - a fixture
from fttool.errors import UserError
from fttool.worker.callbacks import read_metrics


def write_unpaired(path, n=96, seed=0, skip=0):
    """Unpaired rows from the demo task: each correct reversal desirable, each wrong one (the words in their original
    order, or two neighbours swapped) undesirable; desirable and undesirable rows alternate. `skip`: start after that
    many demo rows (held-out rows)."""
    from fttool import assets
    from fttool.testing import reverse_pairs

    demo = assets.resolve("fttool:demo")
    rows = [json.loads(line) for line in open(f"{demo}/train.jsonl")][skip : skip + n * 2]
    with open(path, "w") as f:
        for i, p in enumerate(reverse_pairs(rows, seed)[:n]):
            good = i % 2 == 0
            f.write(
                json.dumps({"prompt": p["prompt"], "completion": p["chosen" if good else "rejected"], "label": good})
            )
            f.write("\n")
    return path


def kto_spec_args(tmp_path, *extra):
    path = write_unpaired(tmp_path / "unpaired.jsonl")
    return ["objective=kto", "data=unpaired", f"data.path={path}", "data.test_path=null", *extra]


def test_unpaired_rows_are_masked_as_sft_masks_a_reply(tmp_path):
    from fttool import data
    from fttool.config import objectives
    from fttool.data.tokenizer import load_tokenizer

    spec = make_spec(kto_spec_args(tmp_path, "data.val_ratio=0"), tmp_path)
    tok = load_tokenizer(spec)
    prepared = data.prepare_datasets(spec, tok, objectives.of(spec).features, use_cache=False)
    row = prepared.train[0]
    assert set(prepared.train.column_names) == {"input_ids", "labels", "label", "length", "loc"}
    trained = tok.decode([t for t, x in zip(row["input_ids"], row["labels"]) if x != -100])
    first = json.loads((tmp_path / "unpaired.jsonl").read_text().splitlines()[0])
    assert trained == first["completion"] + "<|im_end|>" and row["label"] == 1
    assert sorted(set(prepared.train["label"])) == [0, 1]


BAD = [
    (["objective=sft"], "objective=sft would train on the undesirable ones too"),
    (["objective.loss_type=kt"], "Did you mean kto?"),
    (["objective.desirable_weight=0"], "must be > 0"),
    (["data.packing=bins"], "use data.packing=none"),
    (["train.batch_size=1"], "train.batch_size >= 2"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_kto_config(overrides, message, tmp_path):
    r = run_cli_here("check", *kto_spec_args(tmp_path), *overrides, f"output_dir={tmp_path}")
    assert r.returncode == 2 and message in r.stderr, r.stderr


def test_kto_needs_unpaired_rows(tmp_path):
    with pytest.raises(UserError, match="use data=unpaired data.path=ROWS"):
        make_spec(["objective=kto"], tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "completion": "c", "label": "yes"}) + "\n")
    r = run_cli_here("preview", "objective=kto", "data=unpaired", f"data.path={bad}", "data.test_path=null")
    assert r.returncode == 2 and "bad.jsonl:1: 'label' must be true" in r.stderr, r.stderr


def test_kto_trains_and_desirable_replies_pull_away(tmp_path):
    """60 steps of 16 rows: the reward margin (desirable minus undesirable, TRL's rewards/margins) grows from about 0
    to about 0.4 (measured with seeds 1-3: 0.04-0.05 over the first third of the logged steps, 0.35-0.44 over the
    last). Held out, the fine-tune separates desirable from undesirable completions better than the starting model
    (label_auc, which gates the verdict)."""
    path = write_unpaired(tmp_path / "unpaired.jsonl", n=400)
    held_out = write_unpaired(tmp_path / "held_out.jsonl", n=64, seed=1, skip=2000)
    steps = [
        "train.max_steps=60",
        "train.batch_size=16",
        "train.grad_accum=1",
        "train.logging_steps=4",
        "train.save_steps=60",
        "train.lr=1e-3",
        "data.val_ratio=0",
    ]
    run_dir, summary = train_run(
        ["objective=kto", "data=unpaired", f"data.path={path}", f"data.test_path={held_out}", *steps], tmp_path, "kto"
    )
    rows = [r for r in read_metrics(run_dir) if "loss" in r]
    assert all(r["loss"] == r["loss"] for r in rows) and summary["steps"] == 60
    margins = [r["rewards/margins"] for r in rows if "rewards/margins" in r]
    third = len(margins) // 3
    first, last = sum(margins[:third]) / third, sum(margins[-third:]) / third
    assert last > first + 0.15 and last > 0.15, margins
    assert "kl" in rows[0] and (run_dir / "final" / "adapter_config.json").is_file()
    ev = json.loads((run_dir / "eval.json").read_text())
    tuned, base = ev["finetuned"], ev["base"]
    assert set(tuned) == {"label_auc", "label_margin"} and ev["verdict"] == "pass", ev
    # measured: label_auc 43% -> 47%, label_margin -0.19 -> -0.10 nats per token
    assert tuned["label_auc"] > base["label_auc"] and tuned["label_margin"] > base["label_margin"] + 0.05, ev


def test_kto_stays_finite_on_cuda_like_attention(cuda_sdpa, tmp_path):  # noqa: F811
    """KTO's batches (TRL's collator) are padded on the right: no pad position is a fully masked query row, so CUDA's
    NaN for such rows (tests/cuda_like.py) never arises."""
    steps = ["train.max_steps=3", "train.batch_size=8", "train.grad_accum=1", "train.logging_steps=1"]
    steps += ["train.save_steps=3", "data.val_ratio=0", "eval.after_training=false"]
    run_dir, summary = train_run(kto_spec_args(tmp_path, *steps), tmp_path, name="kto-cuda-like")
    rows = [r for r in read_metrics(run_dir) if "loss" in r]
    assert len(rows) == 3 and all(r["loss"] == r["loss"] and r["grad_norm"] == r["grad_norm"] for r in rows), rows


def test_label_metrics_are_an_auc_and_a_margin_per_token():
    """label_auc: the chance a desirable completion outscores an undesirable one (ties half); label_margin: the
    difference of their mean log-probs per token. Checked on a stand-in for the model's per-row losses."""
    from unittest import mock

    from fttool.after import evaluate

    losses = [(2.0, 2), (6.0, 3), (3.0, 1), (1.0, 1)]  # (summed nll, tokens): log-probs per token -1, -2, -3, -1
    with mock.patch.object(evaluate, "nll", return_value=losses):
        got = evaluate.label_scores(None, {"label": [1, 1, 0, 0]})
    # desirable {-1, -2} vs undesirable {-3, -1}: -1 > -3, -1 = -1 (half), -2 > -3, -2 < -1 -> 2.5 of 4
    assert got["label_auc"] == 2.5 / 4 and got["label_margin"] == pytest.approx(-1.5 - -2.0)


def test_label_metrics_need_both_kinds_of_held_out_rows(tmp_path):
    good_only = tmp_path / "good.jsonl"
    good_only.write_text(json.dumps({"prompt": "p", "completion": "c", "label": True}) + "\n")
    from fttool.after import evaluate

    spec = make_spec([*kto_spec_args(tmp_path), f"data.test_path={good_only}"], tmp_path)
    with pytest.raises(UserError, match="have only desirable rows; give a test file with both"):
        evaluate.labeled_rows(spec, None, "eval")
    r = run_cli_here("check", "data.metrics=[label_auc]", f"output_dir={tmp_path}")
    assert r.returncode == 2 and "label_auc, which scores unpaired rows, but the data is" in r.stderr, r.stderr
