"""Composition and validation: every recipe, group swaps, recipe precedence, and each bad-input message."""

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import make_spec, run_cli, run_cli_here
from fttool.config import compose, registry
from fttool.errors import UserError


def recipes():
    return registry.group_options("recipe")


def test_shipped_recipes_exist():
    assert {"qlora_7b", "lora_8b", "full_1b", "tiny_cpu"} <= set(recipes())


@pytest.mark.parametrize("recipe", recipes())
def test_every_recipe_composes_and_validates(recipe, tmp_path):
    try:
        spec = make_spec([f"+recipe={recipe}"], tmp_path)
    except UserError as e:  # a recipe for data the user brings (GSM8K's files) leaves data.path to the command line
        assert "data.path is not set" in str(e)
        spec = make_spec([f"+recipe={recipe}", "data.path=x.jsonl"], tmp_path)
    assert spec.method.name in ("full", "lora", "qlora")
    assert spec.train.lr > 0
    assert spec.run_name.startswith(recipe)


@pytest.mark.parametrize("group", ["model", "data", "method", "hardware", "logging"])
def test_every_group_option_composes(group, tmp_path):
    for option in registry.group_options(group):
        extra = (
            ["data.path=x.jsonl"]
            if (
                group == "data"
                and option
                in (
                    "chat",
                    "sharegpt",
                    "alpaca",
                    "completion",
                    "segments",
                    "preference",
                    "gsm8k",
                    "prompts",
                    "unpaired",
                )
            )
            else []
        )
        extra += ["objective=kto"] if option == "unpaired" else []  # unpaired rows are KTO's only
        extra += ["hardware.precision=fp32"] if group == "hardware" else []
        extra += ["hardware.machine_rank=0", "hardware.main_address=10.0.0.1"] if option == "multi_node" else []
        make_spec([f"{group}={option}"] + extra, tmp_path)


def test_qlora_7b_recipe_values(tmp_path):
    spec = make_spec(["+recipe=qlora_7b"], tmp_path)
    assert spec.method.name == "qlora" and spec.method.bits == 4 and spec.method.quant_type == "nf4"
    assert spec.method.compute_dtype == "bfloat16" and spec.hardware.device == "cuda"
    assert "7B" in spec.model.name_or_path


def test_defaults_from_common_practice(tmp_path):
    lora = make_spec(["method=lora", "model=qwen2_5_7b"], tmp_path)
    assert (lora.method.rank, lora.method.alpha, lora.method.dropout, lora.train.lr) == (16, 32, 0.05, 2e-4)
    assert lora.method.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert lora.train.lr_scheduler == "cosine" and lora.train.warmup_ratio > 0 and lora.train.grad_accum > 1
    assert make_spec(["method=full", "model=qwen2_5_7b"], tmp_path).train.lr == 2e-5
    assert make_spec(["hardware=single_gpu"], tmp_path).hardware.precision == "auto"


def test_cli_override_wins_over_recipe(tmp_path):
    spec = make_spec(["+recipe=qlora_7b", "method.rank=64", "train.lr=1e-4"], tmp_path)
    assert spec.method.rank == 64 and spec.train.lr == 1e-4


def test_swapping_method_leaves_no_stale_keys(tmp_path):
    assert "bits" in compose.compose(["+recipe=tiny_cpu", "method=qlora"]).method
    cfg = compose.compose(["+recipe=tiny_cpu", "method=full"])
    assert set(cfg.method.keys()) == {"name", "default_lr"}
    cfg = compose.compose(["+recipe=tiny_cpu", "method=lora", "hardware=single_gpu", "hardware=cpu"])
    assert "bits" not in cfg.method


def test_recipe_key_that_the_chosen_method_lacks(tmp_path):
    with pytest.raises(UserError, match="sets method.compute_dtype, which only method=qlora has"):
        compose.precheck(["+recipe=qlora_7b", "method=full"])


def test_team_recipe_path(tmp_path, monkeypatch):
    team = tmp_path / "team_recipes"
    team.mkdir()
    (team / "our_chat.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /method: full\ntrain:\n  max_steps: 7\n"
    )
    monkeypatch.setenv(registry.RECIPE_PATH_ENV, str(team))
    assert "our_chat" in registry.group_options("recipe")
    spec = make_spec(["+recipe=our_chat"], tmp_path)
    assert spec.method.name == "full" and spec.train.max_steps == 7


