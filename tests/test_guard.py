"""The non-finite guard: a NaN/inf loss or gradient norm stops the run at that step, before its update; NaN is shown
as NaN; nothing is written from poisoned weights; the last checkpoint stays resumable; a tolerance skips and counts."""

import math

import pytest

from conftest import FAST, make_spec, run_cli, run_cli_here, train_run
from fttool.errors import UserError
from fttool.launch import rundir
from fttool.runfolder import folder
from fttool.worker.callbacks import read_metrics

STEPS = ["method=lora", *FAST, "train.max_steps=6", "train.save_steps=2"]


@pytest.fixture
def nan_loss_at(monkeypatch):
    """nan_loss_at({3, 5}): the 3rd and 5th training forward passes return a NaN loss (as a bad batch would)."""
    from fttool.worker.safe_trainer import RunTrainer as Trainer  # its loss: the chunked path's or transformers'

    original = Trainer.compute_loss

    def arm(calls):
        seen = {"n": 0}

        def compute_loss(self, model, inputs, return_outputs=False, **kw):
            out = original(self, model, inputs, return_outputs=return_outputs, **kw)
            if model.training and not return_outputs:
                seen["n"] += 1
                if seen["n"] in calls:
                    return out * float("nan")
            return out

        monkeypatch.setattr(Trainer, "compute_loss", compute_loss)

    return arm


def _finite_adapter(path):
    from safetensors.torch import load_file

    return all(v.isfinite().all() for v in load_file(path / "adapter_model.safetensors").values())


@pytest.mark.slow
def test_a_nan_step_stops_the_run_before_its_update_and_the_run_resumes(nan_loss_at, tmp_path):
    from fttool.worker.guard import TrainingDiverged
    from fttool.worker.train import train

    nan_loss_at({5})
    with pytest.raises(TrainingDiverged, match="training stopped at step 5: non-finite loss nan") as err:
        train_run(STEPS, tmp_path, name="nan")
    assert err.value.exit_code == 4
    msg = str(err.value)
    assert "checkpoint-4" in msg and "train.lr=" in msg and "train.nonfinite_tolerance=N" in msg
    run_dir = tmp_path / "nan"
    assert not (run_dir / "final").exists() and not (run_dir / "result.json").exists()
    assert [c.name for c in folder.checkpoints(run_dir)] == ["checkpoint-2", "checkpoint-4"]
    assert _finite_adapter(run_dir / "checkpoints" / "checkpoint-4")
    rows = [r for r in read_metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(math.isfinite(r["loss"]) for r in rows[:4])
    assert math.isnan(rows[-1]["loss"]) and rows[-1]["nonfinite"] == "stopped"  # NaN, never 0
    assert "NaN" in (run_dir / "metrics.jsonl").read_text().splitlines()[-1]

    nan_loss_at(set())  # the bad batch is gone: resume=auto continues from checkpoint-4
    spec = make_spec(STEPS + ["run_name=nan", "resume=auto"], tmp_path)
    rundir.prepare(spec, ["pytest"], {})
    summary = train(run_dir)
    assert summary["steps"] == 6 and summary["nonfinite_steps"] == []
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert _finite_adapter(run_dir / "final")


def test_a_tolerated_nan_step_is_skipped_and_counted(nan_loss_at, tmp_path):
    nan_loss_at({3})
    run_dir, summary = train_run(STEPS + ["train.nonfinite_tolerance=1"], tmp_path)
    assert summary["steps"] == 6 and summary["nonfinite_steps"] == [3]
    rows = {r["step"]: r for r in read_metrics(run_dir) if "loss" in r}
    assert math.isnan(rows[3]["loss"]) and rows[3]["nonfinite_steps"] == 1 and rows[6]["nonfinite_steps"] == 1
    assert "nonfinite_steps" not in rows[2]
    assert _finite_adapter(run_dir / "final")
    assert "non-finite step(s) skipped: [3]" in (run_dir / "train.log").read_text()


def test_a_skipped_step_leaves_the_weights_and_the_optimizer_as_they_were():
    import torch

    from fttool.worker.guard import NonFiniteGuard, NonFiniteStep

    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1)
    guard = NonFiniteGuard(tolerance=1)
    layer(torch.randn(3, 4)).sum().backward()
    guard.see_loss(torch.tensor(1.0))
    guard.check(layer, torch.tensor(1.0), step=1)
    opt.step()
    opt.zero_grad()
    before = [p.detach().clone() for p in layer.parameters()]
    state = {k: v["step"].clone() for k, v in opt.state.items()}
    (layer(torch.randn(3, 4)).sum() * float("nan")).backward()
    guard.see_loss(torch.tensor(float("nan")))
    guard.check(layer, torch.tensor(float("nan")), step=2)
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters()))
    assert all(torch.equal(opt.state[k]["step"], v) for k, v in state.items()) and guard.skipped == [2]
    guard.see_loss(torch.tensor(2.0))
    with pytest.raises(NonFiniteStep):  # the second one is over the tolerance
        guard.check(layer, torch.tensor(float("inf")), step=3)


