"""Online RL with verifiable rewards (objective=grpo through TRL's GRPOTrainer): keys, prompt data, rewards, the
trust rule for reward code, the stop on a broken reward, resume, and the demo recipe as a user runs it."""

import json
import math
import shutil

import pytest
from omegaconf import OmegaConf

from conftest import ROOT, free_port, make_spec, run_cli, run_cli_here, train_run
from cuda_like import cuda_sdpa  # noqa: F401 - a fixture
from fttool import rewards
from fttool.config import recipes
from fttool.errors import UserError
from fttool.launch import rundir
from fttool.worker.callbacks import read_metrics

# a few GRPO steps on the bundled tiny model: 2 prompts x 4 completions of at most 8 tokens per step
TINY = [
    "objective=grpo",
    "objective.num_generations=4",
    "objective.max_completion_length=8",
    "objective.temperature=0.7",
    "objective.rewards={token_f1: 1.0}",
    "train.batch_size=8",
    "train.grad_accum=1",
    "train.max_steps=4",
    "train.logging_steps=1",
    "train.save_steps=2",
    "data.max_samples=64",
    "data.val_ratio=0",
    "eval.after_training=false",
]


# -- configuration ----------------------------------------------------------------------------------------------
def test_grpo_keys_defaults_and_description(tmp_path):
    spec = make_spec(["objective=grpo"], tmp_path)
    o = spec.objective
    assert o.rewards == {"numeric_answer": 1.0} and o.beta == 0.0 and o.loss_type == "dapo"
    assert spec.train.lr == pytest.approx(1e-5 * spec.model.lr_scale)  # the adapter default, as DPO has its own
    own = make_spec(["objective=grpo", "objective.rewards={exact_match: 1.0, format: 0.5}"], tmp_path)
    assert own.objective.rewards == {"exact_match": 1.0, "format": 0.5}  # replaces the default, not merged into it
    r = run_cli_here(
        "check", "objective=grpo", "objective.importance_sampling_level=sequence", f"output_dir={tmp_path}"
    )
    assert r.returncode == 0 and "sequence-level ratios (GSPO)" in r.stdout and "rewards numeric_answer x1" in r.stdout


BAD = [
    (["objective.num_generatons=4"], "Did you mean objective.num_generations?"),
    (["objective.loss_type=dapoo"], "Did you mean dapo?"),
    (["objective.scale_rewards=batchh"], "expected one of: group, batch, none"),
    (["objective.rewards={numeric: 1}"], "Did you mean numeric_answer?"),
    (["objective.num_generations=1"], "use at least 2"),
    (["objective.num_generations=3"], "must divide the completions of one optimizer step"),
    (["objective.use_vllm=true"], "needs a CUDA GPU"),
    (["data.packing=bins"], "use data.packing=none"),
    (
        ["objective.beta=0.1", "objective=sft"],
        "'objective.beta' belongs to objective=dpo / objective=orpo / objective=kto / objective=grpo",
    ),
    (["data.metrics=[reward]", "objective=sft"], "has none; use objective=grpo"),
    (["objective.reward_code=missing.py:f"], "missing.py not found"),
    (["objective.reward_code=rewards.py"], "expected FILE.py:function or module:function"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_grpo_config(overrides, message, tmp_path):
    r = run_cli_here("check", "objective=grpo", *overrides, f"output_dir={tmp_path}", cwd=tmp_path)
    assert r.returncode == 2 and message in r.stderr, r.stderr


def test_a_recipe_naming_reward_code_needs_trust_code_on_the_command_line(tmp_path):
    """Code runs only when the person at the command line asked for it."""
    code = tmp_path / "my_reward.py"
    code.write_text("def score(prompts, completions, **kw):\n    return [1.0 for _ in completions]\n")
    team = tmp_path / "team"
    team.mkdir()
    (team / "shared_grpo.yaml").write_text(
        "# @package _global_\nmeta:\n  schema: 2\n  description: x\ndefaults:\n  - override /objective: grpo\n"
        f"objective:\n  reward_code: {code}:score\n"
    )
    env = {"FTTOOL_RECIPE_PATH": str(team)}
    refused = run_cli_here("check", "+recipe=shared_grpo", f"output_dir={tmp_path}", env=env)
    assert refused.returncode == 2 and "add trust_code=true" in refused.stderr, refused.stderr
    trusted = run_cli_here("check", "+recipe=shared_grpo", "trust_code=true", f"output_dir={tmp_path}", env=env)
    assert trusted.returncode == 0, trusted.stderr
    mine = run_cli_here("check", "objective=grpo", f"objective.reward_code={code}:score", f"output_dir={tmp_path}")
    assert mine.returncode == 0, mine.stderr  # named on the command line: asked for


# -- prompt data ------------------------------------------------------------------------------------------------
def test_prompt_rows_chat_ending_with_the_user_and_alpaca_without_output(tmp_path):
    from fttool import data
    from fttool.config import objectives
    from fttool.data.tokenizer import load_tokenizer

    rows = tmp_path / "prompts.jsonl"
    rows.write_text(
        json.dumps({"prompt": "Reverse the words: a b c", "answer": "c b a"})
        + "\n"
        + json.dumps({"prompt": "Reverse the words: x y"})
        + "\n"
    )
    spec = make_spec(["objective=grpo", "data=prompts", f"data.path={rows}", "data.val_ratio=0"], tmp_path)
    tok = load_tokenizer(spec)
    prepared = data.prepare_datasets(spec, tok, objectives.of(spec).features, use_cache=False)
    assert prepared.train["reference"] == ["c b a", ""] and prepared.stats.samples == 2
    assert all(p.endswith("<|im_start|>assistant\n") for p in prepared.train["prompt"])
    # the same rows under sft: the answer is the reply; a row without one has nothing to train
    with pytest.raises(UserError, match=r"prompts.jsonl:2: row has no 'answer' field"):
        sft = make_spec(["data=prompts", f"data.path={rows}", "data.val_ratio=0"], tmp_path)
        data.prepare_datasets(sft, tok, objectives.of(sft).features, use_cache=False)
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "Reverse the words: p q"}]}) + "\n")
    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text(json.dumps({"instruction": "Reverse the words", "input": "p q"}) + "\n")
    for path, fmt in ((chat, "chat"), (alpaca, "alpaca")):
        spec = make_spec(
            ["objective=grpo", f"data.format={fmt}", f"data.path={path}", "data.val_ratio=0", "data.test_path=null"],
            tmp_path,
        )
        got = data.prepare_datasets(spec, tok, objectives.of(spec).features, use_cache=False).train
        assert got["reference"] == [""] and "p q" in got["prompt"][0]


