"""Issue 5: metrics on hand-made cases, validation during training with early stopping and the best checkpoint,
`fttool eval` against the base with a verdict, `fttool export` (merge equivalence), `fttool generate` / `chat`,
the model card and the bad inputs of each verb."""

import json
import math
import os
import re
import shutil
from pathlib import Path

import pytest

from conftest import FAST, SHARED_DATA, make_spec, run_cli, run_cli_here, train_run
from fttool import metrics
from fttool.after import report
from fttool.data.tokenizer import load_tokenizer
from fttool.errors import UserError

# -- metrics ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pred,ref,want",
    [
        ("pink elk cat", "pink elk cat", 1.0),
        ("  pink elk cat\n", "pink elk cat", 1.0),
        ("Pink elk cat", "pink elk cat", 0.0),
        ("pink  elk cat", "pink elk cat", 0.0),
        ("", "x", 0.0),
    ],
)
def test_exact_match(pred, ref, want):
    assert metrics.exact_match(pred, ref) == want


@pytest.mark.parametrize(
    "pred,ref,want",
    [
        ("the cat sat", "cat sat down", 0.8),  # articles dropped: P = 2/2, R = 2/3
        ("cat cat", "cat", 2 / 3),  # a repeated word counts once per occurrence in the reference
        ("The Cat, sat!", "cat sat", 1.0),  # case and punctuation normalised
        ("dog", "cat", 0.0),
        ("", "", 1.0),
        ("", "cat", 0.0),
    ],
)
def test_token_f1(pred, ref, want):
    assert metrics.token_f1(pred, ref) == pytest.approx(want)


@pytest.mark.parametrize(
    "pred,ref,want",
    [
        ("police kill the gunman", "police killed the gunman", 0.75),  # LCS police-the-gunman: 3/4 both ways
        ("the gunman kill police", "police killed the gunman", 0.5),  # LCS the-gunman
        ("a b c", "a b c", 1.0),
        ("x y", "a b", 0.0),
        ("A-B", "a b", 1.0),
        ("a b", "a b c d", 2 * (1.0 * 0.5) / 1.5),  # P = 1, R = 1/2
    ],
)
def test_rouge_l(pred, ref, want):
    assert metrics.rouge_l(pred, ref) == pytest.approx(want)


@pytest.mark.parametrize(
    "pred,want",
    [
        ('{"a": 1}', 1.0),
        ("[1, 2]", 1.0),
        ('```json\n{"a": 1}\n```', 1.0),
        ("{a: 1}", 0.0),
        ("", 0.0),
        ('{"a": 1} trailing', 0.0),
    ],
)
def test_json_valid(pred, want):
    assert metrics.json_valid(pred) == want


def test_json_schema_pass_rate():
    schema = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}
    score = metrics.schema_checker(schema)
    assert score('{"name": "x"}', "") == 1.0
    assert score('{"name": 1}', "") == 0.0 and score("{}", "") == 0.0 and score("not json", "") == 0.0


def test_perplexity_is_the_loss_on_the_trained_reply_tokens(tmp_path):
    """nll() sums exactly what training's loss averages: HF's loss on one example == our sum / count."""
    import torch

    from fttool import data
    from fttool import models as model_lib
    from fttool.after import evaluate

    spec = make_spec(["+recipe=tiny_cpu"], tmp_path)
    tok = load_tokenizer(spec)
    data.training_template(spec, tok)
    model = model_lib.load_base(spec, "fp32")
    ex = {
        "loc": "x:1",
        "example": {
            "kind": "chat",
            "tools": None,
            "messages": [
                {"role": "user", "content": "Reverse the words: a b"},
                {"role": "assistant", "content": "b a"},
            ],
        },
    }
    other = {
        "loc": "x:2",
        "example": {
            "kind": "chat",
            "tools": None,
            "messages": [
                {"role": "user", "content": "Reverse the words: sun moon star"},
                {"role": "assistant", "content": "star moon sun"},
            ],
        },
    }
    enc = evaluate._encode(tok, spec, [ex, other], evaluate.SEQUENCES)
    got = evaluate.nll(model, enc)  # batched together, padded
    for i in range(2):
        ids, labels = torch.tensor([enc["input_ids"][i]]), torch.tensor([enc["labels"][i]])
        with torch.no_grad():
            want = model(input_ids=ids, labels=labels).loss.item()
        total, count = got[i]
        assert count == sum(1 for x in enc["labels"][i][1:] if x != -100) > 0
        assert total / count == pytest.approx(want, abs=1e-5)