def test_fp16_gradient_overflow_is_left_to_the_loss_scaler():
    import torch

    from fttool.worker.guard import NonFiniteGuard

    guard = NonFiniteGuard(tolerance=0, fp16=True)
    guard.see_loss(torch.tensor(2.0))
    guard.check(torch.nn.Linear(1, 1), torch.tensor(float("inf")), step=1)  # no exception: the scaler skips it
    guard.see_loss(torch.tensor(float("inf")))
    with pytest.raises(Exception, match="step 2"):
        guard.check(torch.nn.Linear(1, 1), torch.tensor(1.0), step=2)


@pytest.mark.slow
def test_a_diverging_run_from_the_cli_exits_4_with_the_causes(tmp_path):
    r = run_cli(
        "method=full",
        "train.lr=1e9",
        "train.max_grad_norm=1e9",
        "train.warmup_ratio=0",
        "train.max_steps=8",
        "train.logging_steps=1",
        "train.batch_size=4",
        "train.grad_accum=1",
        "data.max_samples=32",
        "data.val_ratio=0",
        "eval.after_training=false",
        "run_name=div",
        f"output_dir={tmp_path}",
        cwd=tmp_path,
    )
    assert r.returncode == 4, r.stdout[-2000:] + r.stderr[-2000:]
    assert "fttool: error: training stopped at step" in r.stderr and "Traceback" not in r.stderr
    assert "train.lr=1e+09 now; try train.lr=1e+08" in r.stderr
    assert "loss nan" in r.stdout and "loss 0.0000" not in r.stdout
    assert not (tmp_path / "div" / "final").exists()


def test_validation_that_turns_nan_stops_before_the_checkpoint(tmp_path):
    """Weights that give NaN on held-out data are not saved, even when every training step was finite."""
    from fttool.worker.guard import TrainingDiverged

    with pytest.raises(TrainingDiverged, match="the validation loss is nan"):
        train_run(
            [
                "method=full",
                "train.lr=1e9",
                "train.max_grad_norm=1e9",
                "train.warmup_ratio=0",
                *FAST,
                "train.max_steps=4",
                "train.save_steps=1",
            ],
            tmp_path,
            name="val",
        )
    assert (
        folder.checkpoints(tmp_path / "val") == []
    )  # step 1's update made the model NaN: its checkpoint is not written


def test_tolerance_is_refused_where_an_update_cannot_be_dropped(tmp_path):
    with pytest.raises(UserError, match="DeepSpeed applies each update inside its backward"):
        make_spec(
            ["hardware=zero3", "hardware.device=cpu", "hardware.num_processes=2", "train.nonfinite_tolerance=2"],
            tmp_path,
        )
    with pytest.raises(UserError, match="train.nonfinite_tolerance=-1 is out of range"):
        make_spec(["train.nonfinite_tolerance=-1"], tmp_path)


@pytest.mark.slow
def test_weights_with_nan_are_named_when_loaded(tmp_path):
    from safetensors.torch import load_file, save_file

    from fttool import models as model_lib

    run_dir, _ = train_run([*FAST, "train.max_steps=2", "train.save_steps=2"], tmp_path)
    path = run_dir / "final" / "adapter_model.safetensors"
    weights = load_file(path)
    name = next(k for k in weights if "lora_B" in k)
    weights[name] = weights[name] * float("nan")
    save_file(weights, path)
    with pytest.raises(UserError, match="weight tensor\\(s\\) hold NaN or inf"):
        model_lib.load_trained(rundir.load_spec(run_dir), "fp32", run_dir / "final")
    for verb in (["eval", f"run={run_dir}"], ["export", f"run={run_dir}", f"output={tmp_path / 'out'}"]):
        r = run_cli_here(*verb, cwd=tmp_path)
        assert r.returncode == 2 and "hold NaN or inf" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_a_diverging_two_process_run_stops_every_rank_and_exits_4(strategy, tmp_path):
    from test_distributed import free_port

    r = run_cli(
        f"hardware={strategy}",
        "hardware.device=cpu",
        "hardware.num_processes=2",
        f"hardware.main_port={free_port()}",
        "method=full",
        "train.lr=1e9",
        "train.max_grad_norm=1e9",
        "train.warmup_ratio=0",
        "train.max_steps=8",
        "train.logging_steps=1",
        "train.batch_size=2",
        "train.grad_accum=1",
        "data.max_samples=32",
        "data.val_ratio=0",
        "eval.after_training=false",
        "run_name=div2",
        f"output_dir={tmp_path}",
        cwd=tmp_path,
    )
    assert r.returncode == 4, r.stdout[-3000:] + r.stderr[-3000:]
    assert "training stopped at step" in r.stderr and "rank 0" in r.stderr
    assert not (tmp_path / "div2" / "final").exists()
    # what the message says was applied depends on the strategy: DeepSpeed steps inside backward (issue 24)
    if strategy == "zero2":
        assert "had already applied this step's update inside its backward pass" in r.stderr
        assert "Nothing of this step was applied" not in r.stderr
    else:
        assert "Nothing of this step was applied or saved" in r.stderr
