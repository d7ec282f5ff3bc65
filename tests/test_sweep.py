"""Sweeps (one run folder per trial in one sweep folder, a summary and a plot) and W&B offline logging."""

import csv
import json
import os

import pytest

from conftest import run_cli, run_cli_here

TINY = [
    "+recipe=tiny_cpu",
    "train.max_steps=4",
    "train.logging_steps=1",
    "data.max_samples=64",
    "eval.after_training=false",
    "data.val_ratio=0.05",
]


def sweep_dir_of(out):
    (folder,) = [p for p in out.iterdir() if p.name.startswith("sweep-")]
    return folder


@pytest.mark.slow
def test_sweep_runs_every_trial_and_summarises(tmp_path):
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    cache = f"data.cache_dir={tmp_path / 'cache'}"  # its own: another test may have cached the same data already
    r = run_cli(
        "-m", *TINY, "method.rank=4,8", "train.lr=1e-3,2e-3", cache, f"output_dir={tmp_path / 'runs'}", cwd=elsewhere
    )
    assert r.returncode == 0, r.stderr[-3000:]
    sweep = sweep_dir_of(tmp_path / "runs")
    trials = sorted(p for p in sweep.iterdir() if p.name.startswith("trial-"))
    assert [t.name for t in trials] == [
        "trial-00-method.rank=4,train.lr=0.001",
        "trial-01-method.rank=4,train.lr=0.002",
        "trial-02-method.rank=8,train.lr=0.001",
        "trial-03-method.rank=8,train.lr=0.002",
    ]
    for t in trials:
        assert (t / "final").is_dir() and (t / "spec.yaml").is_file()
    spec = (trials[3] / "spec.yaml").read_text()
    assert "rank: 8" in spec and "lr: 0.002" in spec
    logs = [(t / "train.log").read_text() for t in trials]
    assert "tokenized and cached" in logs[0] and all("loaded from cache" in log for log in logs[1:])  # one shared cache
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert [row["overrides"] for row in rows] == [
        "method.rank=4 train.lr=0.001",
        "method.rank=4 train.lr=0.002",
        "method.rank=8 train.lr=0.001",
        "method.rank=8 train.lr=0.002",
    ]
    for row in rows:
        assert row["status"] == "ok" and float(row["final_train_loss"]) > 0 and float(row["eval_loss"]) > 0
        assert float(row["tokens_per_s"]) > 0 and row["run_dir"].startswith(str(sweep))
    assert "| trial | overrides |" in (sweep / "summary.md").read_text() and "| trial | overrides |" in r.stdout
    png = (sweep / "loss_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.slow
def test_a_failed_trial_is_recorded_and_the_sweep_goes_on(tmp_path):
    broken = tmp_path / "broken-model"  # a folder that exists (so the up-front check passes) but does not load
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    out = tmp_path / "runs"
    r = run_cli("-m", *TINY, f"model.name_or_path=fttool:tiny-chat,{broken}", f"output_dir={out}", cwd=tmp_path)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "1 sweep trial(s) failed" in r.stderr and str(broken) in r.stderr
    rows = list(csv.DictReader(open(sweep_dir_of(out) / "summary.csv")))
    assert [row["status"] for row in rows] == ["ok", "failed"] and "could not load" in rows[1]["error"]


def test_a_sweep_with_a_missing_model_folder_is_refused_before_any_trial(tmp_path):
    r = run_cli_here("-m", *TINY, "model.name_or_path=fttool:tiny-chat,/nonexistent/model", f"output_dir={tmp_path}")
    assert r.returncode == 2 and "model.name_or_path=/nonexistent/model: no such model folder" in r.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_wandb_offline_two_processes(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("deepspeed")
    from wandb_records import records

    secret = "sekrit" + "0123456789abcdef" * 2 + "0123456"
    planted = "planted-secret-value-7c1e"  # any variable of the environment (issue 24)
    env = {"WANDB_API_KEY": secret, "WANDB_MODE": "offline", "FTTOOL_PLANTED": planted}
    r = run_cli(
        "-m",
        *TINY,
        "logging=wandb",
        "logging.mode=offline",
        "hardware=ddp",
        "hardware.device=cpu",
        "method.rank=4",
        "eval.after_training=true",
        "eval.samples=4",
        f"output_dir={tmp_path}",
        env=env,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    sweep = sweep_dir_of(tmp_path)
    (trial,) = [p for p in sweep.iterdir() if p.name.startswith("trial-")]
    runs = list((trial / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1  # only rank 0 logs
    recs = list(records(runs[0]))
    (run,) = [x.run for x in recs if x.WhichOneof("record_type") == "run"]
    assert run.run_group == sweep.name and run.display_name == trial.name
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["method"]["rank"] == 4 and config["hardware"]["strategy"] == "ddp"  # the resolved spec
    history = [
        i.key or "/".join(i.nested_key)
        for x in recs
        if x.WhichOneof("record_type") == "history"
        for i in x.history.item
    ]
    assert any("loss" in k for k in history)
    summary = {u.key: u.value_json for x in recs if x.WhichOneof("record_type") == "summary" for u in x.summary.update}
    assert json.loads(summary["run_dir"]) == str(trial)
    # validation during training and the held-out evaluation after it (rank 0 reloads the saved adapter)
    assert any("eval" in k and "loss" in k for k in history), history
    assert json.loads(summary["eval/verdict"]) in ("pass", "fail") and "eval/base/exact_match" in summary
    assert json.loads((trial / "eval.json").read_text())["examples"] == 4
    exported = run_cli("export", f"run={trial}", f"output={tmp_path / 'export'}", env=env, cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr[-2000:]
    # neither the API key nor any other variable of the environment lands in a file of the sweep, its trials'
    # run folders, their W&B offline files or the export
    for root, _, files in os.walk(tmp_path):
        for name in files:
            content = open(os.path.join(root, name), "rb").read()
            assert secret.encode() not in content and planted.encode() not in content, os.path.join(root, name)


def test_the_sweep_outcome_is_read_from_its_trial_records(tmp_path):
    """Wherever the trials ran (this process or SLURM jobs), the submitting process decides the exit code from the
    sweep folder's records: failed trials, and expected trials that left no record."""
    from fttool.launch import sweep

    sweep.record_trial(tmp_path, 0, ["method.rank=8"], tmp_path / "t0", "ok")
    sweep.record_trial(tmp_path, 1, ["method.rank=16"], None, "failed", "boom")
    assert sweep.failures(tmp_path) == ["trial 1 (method.rank=16): boom"]
    missing = sweep.failures(tmp_path, expected=3)
    assert len(missing) == 2 and missing[1].startswith("trial 2: no record in")
    assert sweep.failures(tmp_path / "empty", expected=1)[0].startswith("trial 0: no record")


def test_one_compose_and_one_validation_per_run(monkeypatch, tmp_path, capsys):
    """A run is composed and validated once on its way from the command line to `check` (or training)."""
    from fttool import cli
    from fttool.config import compose, validation

    calls = {"compose": 0, "build": 0}
    real_compose, real_build = compose.compose, validation.build_spec

    def counted_compose(*a, **k):
        calls["compose"] += 1
        return real_compose(*a, **k)

    def counted_build(*a, **k):
        calls["build"] += 1
        return real_build(*a, **k)

    monkeypatch.setattr(compose, "compose", counted_compose)
    monkeypatch.setattr(validation, "build_spec", counted_build)
    cli.main(["check", "method.rank=8", f"output_dir={tmp_path}"])
    assert "ok: the spec is valid" in capsys.readouterr().err
    assert calls == {"compose": 1, "build": 1}


def test_the_wandb_mode_is_the_specs(monkeypatch, tmp_path):
    """logging.mode in the spec decides, not a WANDB_MODE left in the environment."""
    wandb = pytest.importorskip("wandb")
    from conftest import make_spec
    from fttool.worker import tracking

    seen = {}

    class Run:
        summary = {}

    def init(**kwargs):
        seen.update(kwargs)
        wandb.run = Run()
        return wandb.run

    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.setattr(wandb, "run", None, raising=False)
    spec = make_spec(["logging=wandb", "logging.mode=offline"], tmp_path)
    tracking.start(spec, tmp_path)
    assert seen["mode"] == "offline"