def test_verdict_against_the_margin():
    base, tuned = {"exact_match": 0.1, "perplexity": 9.0}, {"exact_match": 0.3, "perplexity": 4.0}
    assert report.verdict(tuned, base, {"exact_match": 0.0})["verdict"] == "pass"
    assert report.verdict(tuned, base, {"exact_match": 0.2})["verdict"] == "pass"  # exactly the margin
    assert report.verdict(tuned, base, {"exact_match": 0.25})["verdict"] == "fail"
    assert report.verdict(tuned, base, {"perplexity": 5.0})["verdict"] == "pass"  # lower is better
    assert report.verdict(tuned, base, {"perplexity": 5.5})["verdict"] == "fail"
    assert report.verdict(base, base, {"exact_match": 0.0})["verdict"] == "fail"  # a tie does not beat the base
    both = report.verdict(tuned, base, {"exact_match": 0.0, "perplexity": 6.0})
    assert both["verdict"] == "fail" and "NOT met" in both["reasons"][1] and "met" in both["reasons"][0]
    assert report.verdict(tuned, None, {"exact_match": 0.0})["verdict"] is None
    assert report.verdict({"perplexity": math.nan}, base, {"perplexity": 0.0})["verdict"] == "fail"


def test_end_of_turn_token_stops_generation_even_when_eos_differs():
    from transformers import AutoTokenizer

    from fttool.after.evaluate import stop_ids

    tok = AutoTokenizer.from_pretrained(SHARED_DATA / "tokenizers" / "phi-3-mini")
    end = tok.convert_tokens_to_ids("<|end|>")
    assert tok.eos_token == "<|endoftext|>" and end in stop_ids(tok) and tok.eos_token_id in stop_ids(tok)