# -- rewards ----------------------------------------------------------------------------------------------------
def test_builtin_rewards_score_what_eval_scores(tmp_path):
    spec = make_spec(["objective=grpo", "objective.rewards={numeric_answer: 1, format: 1, length: 1}"], tmp_path)
    o, d = spec.objective, spec.data
    num, fmt, length = (rewards.builtin(n, o, d) for n in ("numeric_answer", "format", "length"))
    completions = ["<think>3 x 9</think> 27", "so it is \\boxed{27}", "#### 26"]
    assert num([""] * 3, completions, reference=["3 x 9 = 27\n#### 27"] * 3) == [1.0, 1.0, 0.0]
    assert fmt([""] * 3, completions) == [1.0, 0.0, 0.0]
    assert length([""], ["x" * 100]) == [pytest.approx(0.5)]  # length_target 200


@pytest.mark.parametrize(
    "returned,match",
    [
        ("None", "returned None for completion 0"),
        ("float('nan')", "returned nan"),
        ("1 / 0", "raised ZeroDivisionError"),
        ("[1.0]", "returned 1 values for 2 completions"),
    ],
)
def test_a_broken_reward_is_named_with_its_prompt(returned, match):
    ns: dict = {}
    body = f"    return [{returned}] * len(completions)" if not returned.startswith("[") else f"    return {returned}"
    exec(f"def mine(prompts, completions, **kw):\n{body}\n", ns)
    checked = rewards.checked(ns["mine"], "reward_code:mine")
    with pytest.raises(rewards.RewardFailed, match=match) as e:
        checked(prompts=["Reverse the words: a b", "q"], completions=["b a", "x"])
    assert e.value.exit_code == 4 and "reward_code:mine" in str(e.value)


# -- training -----------------------------------------------------------------------------------------------------
def with_code(tmp):
    """TINY plus a reward of the user's own (named on the command line), beside the built-in one."""
    code = tmp / "my_reward.py"
    code.write_text(
        "def short(prompts, completions, **kw):\n    return [1.0 / (1 + len(c.split())) for c in completions]\n"
    )
    return TINY + [f"objective.reward_code={code}:short", "objective.reward_code_weight=0.5"]


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grpo")
    run_dir, summary = train_run(with_code(tmp), tmp, name="grpo")
    return tmp, run_dir, summary


