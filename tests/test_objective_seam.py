"""The seam a new objective plugs into (docs/ARCHITECTURE.md, "Adding an objective"), walked through with a toy
prompt-only objective: its schema, one conf/objective file, one row of OBJECTIVES and one of the worker's
trainer table. Nothing in data/ changes: the prompts features build, preview and batch as they are. It does not
train (online objectives generate their own completions; that is the GRPO work)."""

import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import make_spec, run_cli_here
from fttool.config import objectives, registry
from fttool.config.spec import ObjectiveSpec
from fttool.data.features import PROMPTS
from fttool.errors import UserError


@dataclass
class ToySpec(ObjectiveSpec):
    name: str = "toy"
    temperature: float = 1.0  # a key of its own


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """The toy objective added the documented way, in a copy of conf/ (the shipped tree is never touched)."""
    conf = tmp_path / "conf"
    shutil.copytree(registry.conf_dir(), conf)
    (conf / "objective" / "toy.yaml").write_text("defaults:\n  - /schema/objective/toy@_here_\n  - _self_\n")
    monkeypatch.setattr(registry, "conf_dir", lambda: conf)
    row = objectives.Objective("toy", ToySpec, "toy: prompts only, nothing trained", features=PROMPTS)
    monkeypatch.setitem(objectives.OBJECTIVES, "toy", row)
    monkeypatch.setitem(objectives.SCHEMAS, "toy", ToySpec)
    from fttool.worker import trainers

    monkeypatch.setitem(trainers.CLASSES, "toy", trainers.CLASSES["sft"])
    return row


def test_a_toy_prompt_objective_composes_with_its_own_keys(toy, tmp_path):
    spec = make_spec(["objective=toy", "objective.temperature=0.7"], tmp_path)
    assert isinstance(spec.objective, ToySpec) and spec.objective.temperature == 0.7
    assert objectives.of(spec) is toy
    with pytest.raises(
        UserError,
        match="'objective.beta' belongs to objective=dpo / objective=orpo / objective=kto / objective=grpo, not objective=toy",
    ):
        make_spec(["objective=toy", "objective.beta=0.1"], tmp_path)
    r = run_cli_here("check", "objective=toy", "objective.temperture=0.5", f"output_dir={tmp_path}")
    assert r.returncode == 2 and "Did you mean objective.temperature?" in r.stderr, r.stderr


def test_prompt_features_keep_every_row_and_train_nothing(toy, tmp_path):
    from fttool import data
    from fttool.data.tokenizer import load_tokenizer

    spec = make_spec(["objective=toy", "data.val_ratio=0", "data.max_samples=12"], tmp_path)
    tok = load_tokenizer(spec)
    prepared = data.prepare_datasets(spec, tok, objectives.of(spec).features, use_cache=False)
    st = prepared.stats
    assert st.unit == "prompts" and st.samples == 12 and st.trained_tokens == 0
    assert st.dropped_no_trained_tokens == 0  # "nothing trained" is what a prompt is, not a reason to drop it
    row = prepared.train[0]
    assert set(prepared.train.column_names) == {"input_ids", "prompt", "reference", "length", "loc"}
    # the prompt is the conversation up to the generation prompt, as inference renders it
    assert tok.decode(row["input_ids"]) == row["prompt"] and row["prompt"].endswith("<|im_start|>assistant\n")
    assert data.prompt_ids(tok, _messages(spec, row["loc"])) == row["input_ids"]
    assert row["reference"] and row["reference"] not in row["prompt"]
    batch = objectives.of(spec).features.collator("none", tok)([prepared.train[i] for i in range(3)])
    lengths = [len(prepared.train[i]["input_ids"]) for i in range(3)]
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    assert batch["attention_mask"][:, -1].tolist() == [
        1,
        1,
        1,
    ]  # left-padded: every prompt ends where generation begins
    # a prompt is never cut: one longer than data.max_length is dropped and counted
    lengths = sorted(prepared.train["length"])
    cap = lengths[len(lengths) // 2]
    over = sum(1 for n in lengths if n > cap)
    short = make_spec(["objective=toy", "data.val_ratio=0", "data.max_samples=12", f"data.max_length={cap}"], tmp_path)
    cut = data.prepare_datasets(short, tok, PROMPTS, use_cache=False)
    assert over and cut.stats.dropped_too_long == over and cut.stats.truncated == 0
    assert cut.stats.samples == 12 - over and max(cut.train["length"]) <= cap


def test_preview_shows_the_prompts_and_their_references(toy, tmp_path):
    from fttool.data import preview

    spec = make_spec(["objective=toy", "data.val_ratio=0", "data.max_samples=4"], tmp_path)
    out = io.StringIO()
    preview.run("preview", spec, objectives.of(spec).features, 1, out=out)
    text = out.getvalue()
    assert "── prompt 0 · " in text and "(nothing trained)" in text and "── reference: " in text
    assert "prompts       4 (from" in text and "trained 0 (0.0%)" in text


def _messages(spec, loc):
    """The row at `loc` (path:line) as the conversation before its reply."""
    from fttool import assets

    path, line = loc.rsplit(":", 1)
    rec = json.loads(Path(assets.resolve(path)).read_text().splitlines()[int(line) - 1])
    return rec["messages"][:-1]


def test_a_spec_yaml_from_before_per_objective_schemas_still_loads(tmp_path):
    """Run folders written before objectives had schemas of their own carry every objective's keys under sft."""
    from omegaconf import OmegaConf

    from fttool.config.validation import to_spec
    from fttool.runfolder.folder import spec_to_yaml

    tree = OmegaConf.to_container(OmegaConf.create(spec_to_yaml(make_spec([], tmp_path))))
    tree["objective"] = {"name": "sft", "beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0}
    tree["objective"]["precompute_ref_log_probs"] = False
    spec = to_spec(tree)
    assert type(spec.objective).__name__ == "SftSpec" and not hasattr(spec.objective, "beta")
    tree["objective"]["nonsense"] = 1  # a key no fttool ever wrote is still refused
    with pytest.raises(Exception, match="nonsense"):
        to_spec(tree)