# -- config -----------------------------------------------------------------------------------------------
BAD = [
    (["data.metrics=[exact_mach]"], "unknown metric 'exact_mach'. Did you mean exact_match?"),
    (["data.metrics=[]"], "data.metrics is empty"),
    (["data.metrics=[json_schema]"], "data.json_schema is not set"),
    (["eval.gate={bleu:0.1}"], "eval.gate.bleu: the verdict can only use a metric the data group scores"),
    (["eval.gate={exact_match:-1}"], "expected a margin >= 0"),
    (["data.val_ratio=0", "train.early_stopping_patience=2"], "the data has no validation split"),
    (["data.val_ratio=0", "train.eval_steps=10"], "there is no validation split to evaluate"),
    (["train.eval_steps=7", "train.save_steps=20"], "train.save_steps=20 is not a multiple of train.eval_steps=7"),
    (["train.early_stopping_patience=2", "train.load_best=false"], "needs train.load_best=true"),
    (["data.json_schema=/no/such.json"], "data.json_schema=/no/such.json: file not found"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_eval_config(overrides, message, tmp_path):
    with pytest.raises(UserError) as e:
        make_spec(["+recipe=tiny_cpu", *overrides], tmp_path)
    assert message in str(e.value)


def test_run_verb_overrides_use_the_same_parser_and_key_checks_as_a_new_run(tmp_path):
    """`fttool eval run=... eval.gate=...` changes a frozen spec through compose.override_spec."""
    from fttool.after.run_verbs import parse
    from fttool.config.compose import override_spec

    spec = make_spec(["+recipe=tiny_cpu"], tmp_path)
    own, overrides = parse("eval", ["run=r", "eval.gate={exact_match:0.05}", "data.metrics=[exact_match,token_f1]"])
    assert own == {"run": "r"} and overrides == ["eval.gate={exact_match:0.05}", "data.metrics=[exact_match,token_f1]"]
    changed = override_spec(spec, overrides)
    assert dict(changed.eval.gate) == {"exact_match": 0.05} and list(changed.data.metrics) == [
        "exact_match",
        "token_f1",
    ]
    assert changed.train == spec.train and changed.model == spec.model  # nothing else moves
    with pytest.raises(UserError, match=r"unknown key 'eval.gat'\. Did you mean eval.gate\?"):
        override_spec(spec, ["eval.gat={exact_match:0.05}"])
    with pytest.raises(UserError, match="eval.gate.bleu: the verdict can only use a metric"):
        override_spec(spec, ["eval.gate={bleu:0.1}"])
    with pytest.raises(UserError, match="could not read an override"):
        override_spec(spec, ["eval.gate={exact_match:"])
    with pytest.raises(UserError, match=r"eval: unknown key 'eval_gate'"):
        parse("eval", ["run=r", "eval_gate=1"])


def test_every_verb_in_the_table_has_its_handler():
    import inspect

    from fttool.verbs import VERBS

    for name, verb in VERBS.items():
        assert verb.on in ("spec", "run", "tool"), name
        params = list(inspect.signature(verb.call()).parameters)
        assert len(params) == {"spec": 1, "run": 3, "tool": 2}[verb.on], (name, params)
        assert bool(verb.subcommands) == (verb.on == "tool"), name  # a tool verb's help lists its subcommands


def test_bad_schema_file_names_the_line(tmp_path):
    bad = tmp_path / "s.json"
    bad.write_text('{\n  "type": "object",\n  "required": name\n}')
    with pytest.raises(UserError, match=r"s.json:3: not valid JSON"):
        make_spec(["+recipe=tiny_cpu", f"data.json_schema={bad}"], tmp_path)
    bad.write_text('{"type": "objekt"}')
    with pytest.raises(UserError, match="not a valid JSON Schema"):
        make_spec(["+recipe=tiny_cpu", f"data.json_schema={bad}"], tmp_path)


# -- training: validation at an interval, early stopping, the best checkpoint, loss.png ------------------


@pytest.mark.slow
def test_early_stopping_keeps_and_marks_the_best_checkpoint(tmp_path):
    from safetensors.torch import load_file

    # a threshold no step can clear: the second validation counts as no improvement, patience 1 stops there
    run_dir, summary = train_run(
        [
            "+recipe=tiny_cpu",
            "train.max_steps=40",
            "train.logging_steps=1",
            "train.eval_steps=3",
            "train.save_steps=3",
            "train.early_stopping_patience=1",
            "train.early_stopping_threshold=100",
            "train.save_total_limit=1",
            "eval.after_training=false",
        ],
        tmp_path,
    )
    assert summary["stopped_early"] and summary["steps"] == 6
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}
    assert sorted(val) == [3, 6]
    best_step = min(val, key=val.get)
    assert summary["best_step"] == best_step and summary["best_eval_loss"] == pytest.approx(val[best_step])
    link = run_dir / "checkpoints" / "best"
    assert link.is_symlink() and link.resolve().name == f"checkpoint-{best_step}"
    assert summary["eval_loss"] == pytest.approx(val[best_step], abs=1e-5)  # final/ holds the best weights
    final, best = (
        load_file(run_dir / "final" / "adapter_model.safetensors"),
        load_file(link / "adapter_model.safetensors"),
    )
    assert final.keys() == best.keys() and all((final[k] == best[k]).all() for k in final)
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "early stopping at step 6" in (run_dir / "train.log").read_text()


def test_validation_split_that_rounds_to_nothing_is_refused(tmp_path):
    with pytest.raises(UserError, match="the validation split is empty"):
        train_run(["+recipe=tiny_cpu", "data.max_samples=8", "data.val_ratio=0.00001", *FAST], tmp_path)


# -- the verbs on a trained run ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny LoRA run (400 steps, ~20 s) with a validation split and the demo test file, trained from the CLI."""
    out = tmp_path_factory.mktemp("runs")
    r = run_cli(
        "+recipe=tiny_cpu",
        "train.max_steps=400",
        "train.save_steps=100",
        "eval.after_training=false",
        "run_name=tiny",
        f"output_dir={out}",
        cwd=out,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return out / "tiny"


@pytest.mark.slow
def test_eval_writes_the_comparison_and_the_verdict(trained, tmp_path):
    r = run_cli("eval", f"run={trained}", "eval.samples=12", cwd=tmp_path)
    assert r.returncode in (0, 3), r.stderr[-3000:]
    result = json.loads((trained / "eval.json").read_text())
    assert result["examples"] == 12 and result["metrics"] == ["exact_match", "token_f1", "rouge_l", "perplexity"]
    for side in ("finetuned", "base"):
        assert set(result[side]) == set(result["metrics"])
    assert result["finetuned"]["perplexity"] < result["base"]["perplexity"] / 5  # the adapter learned the task
    assert result["finetuned"]["token_f1"] > result["base"]["token_f1"]
    assert result["diff"]["token_f1"] == pytest.approx(result["finetuned"]["token_f1"] - result["base"]["token_f1"])
    assert result["gate"] == {"token_f1": 0.1} and result["verdict"] in ("pass", "fail")  # tiny_cpu's gate
    assert (r.returncode == 3) == (result["verdict"] == "fail")
    md = (trained / "eval.md").read_text()
    assert "| token_f1 ↑ |" in md and "| perplexity ↓ |" in md and f"verdict: {result['verdict'].upper()}" in md
    samples = [json.loads(x) for x in (trained / "eval_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 12 and {"prompt", "reference", "finetuned", "base", "finetuned_scores"} <= set(samples[0])
    assert "held-out evaluation, 12 examples" in r.stdout and "verdict:" in r.stdout


@pytest.mark.slow
def test_eval_gate_decides_the_exit_code(trained, tmp_path):
    r = run_cli_here("eval", f"run={trained}", "eval.samples=8", "data.metrics=[perplexity,token_f1]", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]  # perplexity is the gate (first metric): the fine-tune beats the base
    assert json.loads((trained / "eval.json").read_text())["verdict"] == "pass"
    r = run_cli_here(
        "eval",
        f"run={trained}",
        "eval.samples=8",
        "data.metrics=[perplexity,token_f1]",
        "eval.gate={token_f1:0.99}",
        cwd=tmp_path,
    )
    assert r.returncode == 3 and "did not beat the base" in r.stderr
    result = json.loads((trained / "eval.json").read_text())
    assert result["verdict"] == "fail" and "NOT met" in result["reasons"][0]


@pytest.mark.slow
def test_eval_json_metrics_and_schema(trained, tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "required": ["words"]}))
    test = tmp_path / "json_test.jsonl"
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Reverse the words: {w}"},
                {"role": "assistant", "content": '{"words": 1}'},
            ]
        }
        for w in ("a b", "c d", "e f")
    ]
    test.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = run_cli_here(
        "eval",
        f"run={trained}",
        f"data.test_path={test}",
        f"data.json_schema={schema}",
        "data.metrics=[json_valid]",
        "eval.gate={}",  # the run's recipe gates on token_f1, which these metrics do not score
        "eval.compare_base=false",
        cwd=tmp_path,
    )  # a schema given is scored
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads((trained / "eval.json").read_text())
    assert result["examples"] == 3 and result["base"] is None and result["verdict"] is None
    assert result["finetuned"] == {"json_valid": 0.0, "json_schema": 0.0}  # it learned to reverse words, not JSON