def test_grpo_trains_and_logs_its_rewards(grpo_run):
    _, run_dir, summary = grpo_run
    rows = [r for r in read_metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert math.isfinite(r["loss"]) and 0 <= r["reward"] <= 1 and "reward_std" in r
        assert "rewards/token_f1/mean" in r and "rewards/reward_code:short/mean" in r
        assert 0 < r["completions/mean_length"] <= 8
    assert (run_dir / "final" / "adapter_config.json").is_file() and summary["steps"] == 4
    record = json.loads((run_dir / "data.json").read_text())
    assert record["stats"]["unit"] == "prompts" and record["stats"]["trained_tokens"] == 0
    code = run_dir.parent / "my_reward.py"
    assert record["reward_code"] == {"ref": f"{code}:short", "sha256": rewards.code_hash(f"{code}:short")}


def test_grpo_resume_equals_uninterrupted(grpo_run):
    """Sampling is seeded per completion (worker/sampling.py): the resumed steps sample and learn the same."""
    from fttool.worker.train import train

    tmp, full_dir, _ = grpo_run
    crashed = tmp / "crashed"
    shutil.copytree(full_dir, crashed)
    shutil.rmtree(crashed / "checkpoints" / "checkpoint-4")
    shutil.rmtree(crashed / "final")
    (crashed / "result.json").unlink()
    (crashed / "spec.yaml").write_text(
        (crashed / "spec.yaml").read_text().replace("run_name: grpo", "run_name: crashed")
    )
    spec = make_spec(with_code(tmp) + ["run_name=crashed", "resume=auto"], tmp)
    run_dir, created = rundir.prepare(spec, ["pytest"], {})
    try:
        train(run_dir)
    finally:
        rundir.unlock(run_dir)
    a = {r["step"]: r for r in read_metrics(full_dir) if "loss" in r}
    b = {r["step"]: r for r in read_metrics(crashed) if "loss" in r}
    for step in (3, 4):
        assert a[step]["reward"] == pytest.approx(b[step]["reward"], abs=1e-6), step
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], abs=1e-5), step


def test_a_completion_samples_the_same_on_any_number_of_processes():
    """Each completion's generator is seeded from (seed, step, prompt, which of its completions): split the same
    global batch over 1, 2 or 4 processes, and every row gets the seed and draws the tokens it got in one."""
    import torch

    from fttool.worker.sampling import SeededRows, row_seeds

    batch = [[5, 6]] * 4 + [[7]] * 4  # 2 prompts x 4 completions, as TRL's sampler lays them out
    whole = row_seeds(42, 3, batch, 0, 8)
    assert len(set(whole)) == 8  # every completion of a prompt has its own generator
    for procs in (2, 4):
        n = 8 // procs
        assert sum((row_seeds(42, 3, batch, p * n, n) for p in range(procs)), []) == whole
    assert row_seeds(42, 4, batch, 0, 8) != whole and row_seeds(1, 3, batch, 0, 8) != whole
    scores = torch.randn(8, 50)

    def draw(seeds, rows):
        sampler = SeededRows(seeds, "cpu", 5, temperature=0.7, top_p=0.9)
        return [sampler(None, rows).argmax(-1) for _ in range(5)]  # 5 positions, one draw per row each

    one = torch.stack(draw(whole, scores), 1)
    two = torch.cat([torch.stack(draw(whole[i : i + 4], scores[i : i + 4]), 1) for i in (0, 4)])
    assert torch.equal(one, two) and len({tuple(r) for r in one.tolist()}) > 1
    only = SeededRows(whole, "cpu", 1)(None, scores)
    assert ((only == 0).sum(-1) == 1).all() and torch.isinf(only).sum() == 8 * 49  # one token left per row
    peaked = torch.full((8, 50), -5.0).index_fill_(1, torch.tensor([7]), 5.0)  # token 7 holds > 0.9 of the mass
    assert all((d == 7).all() for d in draw(whole, peaked))  # top_p=0.9 leaves only it: nothing outside is drawn