@pytest.mark.parametrize(
    "body,message",
    [
        (
            "defaults:\n  - override /model: qwen2_5_7\n",
            "bad_team.yaml) picks model=qwen2_5_7, which does not exist. Did you mean model=qwen2_5_7b?",
        ),
        ("train:\n  lrr: 3\n", "sets unknown key train.lrr. Did you mean train.lr?"),
        ("train: [\n", "could not read a recipe file"),
    ],
)
def test_bad_team_recipe(body, message, tmp_path, monkeypatch):
    team = tmp_path / "r"
    team.mkdir()
    (team / "bad_team.yaml").write_text("# @package _global_\n" + body)
    monkeypatch.chdir(tmp_path)
    r = run_cli_here("check", "+recipe=bad_team", env={registry.RECIPE_PATH_ENV: str(team)})
    assert r.returncode == 2 and message in r.stderr, r.stderr


def test_recipe_cannot_enable_remote_code(tmp_path, monkeypatch):
    team = tmp_path / "r"
    team.mkdir()
    (team / "sneaky.yaml").write_text("# @package _global_\nmodel:\n  trust_remote_code: true\n")
    monkeypatch.setenv(registry.RECIPE_PATH_ENV, str(team))
    with pytest.raises(UserError, match="trust_remote_code"):
        make_spec(["+recipe=sneaky"], tmp_path)
    assert make_spec(["+recipe=sneaky", "model.trust_remote_code=true"], tmp_path).model.trust_remote_code