@pytest.mark.slow
def test_eval_bad_input(trained, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cases = [
        ([f"data.test_path={empty}"], "the test split is empty"),
        (["eval.samplez=3"], "Did you mean eval.samples?"),
        (["train.lr=1"], "of the run's settings only eval.*"),
        (["checkpoint=99"], "checkpoint=99: "),
        (["data.metrics=[bleu]"], "unknown metric 'bleu'"),
    ]
    for extra, message in cases:
        r = run_cli_here("eval", f"run={trained}", *extra, cwd=tmp_path)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (extra, r.stderr[-1500:])
    r = run_cli_here("eval", cwd=tmp_path)
    assert r.returncode == 2 and "missing run=VALUE" in r.stderr
    r = run_cli_here(
        "eval", f"run={trained}", "checkpoint=best", "eval.samples=2", "eval.max_new_tokens=8", cwd=tmp_path
    )
    assert r.returncode in (0, 3), r.stderr[-1500:]  # the run validated, so it has a best checkpoint
    assert json.loads((trained / "eval.json").read_text())["checkpoint"] == str(
        (trained / "checkpoints" / "best").resolve()
    )
    r = run_cli_here("eval", f"run={tmp_path}", cwd=tmp_path)
    assert r.returncode == 2 and "not an fttool run folder" in r.stderr


def test_run_folder_without_final_or_adapter(trained, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy, symlinks=True)
    (copy / "final" / "adapter_config.json").unlink()
    for verb, extra in (("eval", []), ("export", [f"output={tmp_path / 'x'}"]), ("generate", ["prompt=hi"])):
        r = run_cli_here(verb, f"run={copy}", *extra, cwd=tmp_path)
        assert r.returncode == 2 and "holds no adapter (adapter_config.json missing)" in r.stderr, (
            verb,
            r.stderr[-1500:],
        )
    shutil.rmtree(copy / "final")
    r = run_cli_here("export", f"run={copy}", f"output={tmp_path / 'x'}", cwd=tmp_path)
    assert r.returncode == 2 and "has no final/: the run did not finish" in r.stderr and "checkpoint=last" in r.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_eval_of_a_run_without_a_test_split(tmp_path):
    run_dir, summary = train_run(
        ["+recipe=tiny_cpu", *FAST, "data.test_path=null", "eval.after_training=true"], tmp_path
    )
    assert "eval" not in summary  # nothing to evaluate after training, and no complaint
    r = run_cli_here("eval", f"run={run_dir}", cwd=tmp_path)
    assert (
        r.returncode == 2 and "the test split is empty (no test split" in r.stderr and "data.test_path=FILE" in r.stderr
    )


# -- export ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_export_reloads_with_plain_transformers_and_matches_base_plus_adapter(trained, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fttool import assets

    out = tmp_path / "exported"
    r = run_cli("export", f"run={trained}", f"output={out}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "model.safetensors").is_file() and not list(out.glob("adapter_*"))
    merged = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    base_path = assets.resolve("fttool:tiny-chat")
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), trained / "final")
    plain_base = AutoModelForCausalLM.from_pretrained(base_path)
    prompts = [[{"role": "user", "content": f"Reverse the words: {w}"}] for w in ("ape cat elk", "sun moon", "a b c d")]
    batch = tok.apply_chat_template(
        prompts, add_generation_prompt=True, return_tensors="pt", padding=True, return_dict=True
    )
    with torch.no_grad():
        a = merged(**batch).logits
        b = unmerged(**batch).logits
        c = plain_base(**batch).logits
    assert (a - b).abs().max().item() < 1e-4  # merged == base + adapter
    assert (a - c).abs().max().item() > 1e-2  # and the adapter did change the model
    gen = dict(max_new_tokens=24, do_sample=False)
    for p in prompts:
        ids = tok.apply_chat_template([p[0]], add_generation_prompt=True, return_tensors="pt", return_dict=True)
        x, y = merged.generate(**ids, **gen), unmerged.generate(**ids, **gen)  # eos from the exported generation_config
        assert x.tolist() == y.tolist()
        assert x[0, -1].item() == tok.convert_tokens_to_ids("<|im_end|>")  # plain generate stops at end of turn
    assert tok.chat_template == AutoTokenizer.from_pretrained(trained / "final").chat_template
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    card = (out / "README.md").read_text()
    data = json.loads((trained / "data.json").read_text())
    for needle in (
        "base_model: fttool:tiny-chat",
        "method: **lora**, rank 16",
        data["key"]["sources"][0][0],
        "15,680 training samples",
        "| transformers |",
        "```yaml",
        "+recipe=tiny_cpu",
    ):
        assert needle in card, needle
    assert (out / "fttool" / "spec.yaml").is_file() and (out / "fttool" / "loss.png").is_file()
    again = run_cli_here("export", f"run={trained}", f"output={out}", cwd=tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr and "overwrite=true" in again.stderr


def test_export_never_replaces_what_it_did_not_make(trained, tmp_path, monkeypatch):
    """Issue 24: `output=runs overwrite=true` once deleted every run. Now only an earlier export is replaced (its
    fttool/EXPORT.json), written beside it and swapped in by rename, so a failed export leaves the old one whole."""
    import platform

    from fttool.after import public

    runs = trained.parent
    (runs / "other-run").mkdir(exist_ok=True)
    (runs / "other-run" / "keep.txt").write_text("b")
    home = tmp_path / "home"
    (home / "work").mkdir(parents=True)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("not an export")
    monkeypatch.setenv("HOME", str(home))
    for output, why in (
        (runs, "it holds the run folder"),
        (trained, "inside the run folder"),
        (home / "work", "it is the working directory"),
        (home, "it holds the working directory"),
        (Path("/"), "it holds the run folder"),
        (mine, "not a folder an fttool export made"),
        (mine / "notes.txt", "is a file"),
    ):
        r = run_cli_here("export", f"run={trained}", f"output={output}", "overwrite=true", cwd=home / "work")
        assert r.returncode == 2 and why in r.stderr, (output, r.stderr)
    assert (runs / "other-run" / "keep.txt").read_text() == "b" and (mine / "notes.txt").is_file()

    out = tmp_path / "export"
    r = run_cli_here("export", f"run={trained}", f"output={out}", cwd=tmp_path)
    assert r.returncode == 0 and public.is_export(out), r.stderr
    first = (out / "model.safetensors").stat().st_mtime_ns
    # the record carries the spec and the lineage, not the machine: no env.json or command.txt, no host, no paths
    record = {p.name for p in (out / "fttool").iterdir()}  # eval.json/eval.md too once the run is evaluated
    assert {"EXPORT.json", "data.json", "loss.png", "result.json", "spec.yaml"} <= record, record
    assert record <= {"EXPORT.json", "data.json", "loss.png", "result.json", "spec.yaml", "eval.json", "eval.md"}
    for f in [*(out / "fttool").glob("*.json"), out / "fttool" / "spec.yaml", out / "README.md"]:
        text = f.read_text()
        assert not re.search(rf"\b{re.escape(platform.node())}\b", text), (f, platform.node())
        for local in (str(tmp_path), str(runs), os.getcwd(), os.path.expanduser("~")):
            assert local not in text, (f, local)
    assert "base_model: fttool:tiny-chat" in (out / "README.md").read_text()

    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(public, "write_record", broken)
    r = run_cli_here("export", f"run={trained}", f"output={out}", "overwrite=true", cwd=tmp_path)
    assert r.returncode != 0
    assert (out / "model.safetensors").stat().st_mtime_ns == first and public.is_export(out)  # the old one, whole
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no partial left beside it
    monkeypatch.undo()
    r = run_cli_here("export", f"run={trained}", f"output={out}", "overwrite=true", cwd=tmp_path)
    assert r.returncode == 0 and (out / "model.safetensors").stat().st_mtime_ns != first, r.stderr


def test_a_foreign_run_folder_neither_resolves_nor_trusts_code(trained, tmp_path, monkeypatch):
    """Issue 24: a run folder from someone else: its spec.yaml's interpolations stay text, and its
    model.trust_remote_code counts only when this command line says trust_remote_code=true."""
    foreign = tmp_path / "foreign"
    shutil.copytree(trained, foreign, ignore=shutil.ignore_patterns("checkpoints"))
    spec = (foreign / "spec.yaml").read_text()
    assert "template_kwargs: {}" in spec and "trust_remote_code: false" in spec
    planted = spec.replace("template_kwargs: {}", "template_kwargs:\n    who: ${oc.env:FTTOOL_PLANTED}")
    (foreign / "spec.yaml").write_text(planted.replace("trust_remote_code: false", "trust_remote_code: true"))
    monkeypatch.setenv("FTTOOL_PLANTED", "planted-secret-value")
    for verb, extra in (("eval", []), ("export", [f"output={tmp_path / 'out'}"]), ("generate", ["prompt=hi"])):
        r = run_cli_here(verb, f"run={foreign}", *extra, cwd=tmp_path)
        assert r.returncode == 2 and "add trust_remote_code=true to this command" in r.stderr, (verb, r.stderr)
    r = run_cli_here("export", f"run={foreign}", f"output={tmp_path / 'out'}", "trust_remote_code=true", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    exported = (tmp_path / "out" / "fttool" / "spec.yaml").read_text()
    assert "${oc.env:FTTOOL_PLANTED}" in exported and "planted-secret-value" not in exported
    r = run_cli_here("check", f"model.from_run={foreign}", "+recipe=tiny_cpu", cwd=tmp_path)
    assert r.returncode == 0 and "planted-secret-value" not in r.stdout + r.stderr, r.stderr


@pytest.mark.slow
def test_export_of_qlora_never_saves_the_quantized_base(tmp_path):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from fttool import assets

    pytest.importorskip("bitsandbytes")
    run_dir, _ = train_run(["+recipe=tiny_cpu", "method=qlora", *FAST, "train.lr=1e-2"], tmp_path)
    out = tmp_path / "merged"
    r = run_cli("export", f"run={run_dir}", f"output={out}", "dtype=float32", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    tensors = load_file(out / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in tensors.values())  # no packed 4-bit storage, no quant state
    assert not any("absmax" in k or "quant" in k for k in tensors)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(out)
    full_base = AutoModelForCausalLM.from_pretrained(assets.resolve("fttool:tiny-chat"))
    unmerged = PeftModel.from_pretrained(full_base, run_dir / "final")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        assert (merged(ids).logits - unmerged(ids).logits).abs().max().item() < 1e-4
    assert "trained against the quantized base" in (out / "README.md").read_text()


# -- generate and chat -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_generate_stops_at_end_of_turn(trained, tmp_path):
    from fttool import data
    from fttool import models as model_lib
    from fttool.after.evaluate import generate
    from fttool.launch import rundir

    spec = rundir.load_spec(trained)
    tok = load_tokenizer(spec)
    data.training_template(spec, tok)
    model = model_lib.load_trained(spec, "fp32", trained / "final")
    convs = [
        [{"role": "user", "content": f"Reverse the words: {w}"}] for w in ("ape cat elk pink", "sun fox", "cow bee yak")
    ]
    replies = generate(model, tok, convs, max_new_tokens=48)
    assert all(stopped for _, stopped in replies), replies  # each reply ended with <|im_end|>, long before 48 tokens
    assert all("<|im" not in r and "\n" not in r and len(r.split()) <= 8 for r, _ in replies), replies
    # the same from the CLI: one prompt, then a JSONL of prompts to a file
    r = run_cli("generate", f"run={trained}", "prompt=Reverse the words: ape cat elk pink", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == replies[0][0], r.stderr[-2000:]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "Reverse the words: sun fox"}) + "\n\n" + json.dumps({"messages": convs[2]}) + "\n"
    )
    out = tmp_path / "replies.jsonl"
    r = run_cli("generate", f"run={trained}", f"input={prompts}", f"output={out}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["reply"] for x in rows] == [replies[1][0], replies[2][0]] and all(x["stopped"] for x in rows)
    assert rows[0]["loc"] == f"{prompts}:1" and rows[1]["loc"] == f"{prompts}:3"


@pytest.mark.slow
def test_chat_keeps_the_conversation_and_resets(trained, tmp_path):
    import subprocess
    import sys

    talk = "Reverse the words: ape cat\nReverse the words: sun fox\n/reset\nReverse the words: ape cat\n/exit\n"
    r = subprocess.run(
        [sys.executable, "-m", "fttool", "generate", "chat", f"run={trained}", "max_new_tokens=16"],
        input=talk,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 3 and lines[0] == lines[2]  # after /reset the same question gets the same greedy reply
    assert "conversation cleared" in r.stderr


@pytest.mark.slow
def test_generate_bad_input(trained, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + '{"promt": "typo"}\n')
    ends_with_reply = tmp_path / "reply.jsonl"
    ends_with_reply.write_text(
        json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}) + "\n"
    )
    cases = [
        (["generate", f"run={trained}", f"input={bad}"], f"{bad}:2: expected"),
        (["generate", f"run={trained}", f"input={ends_with_reply}"], "already ends with an assistant reply"),
        (["generate", f"run={trained}", "input=/no/such.jsonl"], "input=/no/such.jsonl: file not found"),
        (["generate", f"run={trained}"], "give one of prompt=VALUE or input=VALUE"),
        (["generate", f"run={trained}", f"model={trained}", "prompt=x"], "(not both)"),
        (["generate", f"run={trained}", "prompt=x", "max_new_tokns=3"], "Did you mean max_new_tokens?"),
        (["generate", f"run={trained}", "prompt=x", "temperature=hot"], "temperature=hot: expected a number"),
        (["generate", f"model={trained}", "prompt=x"], "It is a run folder: use run=PATH"),
        (["chat", f"run={trained}", "checkpoint=nope"], "checkpoint=nope: expected final, best, last"),
    ]
    for args, message in cases:
        r = run_cli_here(*args, cwd=tmp_path)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr[-1500:])