@pytest.mark.slow
def test_grpo_on_two_processes_equals_one(tmp_path):
    """GRPO LoRA (DDP) on 2 processes x 4 completions equals 1 process x 8 at the same seed: the same completions
    are sampled (seeded per completion, not per process), scored and learned from."""
    common = [*TINY, "method.dropout=0"]  # LoRA dropout draws other masks in 1 and 2 processes
    one, _ = train_run(common, tmp_path, name="one")
    r = run_cli(
        *common,
        "hardware=ddp",
        "hardware.device=cpu",
        "hardware.num_processes=2",
        "train.batch_size=4",
        f"hardware.main_port={free_port()}",
        "run_name=two",
        f"output_dir={tmp_path}",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "2 process(es)" in (tmp_path / "two" / "train.log").read_text()
    a = [r for r in read_metrics(one) if "loss" in r]
    b = [r for r in read_metrics(tmp_path / "two") if "loss" in r]
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        for key in ("reward", "reward_std", "completions/mean_length", "loss"):
            assert y[key] == pytest.approx(x[key], abs=1e-4), (x["step"], key, x[key], y[key])


def test_a_nan_reward_stops_the_run_with_exit_4(tmp_path):
    code = tmp_path / "bad_reward.py"
    code.write_text("def bad(prompts, completions, **kw):\n    return [float('nan')] * len(completions)\n")
    r = run_cli_here(*TINY, f"objective.reward_code={code}:bad", f"output_dir={tmp_path}", "run_name=nan")
    assert r.returncode == 4, r.stderr
    assert "reward reward_code:bad returned nan for completion 0 of prompt" in r.stderr, r.stderr
    assert not (tmp_path / "nan" / "final").exists() and not (tmp_path / "nan" / "result.json").exists()


@pytest.mark.slow
def test_the_grpo_demo_raises_the_held_out_reward(tmp_path):
    """`python -m fttool +recipe=tiny_grpo_cpu` as a user runs it: the verdict gates on the reward, and passes."""
    r = run_cli("+recipe=tiny_grpo_cpu", f"output_dir={tmp_path}", "run_name=demo", cwd=tmp_path, timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ev = json.loads((tmp_path / "demo" / "eval.json").read_text())
    assert ev["verdict"] == "pass"
    assert ev["finetuned"]["reward"] > ev["base"]["reward"] + 0.05, ev
    from matplotlib.image import imread

    assert imread(tmp_path / "demo" / "loss.png").shape[0] > 800  # a second panel: the mean reward and its spread
    # the recipe's own run is within the loss and memory its meta header expects (speed: bench/, not tests)
    meta = recipes.meta_of(OmegaConf.to_container(OmegaConf.load(ROOT / "recipes" / "tiny_grpo_cpu.yaml")))
    summary = json.loads((tmp_path / "demo" / "result.json").read_text())
    untimed = {k: v for k, v in meta["expected"][0].items() if k != "tokens_per_s"}
    assert recipes.check_expected(untimed, summary) == []
    # the plan sized sampling, the prompts and the completions (0.59 GiB planned; 0.66 measured on a quiet machine,
    # 0.79 on a loaded CI worker): a sanity bound, not a calibration
    vs = summary["plan_vs_measured"]
    assert 0.6 < vs["peak_memory_gib"]["ratio"] < 1.6 and vs["train_seconds"]["predicted"] > 0, vs


def test_grpo_stays_finite_on_cuda_like_attention(cuda_sdpa, tmp_path):  # noqa: F811
    """Prompts of different lengths are left-padded for generation and for the loss's forward passes; CUDA's SDPA
    returns NaN for the pad positions' fully masked rows (tests/cuda_like.py), which reaches every token through
    0 x NaN unless the masks are repaired (fttool/after/attention.py)."""
    run_dir, summary = train_run(TINY, tmp_path, name="cuda-like")
    rows = [r for r in read_metrics(run_dir) if "loss" in r]
    assert len(rows) == 4 and all(math.isfinite(r["loss"]) and math.isfinite(r["reward"]) for r in rows), rows
    assert all(math.isfinite(r["grad_norm"]) for r in rows) and not summary["nonfinite_steps"]


def test_preview_samples_completions_and_shows_their_rewards(tmp_path):
    """`fttool preview objective=grpo --samples N`: the prompts, their references, and completions sampled as training
    samples them with every reward's value; a broken reward shows up here, before any training."""
    r = run_cli_here("preview", "+recipe=tiny_grpo_cpu", "--samples", "1", f"output_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("── sampled completion") == 2 and "(exact_match " in r.stdout and "── reference: " in r.stdout
    code = tmp_path / "none_reward.py"
    code.write_text("def nothing(prompts, completions, **kw):\n    return [None] * len(completions)\n")
    bad = run_cli_here("preview", "+recipe=tiny_grpo_cpu", f"objective.reward_code={code}:nothing", "--samples", "1")
    assert bad.returncode == 4 and "reward reward_code:nothing returned None for completion 0" in bad.stderr, bad.stderr
