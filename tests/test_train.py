"""Training on the CPU with the bundled tiny model: each method learns, artifacts land, resume is exact."""

import json
import shutil

import pytest

from conftest import FAST, make_spec, run_cli, run_cli_here, train_run
from fttool.errors import UserError
from fttool.launch import rundir
from fttool.worker.callbacks import read_metrics

STEPS = ["train.max_steps=12", "train.save_steps=6"]


def _losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


@pytest.mark.parametrize("method", ["full", "lora", "dora", "qlora"])
def test_method_trains_and_loss_falls(method, tmp_path):
    run_dir, summary = train_run([f"method={method}", *FAST, *STEPS], tmp_path)
    losses = _losses(run_dir)
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses
    final = run_dir / "final"
    if method == "full":
        assert (final / "model.safetensors").is_file()
        assert summary["trainable_params"] == summary["total_params"]
    else:
        from safetensors.torch import load_file

        weights = load_file(final / "adapter_model.safetensors")
        lora_b = [v for k, v in weights.items() if "lora_B" in k]
        assert lora_b and all(v.abs().sum() > 0 for v in lora_b)
        assert any("lora_magnitude_vector" in k for k in weights) == (method == "dora")  # DoRA's magnitudes saved
        assert summary["trainable_params"] < summary["total_params"] / 5
    assert (final / "tokenizer.json").is_file() and (final / "chat_template.jinja").is_file()
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["best", "checkpoint-12", "checkpoint-6"]  # validated at each checkpoint: the best is marked
    rec = read_metrics(run_dir)[0]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "peak_rss_gib"} <= set(rec) and rec["peak_rss_gib"] > 0.1
    result = json.loads((run_dir / "result.json").read_text())
    assert result["steps"] == 12 and result["nonfinite_steps"] == []
    assert result["peak_memory"]["peak_rss_gib"] >= rec["peak_rss_gib"]  # the run's peak, final save included