def test_help_lists_the_run_verbs(tmp_path):
    r = run_cli_here("--help", cwd=tmp_path)
    assert r.returncode == 0 and "eval " in r.stdout and "export " in r.stdout and "chat " in r.stdout
    r = run_cli_here("export", "--help", cwd=tmp_path)
    assert r.returncode == 0 and "output" in r.stdout and "dtype" in r.stdout
    r = run_cli_here("evaluate", cwd=tmp_path)
    assert r.returncode == 2 and "Did you mean eval" in r.stderr


@pytest.mark.slow
def test_full_fine_tune_eval_and_export_with_a_ratio_split(tmp_path):
    """method=full: the base is reloaded for the comparison; the export is the trained model itself. A test split
    cut by ratio is re-cut identically, and a warning says so when the sources changed since training."""
    import torch
    from transformers import AutoModelForCausalLM

    from fttool import assets

    src = tmp_path / "rows.jsonl"
    src.write_text("".join(open(assets.resolve("fttool:demo/train.jsonl")).readlines()[:200]))
    run_dir, summary = train_run(
        [
            "+recipe=tiny_cpu",
            "method=full",
            *FAST,
            "data=chat",
            f"data.path={src}",
            "data.test_ratio=0.1",
            "eval.after_training=true",
            "eval.samples=4",
        ],
        tmp_path,
    )
    assert summary["eval"]["examples"] == 4 and summary["data"]["test"] == 20
    assert summary["eval"]["base"]["perplexity"] > summary["eval"]["finetuned"]["perplexity"]
    r = run_cli("eval", f"run={run_dir}", "eval.samples=null", cwd=tmp_path)  # the run's own setting was 4
    assert r.returncode in (0, 3) and "data sources changed" not in r.stdout, r.stderr[-2000:]
    assert json.loads((run_dir / "eval.json").read_text())["examples"] == 20
    with open(src, "a") as f:
        f.write(
            json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}) + "\n"
        )
    r = run_cli("eval", f"run={run_dir}", cwd=tmp_path)
    assert "data sources changed since training" in r.stdout and "data.test_path=FILE" in r.stdout
    r = run_cli("export", f"run={run_dir}", "output=full-export", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = (
        AutoModelForCausalLM.from_pretrained(tmp_path / "full-export"),
        AutoModelForCausalLM.from_pretrained(run_dir / "final"),
    )
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
    assert "method: **full**" in (tmp_path / "full-export" / "README.md").read_text()


@pytest.mark.slow
def test_a_gpu_run_on_a_machine_without_one_says_how_to_use_the_cpu(trained, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    copy = tmp_path / "gpu-run"
    shutil.copytree(trained, copy, symlinks=True)
    spec = copy / "spec.yaml"
    spec.write_text(
        spec.read_text().replace("device: cpu", "device: cuda").replace("precision: fp32", "precision: auto")
    )
    r = run_cli_here("eval", f"run={copy}", cwd=tmp_path)
    assert r.returncode == 2 and "add hardware.device=cpu" in r.stderr, r.stderr[-1500:]
    r = run_cli_here("generate", f"run={copy}", "prompt=Reverse the words: ape cat", cwd=tmp_path)
    assert r.returncode == 2 and "add device=cpu" in r.stderr, r.stderr[-1500:]
    r = run_cli_here("generate", f"run={copy}", "prompt=Reverse the words: ape cat", "device=cpu", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip(), r.stderr[-1500:]


@pytest.mark.parametrize("attention", ["cpu", "cuda_like"])
def test_batched_generation_equals_one_at_a_time(attention, trained, monkeypatch):
    """Left padding in a batch must not change a greedy reply (scores would depend on eval.batch_size), also where
    the attention kernel returns NaN for the pad positions' fully masked rows, as CUDA's does (tests/cuda_like.py)."""
    import torch

    from cuda_like import cuda_like_sdpa
    from fttool import data
    from fttool import models as model_lib
    from fttool.after.evaluate import generate
    from fttool.launch import rundir

    if attention == "cuda_like":
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", cuda_like_sdpa)

    spec = rundir.load_spec(trained)
    tok = load_tokenizer(spec)
    data.training_template(spec, tok)
    model = model_lib.load_trained(spec, "fp32", trained / "final")
    convs = [
        [{"role": "user", "content": f"Reverse the words: {w}"}]
        for w in ("ape cat elk pink sun", "fox", "cow bee", "ship moon star lamp fire")
    ]
    assert generate(model, tok, convs, 24, batch_size=4) == [
        generate(model, tok, [c], 24, batch_size=1)[0] for c in convs
    ]


def test_chat_sends_the_whole_conversation_and_reset_clears_it(monkeypatch, capsys):
    """What the model is given each turn: every earlier turn and its reply, the system message kept across /reset."""
    import io
    import sys

    from fttool.after import evaluate, generate

    seen = []

    def fake_generate(model, tok, conversations, **opts):
        seen.append([dict(m) for m in conversations[0]])
        return [(f"reply {len(seen)}", True)]

    monkeypatch.setattr(evaluate, "generate", fake_generate)
    monkeypatch.setattr(sys, "stdin", io.StringIO("one\ntwo\n/reset\nthree\n"))
    generate.chat(None, None, [{"role": "system", "content": "S"}], {"max_new_tokens": 4}, "test")
    assert [[m["content"] for m in conv] for conv in seen] == [
        ["S", "one"],
        ["S", "one", "reply 1", "two"],
        ["S", "three"],
    ]
    assert capsys.readouterr().out.split("\n")[:3] == ["reply 1", "reply 2", "reply 3"]


@pytest.mark.parametrize("loss,expected", [(float("nan"), "nan"), (800.0, "inf"), (2.0, "finite")])
def test_perplexity_of_broken_outputs_says_why(loss, expected, monkeypatch, tmp_path):
    """NaN logits used to show as perplexity n/a with nothing said; a huge loss overflowed math.exp."""
    import logging

    from fttool.after import evaluate

    monkeypatch.setattr(evaluate, "nll", lambda model, encoded: [(loss * 3, 3)])
    spec = make_spec(["data.metrics=[perplexity]"], tmp_path)
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logging.getLogger("fttool").addHandler(handler)
    try:
        out = evaluate.score(None, None, spec, [{"messages": [], "reference": ""}], {}, {})
    finally:
        logging.getLogger("fttool").removeHandler(handler)
    ppl = out["metrics"]["perplexity"]
    assert {"nan": math.isnan(ppl), "inf": ppl == float("inf"), "finite": ppl == pytest.approx(math.exp(2.0))}[expected]
    assert any("cannot be scored" in m for m in seen) == (expected == "nan")


@pytest.mark.parametrize(
    "reply,reference,score",
    [
        ("4 x 12 = 48\n#### 48", "4 x 12 = 48\n#### 48", 1.0),
        ("She has 48 stickers.", "#### 48", 1.0),  # the last number of a free-form reply
        ("48 stickers, not 12", "#### 48", 0.0),
        ("the answer is \\boxed{1,250}", "#### 1250", 1.0),
        ("It costs $18.00.", "x = 18\n#### 18", 1.0),
        ("#### -3", "#### -3", 1.0),
        ("no number here", "#### 3", 0.0),
        ("#### 48\nsome 7 words after", "#### 48", 1.0),  # an explicit #### wins over later numbers
    ],
)
def test_numeric_answer_compares_the_final_numbers(reply, reference, score):
    assert metrics.numeric_answer(reply, reference) == score


def test_the_gsm8k_and_word_problem_groups_gate_on_the_final_answer(tmp_path):
    from fttool.config.spec import effective_gate

    for extra in (["data=word_problems"], ["data=gsm8k", "data.path=x.jsonl"]):
        spec = make_spec(extra, tmp_path)
        assert effective_gate(spec) == {"numeric_answer": 0.0}
