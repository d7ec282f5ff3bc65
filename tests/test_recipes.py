"""`fttool recipes` (list, show, diff, save), the recipe `meta:` header, expected results, and the migrations of keys
older recipe schemas had. Nothing here trains: run folders are made the way the launcher makes them, with a
result.json written by hand."""

import json
import subprocess
import sys
from dataclasses import replace

import pytest
from omegaconf import OmegaConf

from conftest import ROOT, run_cli, run_cli_here
from fttool import cli
from fttool.config import compose, recipes, registry
from fttool.errors import UserError
from fttool.launch import recipe_verbs, rundir
from fttool.runfolder import runfiles

RESULT = {"tokens_per_s": 1234.56, "peak_memory": {"peak_rss_gib": 0.61}, "last_loss": 0.4123, "train_loss": 0.9}


@pytest.fixture
def team(tmp_path, monkeypatch):
    """A team recipe folder on FTTOOL_RECIPE_PATH."""
    folder = tmp_path / "team"
    folder.mkdir()
    monkeypatch.setenv(registry.RECIPE_PATH_ENV, str(folder))
    return folder


def write(folder, name, body):
    (folder / f"{name}.yaml").write_text("# @package _global_\n" + body)


def recipes_cli(capsys, *argv):
    """`fttool recipes ARGV` in this process: (stdout, stderr, exit code)."""
    code = 0
    try:
        cli.main(["recipes", *argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return out, err, code


def finished_run(tmp_path, overrides, name="run", result=RESULT):
    """A run folder as the launcher leaves it (spec.yaml, command.txt, env.json with the group choices) and a
    result.json as training would write it."""
    registry.register()
    checked = compose.precheck([f"output_dir={tmp_path / 'runs'}", f"run_name={name}", *overrides])[0]
    run_dir, _ = rundir.prepare(checked.spec, ["fttool", *overrides], checked.choices)
    rundir.unlock(run_dir)
    if result is not None:
        runfiles.write_json(run_dir / runfiles.RESULT, result)
    return run_dir, checked.spec


def composed(overrides, tmp_path):
    registry.register()
    return compose.precheck([f"output_dir={tmp_path / 'again'}", *overrides])[0].spec


# -- the shipped recipes' headers ------------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_recipe_has_a_valid_meta_header(path):
    tree = OmegaConf.to_container(OmegaConf.load(path))
    recipes.check_file(path, tree)
    meta = recipes.meta_of(tree)
    assert meta["schema"] == recipes.SCHEMA and meta["owner"] == "fttool"
    assert meta["description"] and meta["hardware"]
    if path.stem.endswith("_cpu"):  # measured on this project's CI machine; GPU figures are not invented
        (entry,) = meta["expected"]
        assert entry["on"] == "2-core CPU (CI)" and all(entry.get(f) for f in recipes.FIGURES)
    else:
        assert not meta.get("expected")


def test_meta_never_reaches_the_composed_config():
    registry.register()
    cfg = compose.compose(["+recipe=tiny_cpu"])
    assert "meta" not in cfg and cfg.train.max_steps == 60


def test_a_recipe_without_schema_is_the_current_schema(team, tmp_path):
    write(team, "plain", "meta:\n  description: ours\ntrain:\n  max_steps: 7\n")
    assert composed(["+recipe=plain"], tmp_path).train.max_steps == 7


# -- meta validation ------------------------------------------------------------------------------------------
BAD_META = [
    ("meta:\n  descripton: x\n", "meta.descripton: not a meta field. Did you mean meta.description?"),
    ("meta:\n  schema: two\n", "meta.schema: expected the schema version as a whole number >= 1"),
    ("meta:\n  description: |\n    two\n    lines\n", "meta.description: expected one line of text"),
    ("meta:\n  owner: [a, b]\n", "meta.owner: expected one line of text"),
    ("meta: just text\n", "meta must be a mapping of schema, description, owner, hardware, expected"),
    ("meta:\n  expected: {on: x}\n", "meta.expected: expected a list of {on: HARDWARE"),
    ("meta:\n  expected:\n    - {tokens_per_s: 5}\n", "meta.expected[0].on: name the hardware"),
    (
        "meta:\n  expected:\n    - {on: cpu, tokens_per_sec: 5}\n",
        "meta.expected[0].tokens_per_sec: not a field of an expected result. Did you mean "
        "meta.expected[0].tokens_per_s?",
    ),
    ("meta:\n  expected:\n    - {on: cpu, final_loss: -1}\n", "meta.expected[0].final_loss: expected a number > 0"),
    (
        "meta:\n  expected:\n    - {on: cpu, tolerance: 2}\n",
        "meta.expected[0].tolerance: expected a fraction from 0 to 1",
    ),
    (
        "meta:\n  expected:\n    - {on: cpu, tolerance: {final_los: 0.5}}\n",
        "meta.expected[0].tolerance.final_los: not a figure. Did you mean final_loss?",
    ),
]


@pytest.mark.parametrize("body,message", BAD_META, ids=[m for _, m in BAD_META])
def test_bad_meta_names_the_file_and_the_field(body, message, team, tmp_path):
    write(team, "bad_meta", body)
    with pytest.raises(UserError) as e:
        composed(["+recipe=bad_meta"], tmp_path)
    assert str(e.value).startswith(f"recipe {team / 'bad_meta.yaml'}: ") and message in str(e.value)


def test_unquoted_on_is_read_as_on_not_true(team):
    write(team, "on_key", "meta:\n  expected:\n    - on: 1x A100\n      final_loss: 1.5\n")
    tree = OmegaConf.to_container(OmegaConf.load(team / "on_key.yaml"))
    recipes.check_file(team / "on_key.yaml", tree)
    assert recipes.meta_of(tree)["expected"] == [{"on": "1x A100", "final_loss": 1.5}]


def test_a_recipe_for_a_newer_fttool_says_upgrade(team, tmp_path):
    write(team, "future", "meta:\n  schema: 3\n  brand_new_field: 1\ntrain:\n  new_key: 1\n")
    with pytest.raises(UserError, match=r"written for a newer fttool \(schema 3 > 2\): upgrade fttool"):
        composed(["+recipe=future"], tmp_path)


# -- migrations ---------------------------------------------------------------------------------------------------
# old key -> (old value, on the command line, in a recipe file); one row per MIGRATIONS row
MIGRATED = {
    "data.chat_template": (
        "chatml",
        "data.chat_template was renamed data.template in recipe schema 2: write data.template=chatml",
        "data.chat_template was renamed data.template in recipe schema 2: write data: {template: chatml}",
    ),
    "data.messages_field": (
        "dialog",
        "data.messages_field was replaced by data.columns in recipe schema 2: write data.columns={messages: dialog}",
        "data.messages_field was replaced by data.columns in recipe schema 2: write data: {columns: {messages: dialog}}",
    ),
    "data.text_field": (
        "body",
        "data.text_field was replaced by data.columns in recipe schema 2: write data.columns={text: body}",
        "data.text_field was replaced by data.columns in recipe schema 2: write data: {columns: {text: body}}",
    ),
    "eval.samples": (
        "0",
        "eval.samples=0 (skip the evaluation) was replaced by eval.after_training in recipe schema 2: write "
        "eval.after_training=false",
        "eval.samples=0 (skip the evaluation) was replaced by eval.after_training in recipe schema 2: write "
        "eval: {after_training: false}",
    ),
}


def test_every_migration_is_tested():
    assert set(MIGRATED) == set(recipes.MIGRATIONS)


@pytest.mark.parametrize("old", sorted(MIGRATED))
def test_old_key_on_the_command_line(old, tmp_path):
    value, message, _ = MIGRATED[old]
    registry.register()
    with pytest.raises(UserError) as e:
        compose.precheck([f"output_dir={tmp_path}", f"{old}={value}"])
    assert str(e.value) == message + "."


@pytest.mark.parametrize("old", sorted(MIGRATED))
def test_old_key_in_a_recipe_file(old, team, tmp_path):
    value, _, message = MIGRATED[old]
    section, key = old.split(".")
    write(team, "schema1", f"{section}:\n  {key}: {value}\n")
    with pytest.raises(UserError) as e:
        composed(["+recipe=schema1"], tmp_path)
    assert str(e.value) == f"recipe {team / 'schema1.yaml'}: {message}."


def test_old_key_in_a_run_verb_and_current_values_pass(tmp_path):
    spec = composed(["+recipe=tiny_cpu"], tmp_path)
    with pytest.raises(UserError, match=r"^eval.samples=0 \(skip the evaluation\) was replaced by eval.after_training"):
        compose.override_spec(spec, ["eval.samples=0"])
    assert compose.override_spec(spec, ["eval.samples=5"]).eval.samples == 5  # only 0 was the old meaning
    assert composed(["data.template=chatml"], tmp_path).data.template == "chatml"


def test_old_key_from_the_cli_exits_2(tmp_path):
    r = run_cli_here("check", "data.chat_template=chatml", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"fttool: error: {MIGRATED['data.chat_template'][1]}."


# -- expected results -----------------------------------------------------------------------------------------------
ENTRY = {"on": "2-core CPU (CI)", "tokens_per_s": 1000, "peak_memory_gib": 0.5, "final_loss": 2.0}


def result(tokens=1000.0, rss=0.5, loss=2.0, **extra):
    return {"tokens_per_s": tokens, "peak_memory": {"peak_rss_gib": rss}, "last_loss": loss, **extra}


def test_check_expected_within_tolerance():
    assert recipes.check_expected(ENTRY, result()) == []
    assert recipes.check_expected(ENTRY, result(tokens=600, rss=0.3, loss=2.9)) == []  # default tolerance 0.5
    assert recipes.check_expected(ENTRY, result(tokens=50_000)) == []  # a faster machine is fine
    assert recipes.check_expected({"on": "x"}, result(tokens=1)) == []  # no figures, nothing to check


def test_check_expected_names_each_figure_outside():
    problems = recipes.check_expected(ENTRY, result(tokens=400, rss=0.9, loss=0.5))
    assert problems == [
        "tokens_per_s: 400 is below 0.5 x the expected 1000 (measured on 2-core CPU (CI))",
        "peak_memory_gib: 0.9 is not within 50% of the expected 0.5 (measured on 2-core CPU (CI))",
        "final_loss: 0.5 is not within 50% of the expected 2 (measured on 2-core CPU (CI))",
    ]


def test_check_expected_per_figure_tolerance_and_gpu_memory():
    entry = {**ENTRY, "tolerance": {"tokens_per_s": 0.8, "peak_memory_gib": 0.1}}
    assert recipes.check_expected(entry, result(tokens=250, rss=0.54)) == []  # 1/5 of the figure is enough
    assert [p.split(":")[0] for p in recipes.check_expected(entry, result(tokens=150, rss=0.6))] == [
        "tokens_per_s",
        "peak_memory_gib",
    ]
    gpu = result(rss=9.0)
    gpu["peak_memory"].update(gpu_alloc_gib=0.3, gpu_reserved_gib=0.52)  # on CUDA: GPU memory, not the CPU's
    assert recipes.check_expected(entry, gpu) == []
    assert recipes.check_expected(ENTRY, {"tokens_per_s": 1000}) == [
        "peak_memory_gib: the result has no figure; expected 0.5 (measured on 2-core CPU (CI))",
        "final_loss: the result has no figure; expected 2 (measured on 2-core CPU (CI))",
    ]


# -- list ---------------------------------------------------------------------------------------------------------
def test_list_shows_shipped_and_team_recipes_shadowing_and_problems(team, capsys):
    write(
        team,
        "support_bot",
        "meta:\n  description: Support chats, one GPU\n"
        "defaults:\n  - override /method: qlora\n  - override /hardware: single_gpu\n",
    )
    write(team, "tiny_cpu", "# our own smoke test\ntrain:\n  max_steps: 3\n")
    (team / "broken.yaml").write_text("train: [\n")
    write(team, "old_one", "data:\n  chat_template: chatml\n")
    out, err, code = recipes_cli(capsys)
    assert code == 0 and not err, err
    rows = {}
    for line in out.splitlines()[1:]:
        if line.strip() and not line.startswith(("search path", "fttool ")):
            rows.setdefault(line.split()[0], []).append(line.split())
    assert {"full_1b", "lora_8b", "qlora_7b", "tiny_cpu", "tiny_dpo_cpu", "support_bot", "broken"} <= set(rows)
    assert rows["support_bot"][0][:5] == ["support_bot", "tiny_chat", "qlora", "single_gpu", str(team)]
    assert " ".join(rows["support_bot"][0][5:]) == "Support chats, one GPU"
    assert rows["tiny_dpo_cpu"][0][:5] == ["tiny_dpo_cpu", "tiny_chat", "lora+dpo", "cpu", "shipped"]
    ours, shipped = (" ".join(r) for r in rows["tiny_cpu"])
    assert str(team) in ours and "our own smoke test" in ours and "[shadows the tiny_cpu in shipped]" in ours
    assert "shipped" in shipped and f"[shadowed by the tiny_cpu in {team}: not used]" in shipped
    assert f"PROBLEM: could not read a recipe file {team / 'broken.yaml'}" in " ".join(rows["broken"][0])
    assert "PROBLEM:" in " ".join(rows["old_one"][0]) and "write data: {template: chatml}" in " ".join(
        rows["old_one"][0]
    )
    assert "Full fine-tune of Llama 3.2 1B" in " ".join(rows["full_1b"][0])
    assert f"search path (first match wins): {team}, shipped" in out


def test_list_and_show_from_the_cli_load_no_torch(team, tmp_path):
    write(team, "support_bot", "meta:\n  description: Support chats\ntrain:\n  max_steps: 9\n")
    code = (
        "import sys, fttool.cli as c\n"
        "for argv in (['recipes'], ['recipes', 'show', 'support_bot']):\n"
        "    try:\n        c.main(argv)\n    except SystemExit as e:\n        assert not e.code, e.code\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "support_bot" in p.stdout and "Support chats" in p.stdout and "max_steps: 9" in p.stdout


# -- show -------------------------------------------------------------------------------------------------------------
def test_show_prints_the_file_then_the_resolved_spec(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out, err, code = recipes_cli(capsys, "show", "tiny_dpo_cpu", "method.rank=8")
    assert code == 0, err
    path = ROOT / "recipes" / "tiny_dpo_cpu.yaml"
    head, spec_text = out.split("# resolved spec (as fttool check +recipe=tiny_dpo_cpu method.rank=8)\n")
    assert head == f"# recipe tiny_dpo_cpu: {path.resolve()}\n" + path.read_text()
    shown = OmegaConf.create(spec_text)
    want = OmegaConf.create(rundir.spec_to_yaml(composed(["+recipe=tiny_dpo_cpu", "method.rank=8"], tmp_path)))
    assert shown.method.rank == 8 and shown.objective.name == "dpo"
    for tree in (shown, want):
        del tree["run_name"], tree["output_dir"]
    assert shown == want


def test_show_rejects_a_typo_with_did_you_mean(capsys):
    out, err, code = recipes_cli(capsys, "show", "tiny_cpv")
    assert code == 2 and not out
    assert err.startswith("fttool: error: no recipe 'tiny_cpv'. Did you mean tiny_cpu? Available: full_1b")


# -- diff -------------------------------------------------------------------------------------------------------------
def test_diff_of_two_recipes(capsys):
    out, err, code = recipes_cli(capsys, "diff", "tiny_cpu", "tiny_dpo_cpu")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[:2] == ["--- recipe tiny_cpu", "+++ recipe tiny_dpo_cpu"]
    assert lines[2:5] == ["group choices:", "  data: demo_reverse -> preference", "  objective: sft -> dpo"]
    keys = lines[lines.index("keys:") + 1 : -1]
    assert keys == sorted(keys) and "  train.lr: 0.002 -> 0.001" in keys and "  train.max_steps: 60 -> null" in keys
    assert "  data.path: fttool:demo/train.jsonl -> fttool:demo/pairs_train.jsonl" in keys
    assert not [k for k in keys if k.split(":")[0].strip() in recipe_verbs.NOT_COMPARED]  # run_name always differs


def test_diff_of_one_recipe_against_the_defaults(capsys):
    out, err, code = recipes_cli(capsys, "diff", "tiny_cpu")
    assert code == 0, err
    assert out.splitlines()[:5] == [
        "--- defaults",
        "+++ recipe tiny_cpu",
        "keys:",
        "  eval.gate.token_f1: (absent) -> 0.1",
        "  eval.samples: null -> 16",
    ]


def test_diff_of_a_recipe_and_a_run_folder(capsys, tmp_path):
    run_dir, _ = finished_run(tmp_path, ["+recipe=tiny_cpu", "train.lr=1e-3", "method.rank=4"])
    out, err, code = recipes_cli(capsys, "diff", "tiny_cpu", str(run_dir))
    assert code == 0, err
    assert out.splitlines()[:5] == [
        "--- recipe tiny_cpu",
        f"+++ run {run_dir}",
        "keys:",
        "  method.rank: 16 -> 4",
        "  train.lr: 0.002 -> 0.001",
    ]
    same, _, _ = recipes_cli(capsys, "diff", str(run_dir), str(run_dir))
    assert "no differences" in same
    _, err, code = recipes_cli(capsys, "diff", str(tmp_path))
    assert code == 2 and "not an fttool run folder (no spec.yaml)" in err


# -- save -------------------------------------------------------------------------------------------------------------
SAVED = [
    ["+recipe=tiny_dpo_cpu", "method.rank=8", "train.lr=5e-4", "data.max_samples=100"],
    ["method=full", "data=chat", "data.path=chats.jsonl", "data.columns={messages: dialog}", "model.lr_scale=2"],
]


@pytest.mark.parametrize("overrides", SAVED, ids=["recipe-based", "derived-lr"])
def test_save_writes_the_smallest_recipe_that_composes_back_to_the_run(overrides, team, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "chats.jsonl").write_text("{}\n")
    run_dir, spec = finished_run(tmp_path, overrides)
    out, err, code = recipes_cli(capsys, "save", f"run={run_dir}", "name=saved")
    assert code == 0, err
    path = team / "saved.yaml"  # the first FTTOOL_RECIPE_PATH folder
    assert f"saved {path}" in out
    tree = OmegaConf.to_container(OmegaConf.load(path))
    meta = recipes.meta_of(tree)
    assert meta["schema"] == 2 and meta["description"] == f"saved from run {run_dir}"
    assert meta["hardware"].startswith("1x CPU (hardware=cpu")
    (expected,) = meta["expected"]
    assert expected["tokens_per_s"] == 1234.6 and expected["peak_memory_gib"] == 0.61
    assert expected["final_loss"] == 0.4123 and "1x CPU" in expected["on"]
    assert recipes.check_expected(expected, RESULT) == []
    again = composed(["+recipe=saved"], tmp_path)
    assert replace(again, run_name=spec.run_name, output_dir=spec.output_dir) == spec
    body = {k for k in recipes.flatten(tree) if not k.startswith(("meta.", "defaults"))}
    if "method=full" in overrides:
        assert body == {"data.path", "data.columns.messages", "model.lr_scale"}  # train.lr is derived, not saved
        assert tree["data"]["path"] == str(tmp_path / "chats.jsonl")
        assert {"override /method": "full"} in tree["defaults"] and {"override /data": "chat"} in tree["defaults"]
    else:
        assert body == {
            "data.path",
            "data.test_path",
            "data.max_length",
            "data.max_samples",
            "method.rank",
            "train.lr",
            "train.epochs",
            "train.save_steps",
        }
        assert {"override /objective": "dpo"} in tree["defaults"]


def test_save_without_recorded_choices_still_reproduces(team, tmp_path, capsys):
    run_dir, spec = finished_run(tmp_path, ["method=full", "train.max_steps=5"], result=None)
    env = json.loads((run_dir / "env.json").read_text())
    del env["choices"]
    (run_dir / "env.json").write_text(json.dumps(env))
    out, err, code = recipes_cli(capsys, "save", f"run={run_dir}", "name=no_record")
    assert code == 0, err
    assert "no expected results recorded" in out
    assert "expected" not in recipes.meta_of(OmegaConf.to_container(OmegaConf.load(team / "no_record.yaml")))
    again = composed(["+recipe=no_record"], tmp_path)
    assert replace(again, run_name=spec.run_name, output_dir=spec.output_dir) == spec


def test_save_refuses_to_overwrite_and_other_mistakes(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(registry.RECIPE_PATH_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    run_dir, _ = finished_run(tmp_path, ["train.max_steps=5"])
    out, err, code = recipes_cli(capsys, "save", f"run={run_dir}", "name=mine")
    target = tmp_path / "recipes" / "mine.yaml"  # no FTTOOL_RECIPE_PATH: ./recipes
    assert code == 0 and target.is_file(), err
    assert f"export {registry.RECIPE_PATH_ENV}={tmp_path / 'recipes'}" in out
    before = target.read_text()
    _, err, code = recipes_cli(capsys, "save", f"run={run_dir}", "name=mine")
    assert code == 2 and f"{target} already exists" in err and "overwrite=true" in err
    assert target.read_text() == before
    _, err, code = recipes_cli(capsys, "save", f"run={run_dir}", "name=mine", "overwrite=true", f"dir={tmp_path / 'x'}")
    assert code == 0 and (tmp_path / "x" / "mine.yaml").is_file(), err
    _, err, code = recipes_cli(capsys, "save", f"run={run_dir}", "nme=x")
    assert code == 2 and "unknown argument 'nme=x'. Did you mean name?" in err
    _, err, code = recipes_cli(capsys, "save", f"run={run_dir}", "name=a/b")
    assert code == 2 and "name=a/b: use letters, digits and . _ - only" in err


# -- the verb ---------------------------------------------------------------------------------------------------------
def test_recipes_help_and_unknown_subcommand(capsys):
    out, _, code = recipes_cli(capsys, "--help")
    assert code == 0 and out.startswith("usage: fttool recipes [SUBCOMMAND]")
    for sub, (_, _, example) in cli.VERBS["recipes"].subcommands.items():
        assert f"  recipes {sub}" in out and f"e.g. {example}" in out
    _, err, code = recipes_cli(capsys, "shwo", "tiny_cpu")
    assert code == 2 and "unknown subcommand 'shwo'. Did you mean fttool recipes show?" in err
    _, err, code = recipes_cli(capsys, "tiny_cpu")
    assert code == 2 and "To see that recipe: fttool recipes show tiny_cpu." in err


def test_global_help_lists_the_recipes_verb(tmp_path):
    r = run_cli("--help", cwd=tmp_path)
    assert r.returncode == 0 and "verbs on fttool's files" in r.stdout
    assert "  recipes    list the recipes on the search path" in r.stdout
