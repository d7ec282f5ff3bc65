"""Preference objectives (DPO through TRL, ORPO): the objective seam, pair features with SFT's masks, the losses
against their formulas, the reference model, training from the CLI, and bad inputs."""

import gc
import json
import math

import pytest
from omegaconf import OmegaConf

from conftest import FAST, ROOT, SHARED_DATA, make_spec, run_cli, run_cli_here
from fttool.config import objectives, recipes
from fttool.errors import UserError

PHI3 = SHARED_DATA / "tokenizers" / "phi-3-mini"


def write_pairs(path, n=64, seed=0):
    from fttool import assets
    from fttool.testing import reverse_pairs

    demo = assets.resolve("fttool:demo")
    rows = [json.loads(line) for line in open(f"{demo}/train.jsonl")][: n * 2]
    pairs = reverse_pairs(rows, seed)[:n]
    with open(path, "w") as f:
        for p in pairs:
            f.write(json.dumps(p) + "\n")
    return path


def pair_spec(tmp_path, *overrides):
    path = write_pairs(tmp_path / "pairs.jsonl")
    return make_spec(["data=preference", f"data.path={path}", "objective=dpo", *FAST, *overrides], tmp_path)


# -- configuration --------------------------------------------------------------------------------------------
def test_objective_defaults_and_learning_rates(tmp_path):
    spec = pair_spec(tmp_path)
    o = spec.objective
    assert (o.name, o.beta, o.loss_type, o.precompute_ref_log_probs) == ("dpo", 0.1, "sigmoid", False)
    assert spec.train.lr == pytest.approx(5e-6 * spec.model.lr_scale)  # adapters
    full = pair_spec(tmp_path, "method=full")
    assert full.train.lr == pytest.approx(5e-7 * full.model.lr_scale)
    orpo = pair_spec(tmp_path, "objective=orpo")
    assert orpo.train.lr == pytest.approx(8e-5 * orpo.model.lr_scale)
    assert pair_spec(tmp_path, "train.lr=1e-4").train.lr == 1e-4  # the user's value wins
    sft = make_spec([], tmp_path)
    assert sft.objective.name == "sft" and sft.train.lr == pytest.approx(sft.method.default_lr * sft.model.lr_scale)