BAD = [
    (["method.rnak=8"], "unknown key 'method.rnak'. Did you mean method.rank?"),
    (["train.lrr=1"], "Did you mean train.lr?"),
    (["method=lroa"], "Did you mean method=lora?"),
    (["+recipe=qlora7b"], "no recipe 'qlora7b'. Did you mean recipe=qlora_7b?"),
    (["recipe=qlora_7b"], "+recipe=qlora_7b"),
    (["method.rank=0"], "method.rank=0 is out of range"),
    (["train.lr=abc"], "train.lr=abc: expected a number"),
    (["hardware.precision=fp16"], "fp16 needs a CUDA GPU"),
    (["method=full", "method.rank=8"], "'method.rank' belongs to method=lora / method=dora / method=qlora"),
    (["data=chat"], "data.path is not set"),
    (["model.dtype=float33"], "Did you mean float32?"),
    (["method.rank=8,16"], "add -m to run a sweep"),
    (["resume=auto"], "resume=auto needs the run to continue"),
    (["run_name=a/b"], "run_name='a/b'"),
    (["train.max_steps=-1"], "train.max_steps=-1 is out of range"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_input_message(overrides, message, tmp_path):
    with pytest.raises(UserError) as e:
        compose.precheck([f"output_dir={tmp_path}"] + overrides)
    assert message in str(e.value)


def test_bad_input_from_the_cli_exits_2_fast_without_traceback(tmp_path):
    r = run_cli("train", "method.rnak=8", cwd=tmp_path)  # a real process: the exit code and stderr a shell sees
    assert r.returncode == 2
    assert r.stderr.strip() == (
        "fttool: error: unknown key 'method.rnak'. Did you mean method.rank? Keys in 'method' for "
        "method=lora: name, default_lr, rank, alpha, dropout, target_modules, use_rslora."
    )
    assert "Traceback" not in r.stderr and not list(tmp_path.iterdir())  # fast: test_architecture, no torch


def test_unknown_verb(tmp_path):
    r = run_cli_here("trian", cwd=tmp_path)
    assert r.returncode == 2 and "unknown verb 'trian'. Did you mean train?" in r.stderr


def test_check_prints_spec_and_plan_without_torch(tmp_path):
    code = (
        "import sys, fttool.cli as c; sys.argv=['fttool','check','+recipe=tiny_cpu'];\n"
        "try:\n    c.main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import on the config path'"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    spec = OmegaConf.create(p.stdout.split("# plan")[0])
    assert spec.method.name == "lora" and spec.train.max_steps == 60
    assert "trainable of" in p.stdout and "processes   1 on cpu" in p.stdout
    assert "validation  loss every 30 steps on 0.02 of the rows; best checkpoint kept" in p.stdout
    assert (
        "test        fttool:demo/test.jsonl (16 examples)" in p.stdout
        and "verdict: token_f1 beats base by +10.0 pts" in p.stdout
    )
    assert (
        "guard       stops at the first NaN/inf loss or gradient norm (exit 4); batches padded on the right" in p.stdout
    )
    assert not list(tmp_path.iterdir()), "check must not write anything"


@pytest.mark.parametrize(
    "argv", [["eval", "--help"], ["eval", "run=nope"], ["export", "run=x", "outptu=y"], ["generate", "prompt=hi"]]
)
def test_run_verbs_answer_help_and_mistakes_without_torch(argv, tmp_path):
    code = (
        f"import sys, fttool.cli as c; sys.argv=['fttool', *{argv!r}];\n"
        "try:\n    c.main()\nexcept SystemExit as e:\n    pass\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import on the argument path'"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert ("usage: fttool eval" in p.stdout) if "--help" in argv else ("fttool: error:" in p.stderr)


def test_hydra_flags_still_work(tmp_path):
    r = run_cli("--cfg", "job", "+recipe=tiny_cpu", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert OmegaConf.create(r.stdout).method.name == "lora"
    r = run_cli("--help", cwd=tmp_path)
    assert r.returncode == 0 and "check" in r.stdout and "method: dora, full, lora, qlora" in r.stdout


def test_local_paths_are_recorded_absolute(tmp_path, monkeypatch):
    (tmp_path / "chats.jsonl").write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    spec = make_spec(["data=chat", "data.path=chats.jsonl"], tmp_path)
    assert spec.data.path == str(tmp_path / "chats.jsonl")
    assert make_spec(["+recipe=qlora_7b"], tmp_path).model.name_or_path == "Qwen/Qwen2.5-7B-Instruct"


def test_a_new_strategy_is_one_row_of_the_table(monkeypatch, tmp_path):
    """README "Adding a method / a strategy": ZeRO-1 as one row of strategies.STRATEGIES (a conf/hardware file picks
    it): validation accepts it, applies its rules, `check` describes it, and its engine config is written."""
    import json

    from fttool.config import strategies
    from fttool.launch import distributed
    from fttool.plan import summary

    zero1 = strategies.Zero(
        "zero1",
        "DeepSpeed ZeRO-1 (optimizer state partitioned)",
        "DEEPSPEED",
        shards="optimizer",
        drops_steps=False,
        stage=1,
    )
    monkeypatch.setitem(strategies.STRATEGIES, "zero1", zero1)
    spec = make_spec(["hardware=zero2", "hardware.device=cpu", "hardware.strategy=zero1"], tmp_path)
    assert any("DeepSpeed ZeRO-1 (optimizer state partitioned)" in line for line in summary.describe(spec))
    distributed.write_configs(spec, tmp_path, "fp32")
    assert json.loads((tmp_path / "deepspeed.json").read_text())["zero_optimization"]["stage"] == 1
    with pytest.raises(UserError, match="nonfinite_tolerance=1 with hardware.strategy=zero1"):
        make_spec(
            ["hardware=zero2", "hardware.device=cpu", "hardware.strategy=zero1", "train.nonfinite_tolerance=1"],
            tmp_path,
        )
    with pytest.raises(UserError, match="hardware.offload=true applies to fsdp2, zero3, not strategy=zero1"):
        make_spec(
            ["hardware=zero2", "hardware.device=cpu", "hardware.strategy=zero1", "hardware.offload=true"], tmp_path
        )
    monkeypatch.delitem(strategies.STRATEGIES, "zero1")
    with pytest.raises(UserError, match="hardware.strategy=zero1 is not allowed"):
        make_spec(["hardware=zero2", "hardware.strategy=zero1"], tmp_path)


def test_no_name_switches_on_methods_or_strategies():
    """Behaviour lives on the method and strategy objects: no module compares a method or strategy name."""
    import re

    pattern = re.compile(r"(method\.name|\.strategy)\s*(==|!=|in\s*\(|not in)|startswith\(\"zero")
    root = Path(__file__).resolve().parent.parent / "fttool"
    hits = [
        f"{p.relative_to(root)}:{i}"
        for p in root.rglob("*.py")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not hits, hits


# -- a model of the user's own --------------------------------------------------------------------------------------
def test_a_model_of_your_own_gets_generic_settings_not_the_demo_models(tmp_path):
    (tmp_path / "m").mkdir()
    spec = make_spec([f"model.name_or_path={tmp_path / 'm'}"], tmp_path)
    assert spec.model.lr_scale == 1.0 and spec.model.dtype == "auto"
    assert spec.train.lr == pytest.approx(2e-4)  # lora's default, not 2e-3 (the tiny demo's lr_scale 10)
    kept = make_spec([f"model.name_or_path={tmp_path / 'm'}", "model.lr_scale=3", "model.dtype=bfloat16"], tmp_path)
    assert (kept.model.lr_scale, kept.model.dtype, kept.train.lr) == (3.0, "bfloat16", pytest.approx(6e-4))
    demo = make_spec([], tmp_path)
    assert demo.model.lr_scale == 10.0 and demo.train.lr == pytest.approx(2e-3)
    chosen = make_spec(["model=tiny_chat", "model.name_or_path=fttool:tiny-chat"], tmp_path)
    assert chosen.model.lr_scale == 10.0  # a group chosen by name keeps its settings


def test_check_names_where_the_derived_values_came_from(tmp_path):
    (tmp_path / "m").mkdir()
    r = run_cli_here("check", f"model.name_or_path={tmp_path / 'm'}", "train.lr=1e-4", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (line,) = [x for x in r.stdout.splitlines() if x.startswith("#   from")]
    assert "train.lr 0.0001 (command line)" in line
    assert "model.lr_scale 1 (schema default: a model of your own" in line
    r = run_cli_here("check", cwd=tmp_path)
    (line,) = [x for x in r.stdout.splitlines() if x.startswith("#   from")]
    assert "train.lr 0.002 (method=lora's default_lr 0.0002 x model.lr_scale 10)" in line
    assert "model.lr_scale 10 (model=tiny_chat)" in line


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.name_or_path=/nonexistent/model", "model.name_or_path=/nonexistent/model: no such model folder"),
        ("model.name_or_path=./here/not", "no such model folder"),
        ("data.path=/nope.jsonl", "data.path=/nope.jsonl: no such file or folder"),
        ("data.test_path=missing.jsonl", "data.test_path=missing.jsonl: no such file or folder"),
    ],
)
def test_a_missing_local_model_or_data_file_is_named_before_a_run_folder(tmp_path, override, message):
    for verb in ("check", "train"):
        r = run_cli_here(verb, override, f"output_dir={tmp_path / 'runs'}", cwd=tmp_path)
        assert r.returncode == 2 and message in r.stderr, (verb, r.stderr)
    assert not (tmp_path / "runs").exists()


def test_a_gguf_file_given_as_the_model_path_says_how_to_name_it(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"")
    r = run_cli_here("check", f"model.name_or_path={tmp_path / 'm.gguf'}", cwd=tmp_path)
    assert r.returncode == 2 and f"model.name_or_path={tmp_path} model.gguf_file=m.gguf" in r.stderr
    r = run_cli_here("check", f"model.name_or_path={tmp_path}", "model.gguf_file=other.gguf", cwd=tmp_path)
    assert r.returncode == 2 and "no such file" in r.stderr and "it holds m.gguf" in r.stderr
    r = run_cli_here("check", f"model.name_or_path={tmp_path}", "model.gguf_file=m.gguf", "method=qlora", cwd=tmp_path)
    assert r.returncode == 2 and "use method=lora on the GGUF" in r.stderr
    r = run_cli_here("check", "model.name_or_path=package:no_such_pkg_here", cwd=tmp_path)
    assert r.returncode == 2 and "no installed Python package 'no_such_pkg_here'" in r.stderr


def test_a_failed_after_training_verdict_exits_3_with_the_reason_last(tmp_path, capsys):
    from fttool.launch.run import verdict_exit
    from fttool.runfolder import runfiles

    runfiles.write_json(tmp_path / runfiles.RESULT, {"eval": {"verdict": "pass"}})
    verdict_exit(tmp_path)  # returns
    runfiles.write_json(tmp_path / runfiles.RESULT, {"eval": {"verdict": "fail"}})
    with pytest.raises(SystemExit) as e:
        verdict_exit(tmp_path)
    assert e.value.code == 3
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("fttool: verdict FAIL")


def test_a_mapping_on_the_command_line_replaces_the_recipes(tmp_path):
    """Hydra merges key={...} into the recipe's mapping; fttool replaces it, as it does on a finished run."""
    assert make_spec(["+recipe=tiny_cpu"], tmp_path).eval.gate == {"token_f1": 0.1}
    assert make_spec(["+recipe=tiny_cpu", "eval.gate={perplexity:0}"], tmp_path).eval.gate == {"perplexity": 0.0}
    assert make_spec(["+recipe=tiny_cpu", "eval.gate={}"], tmp_path).eval.gate == {}