@pytest.mark.parametrize(
    "fmt,packing",
    [
        ("chat", "bins"),
        ("sharegpt", "padding_free"),
        ("alpaca", "none"),
        ("completion", "padding_free"),
        ("segments", "none"),
        ("preference", "none"),
    ],
)
@pytest.mark.slow
def test_every_format_trains_from_the_cli(fmt, packing, tmp_path):
    from test_data import FORMAT_ROWS, write_jsonl

    path = write_jsonl(tmp_path / "d.jsonl", FORMAT_ROWS[fmt](64))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = run_cli_here(
        f"data={fmt}",
        f"data.path={path}",
        f"data.packing={packing}",
        *FAST,
        "train.lr=5e-3",
        "run_name=cli",
        f"output_dir={tmp_path / 'runs'}",
        cwd=elsewhere,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    run_dir = tmp_path / "runs" / "cli"
    summary = json.loads((run_dir / "result.json").read_text())
    assert summary["steps"] == 6 and summary["data"]["samples"] == 64
    assert summary["last_loss"] < summary["first_loss"]
    record = json.loads((run_dir / "data.json").read_text())  # the data's fingerprint and counts stay with the run
    assert record["stats"]["samples"] == 64 and len(record["key"]["sources"][0][0]) == 64
    if fmt == "preference":
        assert "training supervised on the chosen replies" in (run_dir / "train.log").read_text()


def test_qlora_base_is_4bit(tmp_path):
    import bitsandbytes as bnb

    from fttool import models as model_lib

    spec = make_spec(["method=qlora"], tmp_path)
    model, _ = model_lib.load_model(spec)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def test_resume_matches_uninterrupted(tmp_path):
    steps = ["method=lora", *FAST, "train.max_steps=8", "train.save_steps=4", "train.save_total_limit=3"]
    full_dir, _ = train_run(steps, tmp_path, name="uninterrupted")
    # simulate a crash just after step 4: keep checkpoint-4 and the metrics logged up to then
    crashed = tmp_path / "crashed"
    shutil.copytree(full_dir, crashed)
    shutil.rmtree(crashed / "checkpoints" / "checkpoint-8")
    shutil.rmtree(crashed / "final")
    (crashed / "result.json").unlink()  # written only when a run finishes
    lines = [x for x in (crashed / "metrics.jsonl").read_text().splitlines() if json.loads(x)["step"] <= 6]
    (crashed / "metrics.jsonl").write_text("\n".join(lines) + "\n")  # steps 5-6 were logged but never checkpointed
    (crashed / "spec.yaml").write_text(
        (crashed / "spec.yaml").read_text().replace("run_name: uninterrupted", "run_name: crashed")
    )

    spec = make_spec(steps + ["run_name=crashed", "resume=auto"], tmp_path)
    run_dir, created = rundir.prepare(spec, ["pytest"], {})
    assert not created
    from fttool.worker.train import train

    train(run_dir)
    log = (crashed / "train.log").read_text().split("resuming from")
    assert len(log) == 2 and "checkpoint-4 (step 4)" in log[1]
    assert "step 1/8" not in log[1] and "step 5/8" in log[1], "the resumed process must start at step 5"
    a = {r["step"]: r["loss"] for r in read_metrics(full_dir) if "loss" in r}
    b = {r["step"]: r["loss"] for r in read_metrics(crashed) if "loss" in r}
    assert sorted(b) == list(range(1, 9)), "steps 5-6 must be logged once, after the resume"
    for step in range(5, 9):
        assert abs(a[step] - b[step]) < 1e-4, (step, a[step], b[step])


def test_existing_run_folder_is_not_overwritten(tmp_path):
    spec = make_spec(["run_name=once"], tmp_path)
    rundir.prepare(spec, ["pytest"], {})
    with pytest.raises(UserError, match="already exists; continue that run with resume=auto"):
        rundir.prepare(spec, ["pytest"], {})
    changed = make_spec(["run_name=once", "resume=auto", "train.lr=1e-3"], tmp_path)
    with pytest.raises(UserError, match="train.lr"):
        rundir.prepare(changed, ["pytest"], {})


def test_run_folder_record(tmp_path):
    spec = make_spec(["run_name=rec", "+recipe=tiny_cpu"], tmp_path)
    run_dir, _ = rundir.prepare(spec, ["fttool", "+recipe=tiny_cpu"], {"model": "tiny_chat"})
    env = json.loads((run_dir / "env.json").read_text())
    assert env["packages"]["transformers"] and env["choices"] == {"model": "tiny_chat"}
    assert "fttool +recipe=tiny_cpu" in (run_dir / "command.txt").read_text()
    assert rundir.load_spec(run_dir) == spec


@pytest.mark.slow
def test_cli_train_end_to_end_from_another_directory(tmp_path):
    r = run_cli(
        "+recipe=tiny_cpu",
        "train.max_steps=4",
        "train.logging_steps=2",
        "train.save_steps=2",
        "data.max_samples=32",
        "eval.samples=4",
        "eval.gate={perplexity:0}",  # 4 steps lower the perplexity; they do not yet lift the recipe's token F1
        "run_name=e2e",
        f"output_dir={tmp_path / 'runs'}",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    run_dir = tmp_path / "runs" / "e2e"
    for name in (
        "spec.yaml",
        "command.txt",
        "env.json",
        "metrics.jsonl",
        "train.log",
        "result.json",
        "final/adapter_model.safetensors",
    ):
        assert (run_dir / name).exists(), name
    assert "step 4/4 (100%)" in r.stdout and "tok/s" in r.stdout and "eta" in r.stdout
    assert "held-out evaluation, 4 examples" in r.stdout and "verdict:" in r.stdout
    assert (run_dir / "eval.json").is_file() and (run_dir / "loss.png").is_file()
    again = run_cli_here("+recipe=tiny_cpu", "run_name=e2e", f"output_dir={tmp_path / 'runs'}", cwd=tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr


@pytest.mark.slow
def test_bad_data_row_fails_with_file_line_and_leaves_nothing(tmp_path):
    data = tmp_path / "chats.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    data.write_text(good + "\n" + good + "\n" + '{"messages": [}\n')
    r = run_cli_here("data=chat", f"data.path={data}", "run_name=bad", f"output_dir={tmp_path / 'runs'}", cwd=tmp_path)
    assert r.returncode == 2
    assert f"{data}:3: not valid JSON" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "runs" / "bad").exists()


def test_gpu_hardware_without_gpu_fails_before_writing(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    r = run_cli_here("hardware=single_gpu", "run_name=gpu", f"output_dir={tmp_path}", cwd=tmp_path)
    assert r.returncode == 2 and "hardware=single_gpu needs a CUDA GPU" in r.stderr
    assert not (tmp_path / "gpu").exists()


def test_wandb_offline_logs_into_the_run_folder(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    run_dir, _ = train_run(["logging=wandb", "logging.mode=offline", *FAST, "train.max_steps=3"], tmp_path)
    runs = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0


@pytest.mark.slow
def test_embedded_default_beats_the_base_model(tmp_path):
    """`python -m fttool` with no arguments: the demo run a newcomer sees (about 5 minutes on 2 cores), then the
    verbs on its run folder as the README shows them: eval, export, generate."""
    r = run_cli(cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    result = json.loads((run_dir / "result.json").read_text())
    assert result["last_loss"] < result["first_loss"] / 2
    ev = result["eval"]
    assert ev["base"]["exact_match"] <= 0.05 and ev["finetuned"]["exact_match"] >= ev["base"]["exact_match"] + 0.5, ev
    assert ev["verdict"] == "pass" and "verdict: PASS" in r.stdout
    assert (run_dir / "loss.png").is_file() and (run_dir / "checkpoints" / "best").is_symlink()
    assert ev["examples"] == 100  # the after-training evaluation scored the whole demo test file
    # the verb on the run folder as the README shows it (on 25 examples: the 100 above were scored already)
    r = run_cli("eval", f"run={run_dir}", "eval.samples=25", cwd=tmp_path)
    assert r.returncode == 0 and "verdict: PASS" in r.stdout, r.stderr[-2000:]
    again = json.loads((run_dir / "eval.json").read_text())
    assert again["examples"] == 25 and again["finetuned"]["exact_match"] >= 0.6
    r = run_cli("export", f"run={run_dir}", "output=exported", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "verdict: PASS" in (tmp_path / "exported" / "README.md").read_text()
    r = run_cli("generate", "model=exported", "prompt=Reverse the words: ape cat elk pink", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "pink elk cat ape", r.stdout + r.stderr[-2000:]


@pytest.mark.slow
def test_qlora_on_the_cpu_refuses_layer_sizes_its_4bit_kernel_cannot_take(tmp_path):
    """bitsandbytes' CPU kernel asserts 'N must be divisible by block_n' at the first forward without gradients
    (validation, eval) on CPUs with AVX512-BF16: say so before training, on every CPU."""
    from fttool import assets
    from fttool.testing import random_llama

    model_dir = tmp_path / "odd-sizes"
    random_llama(
        model_dir, assets.resolve("fttool:tiny-chat"), intermediate_size=172, num_hidden_layers=1, num_attention_heads=2
    )
    r = run_cli_here(
        "method=qlora", f"model.name_or_path={model_dir}", *FAST, "run_name=odd", f"output_dir={tmp_path}", cwd=tmp_path
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "4-bit CPU kernel needs every quantized layer's input size to be a multiple of 64" in r.stderr
    assert "64->172" in r.stderr and "method=lora" in r.stderr
    assert not (tmp_path / "odd").exists()


def test_gpu_check_without_cuda_says_so_and_exits_0(tmp_path):
    import subprocess
    import sys

    import torch

    from conftest import ROOT

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: bench/gpu_check.py would run for real")
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py")], capture_output=True, text=True, cwd=tmp_path
    )
    assert r.returncode == 0 and "sees no CUDA GPU here: nothing to check" in r.stdout, r.stdout + r.stderr


@pytest.mark.slow
def test_gpu_check_flow_runs_on_the_cpu(tmp_path):
    """The GPU check's flow (runs through the CLI, export, reload, batch vs one at a time) with a tiny model."""
    import subprocess
    import sys

    from conftest import ROOT

    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "gpu_check.py"),
            "--cpu-dry-run",
            "--steps",
            "3",
            "--batch",
            "2",
            "--runs",
            "qlora-padded,full-padding_free",
            "--out",
            str(tmp_path / "gc"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert r.returncode == 0 and "gpu_check: PASS" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    for name in ("qlora-padded", "full-padding_free"):
        assert f"| {name} |" in r.stdout
    assert "greedy replies identical: 4 of 4" in r.stdout