BAD = [
    (["objective=dpo"], "objective=dpo trains on preference pairs, but the data is data.format=chat"),
    (["objective=dpo", "data=preference", "data.packing=bins"], "cannot be packed; use data.packing=none"),
    (["objective=orpo", "data=preference", "data.packing=padding_free"], "cannot be packed"),
    (["objective=dpo", "data=preference", "objective.loss_type=sigmod"], "Did you mean sigmoid?"),
    (["objective=dpo", "data=preference", "objective.beta=0"], "objective.beta=0.0 is out of range"),
    (
        ["objective.beta=0.2"],
        "'objective.beta' belongs to objective=dpo / objective=orpo / objective=kto / objective=grpo, not objective=sft",
    ),
    (
        ["objective=orpo", "data=preference", "objective.loss_type=ipo"],
        "belongs to objective=dpo / objective=kto / objective=grpo, not objective=orpo",
    ),
    (["objective=dpo", "data=preference", "objective.bta=0.2"], "Did you mean objective.beta?"),
    (["objective=dpo", "data=preference", "data.train_on_inputs=true"], "compares the two replies only"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_objective_config(overrides, message, tmp_path):
    path = write_pairs(tmp_path / "p.jsonl")
    extra = [f"data.path={path}"] if "data=preference" in overrides else []
    with pytest.raises(UserError) as e:
        make_spec([*overrides, *extra], tmp_path)
    assert message in str(e.value)


def test_check_shows_the_objective(tmp_path):
    from fttool.plan import summary

    lines = summary.describe(pair_spec(tmp_path, "objective.beta=0.2"))
    assert any(line.startswith("objective   DPO") and "beta 0.2, loss sigmoid" in line for line in lines), lines


# -- features ---------------------------------------------------------------------------------------------------
def test_pairs_are_masked_like_sft_replies_with_a_real_template(tmp_path):
    """phi-3's template: each reply and its <|end|> are scored; the prompt and the template's trailing
    <|endoftext|> are not; chosen and rejected share the prompt tokens."""
    if not PHI3.is_dir():
        pytest.skip("../shared/data not present")
    from transformers import AutoTokenizer

    from fttool import data
    from fttool.data.tokenize import IGNORE

    path = tmp_path / "p.jsonl"
    rows = [
        {"prompt": "Name a colour.", "chosen": "Blue is one.", "rejected": "A fish."},
        {
            "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Two plus two?"}],
            "chosen": "4",
            "rejected": "5, I think",
        },
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = make_spec(
        ["data=preference", f"data.path={path}", f"model.name_or_path={PHI3}", "objective=dpo", "data.val_ratio=0"],
        tmp_path,
    )
    tok = AutoTokenizer.from_pretrained(PHI3)
    prepared = data.prepare_datasets(spec, tok, objectives.of(spec).features, use_cache=False)
    ds = prepared.train
    assert set(ds.column_names) >= {"input_ids", "labels", "rejected_input_ids", "rejected_labels"}
    assert prepared.stats.samples == 2
    by_reply = {}
    for row in ds:
        for ids_key, labels_key in (("input_ids", "labels"), ("rejected_input_ids", "rejected_labels")):
            ids, labels = row[ids_key], row[labels_key]
            scored = [t for t, lab in zip(ids, labels) if lab != IGNORE]
            by_reply[tok.decode(scored).strip()] = ids[: next(i for i, lab in enumerate(labels) if lab != IGNORE)]
    assert set(by_reply) == {"Blue is one.<|end|>", "A fish.<|end|>", "4<|end|>", "5, I think<|end|>"}
    assert by_reply["Blue is one.<|end|>"] == by_reply["A fish.<|end|>"]  # the same prompt tokens
    assert by_reply["4<|end|>"] == by_reply["5, I think<|end|>"]


def test_pair_length_policy_counts_pairs(tmp_path):
    from fttool import data
    from fttool.data.tokenizer import load_tokenizer

    path = tmp_path / "p.jsonl"
    long = " ".join(["word"] * 300)
    rows = [{"prompt": "Hi", "chosen": "Hello there", "rejected": "Go away"}] * 3
    rows += [{"prompt": "Hi", "chosen": "Short", "rejected": long}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = ["data=preference", f"data.path={path}", "objective=dpo", "data.val_ratio=0", "data.max_length=64"]
    spec = make_spec(base, tmp_path)
    tok = load_tokenizer(spec)
    st = data.prepare_datasets(spec, tok, objectives.of(spec).features, use_cache=False).stats
    assert (st.samples, st.truncated) == (4, 1)  # the long rejected reply cut to 64 tokens; the pair kept
    st = data.prepare_datasets(
        make_spec([*base, "data.truncation=drop"], tmp_path), tok, data.FEATURES["pairs"], use_cache=False
    ).stats
    assert (st.samples, st.dropped_too_long) == (3, 1)  # a pair goes when either reply is too long


class _PadZero:
    pad_token_id = 0


def test_pair_collator_lays_out_chosen_then_rejected():
    from fttool.data.features import PAIRS

    batch = PAIRS.collator("none", _PadZero())(
        [
            {
                "input_ids": [5, 6, 7],
                "labels": [-100, 6, 7],
                "rejected_input_ids": [5, 8],
                "rejected_labels": [-100, 8],
            },
            {
                "input_ids": [9, 1],
                "labels": [-100, 1],
                "rejected_input_ids": [9, 2, 3, 4],
                "rejected_labels": [-100, -100, 3, 4],
            },
        ]
    )
    pad = [0, 0, 0, 0, 0, 0, 0, 0]  # padded to a multiple of 8
    assert batch["input_ids"].tolist() == [
        [5, 6, 7, *pad[3:]],
        [9, 1, *pad[2:]],
        [5, 8, *pad[2:]],
        [9, 2, 3, 4, *pad[4:]],
    ]
    assert batch["completion_mask"].tolist() == [
        [0, 1, 1, *pad[3:]],
        [0, 1, *pad[2:]],
        [0, 1, *pad[2:]],
        [0, 0, 1, 1, *pad[4:]],
    ]
    assert batch["attention_mask"].tolist() == [
        [1, 1, 1, *pad[3:]],
        [1, 1, *pad[2:]],
        [1, 1, *pad[2:]],
        [1, 1, 1, 1, *pad[4:]],
    ]
    assert "labels" not in batch  # TRL passes its own labels


# -- losses and the reference -----------------------------------------------------------------------------------
def _trainer(spec, tmp_path):
    from fttool import data
    from fttool import models as model_lib
    from fttool.config import objectives
    from fttool.data.tokenizer import load_tokenizer
    from fttool.worker import trainers
    from fttool.worker.guard import NonFiniteGuard
    from fttool.worker.train import as_batches, training_args

    tok = load_tokenizer(spec)
    prepared = data.prepare_datasets(spec, tok, objectives.of(spec).features, use_cache=False)
    model, precision = model_lib.load_model(spec)
    objective = objectives.of(spec)
    trainer = trainers.trainer_class(spec)(
        model=model,
        args=training_args(spec, tmp_path / "run", precision),
        train_dataset=as_batches(spec, prepared.train, tok),
        data_collator=objective.features.collator(spec.data.packing, tok),
        processing_class=tok,
        guard=NonFiniteGuard(),
        **objective.trainer_kwargs(spec),
    )
    batch = objective.features.collator(spec.data.packing, tok)([prepared.train[i] for i in range(4)])
    return trainer, model, batch


def _perturb_adapter(model):
    import torch

    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)


def _sequence_logps(model, batch):
    """Summed log-probs of each row's scored tokens, in float64, computed here independently."""
    import torch

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(2, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (logps * batch["completion_mask"][:, 1:]).sum(dim=1)


def test_dpo_loss_equals_the_formula_and_the_lora_reference_is_the_disabled_adapter(tmp_path):
    import torch
    import torch.nn.functional as F
    from transformers import PreTrainedModel

    def models_alive():
        gc.collect()
        return sum(isinstance(o, PreTrainedModel) and hasattr(o, "lm_head") for o in gc.get_objects())

    spec = pair_spec(tmp_path, "objective.beta=0.3")
    before = models_alive()
    trainer, model, batch = _trainer(spec, tmp_path)
    # no second model: the reference is the base with the adapter disabled (TRL's "ref" adapter copy dropped)
    assert trainer.ref_model is None and list(model.peft_config) == ["default"]
    assert models_alive() == before + 1
    _perturb_adapter(model)
    model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch).item()
        policy = _sequence_logps(model, batch)
        with model.disable_adapter():
            reference = _sequence_logps(model, batch)
    pc, pr = policy.chunk(2)
    rc, rr = reference.chunk(2)
    expected = -F.logsigmoid(0.3 * ((pc - rc) - (pr - rr))).mean().item()
    assert abs(expected - math.log(2)) > 1e-3  # the adapter moved the policy away from the reference
    assert loss == pytest.approx(expected, abs=1e-5)


def test_orpo_loss_equals_the_formula(tmp_path):
    import torch

    spec = pair_spec(tmp_path, "objective=orpo", "objective.beta=0.25")
    trainer, model, batch = _trainer(spec, tmp_path)
    _perturb_adapter(model)
    model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch).item()
        summed = _sequence_logps(model, batch)
    counts = batch["completion_mask"][:, 1:].sum(dim=1).double()
    mean = summed / counts
    c, r = mean.chunk(2)
    nll = -summed.chunk(2)[0].sum() / counts.chunk(2)[0].sum()
    odds = lambda lp: lp - torch.log(1 - torch.exp(lp))  # noqa: E731 - log(p / (1 - p))
    expected = (nll - 0.25 * torch.log(torch.sigmoid(odds(c) - odds(r))).mean()).item()
    assert loss == pytest.approx(expected, abs=1e-5)


# -- training from the command line -----------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("objective,method", [("dpo", "lora"), ("dpo", "full"), ("orpo", "lora"), ("dpo", "qlora")])
def test_preference_objectives_train_and_the_loss_falls(objective, method, tmp_path):
    path = write_pairs(tmp_path / "pairs.jsonl", n=64)
    lr = {"dpo": "5e-4", "orpo": "2e-3"}[objective] if method != "full" else "1e-4"
    r = run_cli_here(
        f"objective={objective}",
        f"method={method}",
        "data=preference",
        f"data.path={path}",
        *FAST,
        "train.max_steps=16",
        f"train.lr={lr}",
        "train.warmup_ratio=0",
        "run_name=p",
        f"output_dir={tmp_path / 'runs'}",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = tmp_path / "runs" / "p"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [x for x in rows if "loss" in x]
    assert all("rewards/accuracies" in x and "rewards/margins" in x for x in train_rows)
    first = sum(x["loss"] for x in train_rows[:4]) / 4
    last = sum(x["loss"] for x in train_rows[-4:]) / 4
    assert last < first, [x["loss"] for x in train_rows]
    assert "| acc " in r.stderr + (run_dir / "train.log").read_text()
    from matplotlib.image import imread

    assert imread(run_dir / "loss.png").shape[0] > 800  # a second panel: preference accuracy and margin


@pytest.mark.slow
def test_bad_preference_runs_write_nothing(tmp_path):
    missing = tmp_path / "m.jsonl"
    missing.write_text(json.dumps({"prompt": "Hi", "chosen": "Hello"}) + "\n")
    same = tmp_path / "same.jsonl"
    same.write_text(json.dumps({"prompt": "Hi", "chosen": "Hello", "rejected": "Hello"}) + "\n")
    for args, message in (
        ([f"data.path={missing}"], "m.jsonl:1"),
        ([f"data.path={same}"], "same.jsonl:1: chosen and rejected are the same reply"),
        ([f"data.path={write_pairs(tmp_path / 'p.jsonl')}", "data.packing=bins"], "cannot be packed"),
    ):
        r = run_cli_here(
            "objective=dpo",
            "data=preference",
            *args,
            *FAST,
            "run_name=bad",
            f"output_dir={tmp_path}/runs",
            cwd=tmp_path,
        )
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert not (tmp_path / "runs" / "bad").exists()


def test_preview_shows_both_replies_with_the_scored_tokens(tmp_path):
    import io

    from fttool.data import preview

    spec = pair_spec(tmp_path, "data.val_ratio=0")
    out = io.StringIO()
    preview.run("preview", spec, objectives.of(spec).features, 1, out=out)
    text = out.getvalue()
    assert "── sample 0 chosen" in text and "── sample 0 rejected" in text
    first = json.loads((tmp_path / "pairs.jsonl").read_text().splitlines()[0])
    assert f"[[{first['chosen']}<|im_end|>]]" in text and f"[[{first['rejected']}<|im_end|>]]" in text
    assert "pairs         64 (from 64 rows" in text and "packing" not in text


def test_preference_metrics_need_preference_data(tmp_path):
    with pytest.raises(UserError, match="preference_accuracy, which scores preference rows, but the data is"):
        make_spec(["data.metrics=[preference_accuracy]"], tmp_path)


@pytest.mark.slow
def test_the_dpo_demo_recipe_raises_held_out_preference_accuracy(tmp_path):
    """The embedded DPO demo as a user runs it: 2,000 generated pairs, 2 epochs, eval on 100 held-out pairs."""
    r = run_cli("+recipe=tiny_dpo_cpu", "run_name=demo", f"output_dir={tmp_path}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "demo" / "eval.json").read_text())
    base, tuned = result["base"], result["finetuned"]
    assert result["verdict"] == "pass" and tuned["preference_accuracy"] >= base["preference_accuracy"] + 0.3
    assert tuned["preference_margin"] > base["preference_margin"]
    assert "preference_accuracy" in (tmp_path / "demo" / "eval.md").read_text()
    # the recipe's own run is within the loss (15%) and memory (30%) its meta header expects
    meta = recipes.meta_of(OmegaConf.to_container(OmegaConf.load(ROOT / "recipes" / "tiny_dpo_cpu.yaml")))
    summary = json.loads((tmp_path / "demo" / "result.json").read_text())
    untimed = {k: v for k, v in meta["expected"][0].items() if k != "tokens_per_s"}  # speed: bench/, not tests
    assert recipes.check_expected(untimed, summary) == []


def _dpo_steps(tmp_path):
    return [
        "objective=dpo",
        "data=preference",
        f"data.path={write_pairs(tmp_path / 'pairs.jsonl')}",
        "train.lr=5e-4",
        "data.val_ratio=0",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "zero3"])
def test_dpo_on_two_processes_matches_one(strategy, tmp_path):
    from test_distributed import STEPS, TOL, losses, two_processes, weights

    from conftest import train_run

    (tmp_path / "two").mkdir()
    one, _ = train_run([*STEPS, "train.grad_accum=2", *_dpo_steps(tmp_path)], tmp_path / "one")
    two, r = two_processes(tmp_path / "two", strategy, "lora", *_dpo_steps(tmp_path))
    assert "2 process(es)" in (two / "train.log").read_text()
    assert losses(two) == pytest.approx(losses(one), abs=TOL) and losses(one)[-1] != losses(one)[0]
    got, want = weights(two / "final"), weights(one / "final")
    assert set(got) == set(want) and all((got[k] - want[k]).abs().max() < 1e-4 for k in want)


@pytest.mark.slow
def test_dpo_resume_equals_uninterrupted(tmp_path):
    import shutil

    from test_distributed import STEPS, TOL, losses

    from conftest import train_run

    run_dir, _ = train_run([*STEPS, *_dpo_steps(tmp_path)], tmp_path)
    before = losses(run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "checkpoint-4")
    shutil.rmtree(run_dir / "final")
    (run_dir / "result.json").unlink()
    run_dir, _ = train_run([*STEPS, *_dpo_steps(tmp_path), "resume=auto"], tmp_path)
    assert losses(run_dir) == pytest.approx(before, abs=TOL)


# -- chained runs: model.from_run --------------------------------------------------------------------------------
def _fake_run(folder, tmp_path, adapter=True, final=True):
    """A run folder as training leaves it, as far as model.from_run reads it (spec.yaml, final/)."""
    from fttool.launch import rundir

    folder.mkdir(parents=True)
    spec = make_spec(["method=lora" if adapter else "method=full"], tmp_path)
    (folder / "spec.yaml").write_text(rundir.spec_to_yaml(spec))
    if final:
        (folder / "final").mkdir()
        (folder / "final" / ("adapter_config.json" if adapter else "config.json")).write_text("{}")
    return folder


def test_from_run_resolves_the_starting_model(tmp_path):
    sft = _fake_run(tmp_path / "runs" / "sft", tmp_path)
    spec = pair_spec(tmp_path, f"model.from_run={sft}")
    assert spec.model.parent_adapter == str(sft / "final") and spec.model.name_or_path == "fttool:tiny-chat"
    assert spec.model.from_run == str(sft) and spec.model.from_run_adapter == "merge"
    full = _fake_run(tmp_path / "runs" / "full", tmp_path, adapter=False)
    spec = pair_spec(tmp_path, f"model.from_run={full}")
    assert spec.model.name_or_path == str(full / "final") and spec.model.parent_adapter is None
    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text("{}")
    assert pair_spec(tmp_path, f"model.from_run={export}").model.name_or_path == str(export)


def test_bad_from_run_says_what_to_give(tmp_path):
    sft = _fake_run(tmp_path / "runs" / "sft", tmp_path)
    unfinished = _fake_run(tmp_path / "runs" / "cut", tmp_path, final=False)
    full = _fake_run(tmp_path / "runs" / "full", tmp_path, adapter=False)
    (tmp_path / "empty").mkdir()
    cases = [
        ([f"model.from_run={tmp_path / 'nope'}"], "no such folder; give a finished run folder"),
        ([f"model.from_run={tmp_path / 'empty'}"], "neither a run folder (no spec.yaml) nor a model folder"),
        ([f"model.from_run={unfinished}"], "the run has no final/ (it did not finish)"),
        ([f"model.from_run={sft}", "method=qlora"], "merging the run's adapter into a quantized base"),
        ([f"model.from_run={sft}", "model.from_run_adapter=continue", "method=full"], "trains the full model"),
        ([f"model.from_run={full}", "model.from_run_adapter=continue"], "holds a full model, not an adapter"),
        ([f"model.from_run={sft}", "model.from_run_adapter=keep"], "expected one of: merge, continue"),
        ([f"model.from_run={sft}", "model.name_or_path=x"], "drop model.name_or_path"),
        (["model.parent_adapter=x"], "set by fttool from model.from_run"),
    ]
    for overrides, message in cases:
        with pytest.raises(UserError) as e:
            pair_spec(tmp_path, *overrides)
        assert message in str(e.value), (overrides, str(e.value))


@pytest.mark.slow
def test_sft_then_dpo_records_the_lineage_and_exports(tmp_path):
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    runs = tmp_path / "runs"
    r = run_cli(
        "+recipe=tiny_cpu", "train.max_steps=10", "eval.after_training=false", "run_name=sft", f"output_dir={runs}"
    )
    assert r.returncode == 0, r.stderr[-2000:]
    steps = [*FAST, "objective=dpo", "data=preference", f"data.path={pairs}", f"output_dir={runs}"]
    for mode in ("merge", "continue"):
        r = run_cli(*steps, f"model.from_run={runs / 'sft'}", f"model.from_run_adapter={mode}", f"run_name={mode}")
        assert r.returncode == 0, r.stderr[-2000:]
        log = (runs / mode / "train.log").read_text()
        assert ("adapter merged into" if mode == "merge" else "continuing the adapter of") in log
        first = json.loads((runs / mode / "metrics.jsonl").read_text().splitlines()[0])
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at the start
        chain = json.loads((runs / mode / "data.json").read_text())["lineage"]
        assert [e.get("base") or e["objective"] for e in chain] == ["fttool:tiny-chat", "sft", "dpo"]
        assert chain[1]["run"] == str(runs / "sft") and chain[1]["data"] and chain[2]["data"] != chain[1]["data"]
        assert json.loads((runs / mode / "result.json").read_text())["lineage"] == chain
    r = run_cli("export", f"run={runs / 'merge'}", f"output={tmp_path / 'exported'}")
    assert r.returncode == 0, r.stderr[-2000:]
    card = (tmp_path / "exported" / "README.md").read_text()
    assert "- lineage: `fttool:tiny-chat` -> sft (lora, sft, data" in card and "-> merge (lora, dpo, data" in card
    r = run_cli("check", *steps, f"model.from_run={tmp_path / 'exported'}", "run_name=third")
    assert r.returncode == 0 and f"starts from {tmp_path / 'exported'} (its trained model)" in r.stdout, r.stderr


@pytest.mark.slow
def test_a_sweep_over_beta_with_wandb_gets_the_preference_metrics(tmp_path):
    pytest.importorskip("wandb")
    from test_sweep import sweep_dir_of

    from wandb_records import records

    pairs = write_pairs(tmp_path / "pairs.jsonl", n=32)
    r = run_cli(
        "-m",
        "objective=dpo",
        "data=preference",
        f"data.path={pairs}",
        *FAST,
        "train.max_steps=2",
        "objective.beta=0.1,0.5",
        "logging=wandb",
        "logging.mode=offline",
        f"output_dir={tmp_path}",
        env={"WANDB_MODE": "offline"},
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    sweep = sweep_dir_of(tmp_path)
    trials = sorted(p for p in sweep.iterdir() if p.name.startswith("trial-"))
    assert [t.name for t in trials] == ["trial-00-objective.beta=0.1", "trial-01-objective.beta=0.5"]
    for trial, beta in zip(trials, ("0.1", "0.5")):
        assert f"beta: {beta}" in (trial / "spec.yaml").read_text()
        (run,) = list((trial / "wandb").glob("offline-run-*/run-*.wandb"))
        history = {
            i.key or "/".join(i.nested_key)
            for x in records(run)
            if x.WhichOneof("record_type") == "history"
            for i in x.history.item
        }
        assert any(k.endswith("rewards/accuracies") for k in history), history
        assert any(k.endswith("rewards/margins") for k in history), history
