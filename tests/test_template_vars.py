"""Template variables (data.template_kwargs, a row's tools and documents), literal marker text, the mask dump and
why a sample ends up with nothing to train."""

import json

import pytest

import template_cases as tc
from conftest import SHARED_DATA, make_spec, run_cli, run_cli_here

needs_shared = pytest.mark.skipif(
    not (SHARED_DATA / "tokenizers" / "phi-2").is_dir() or not tc.template_names(),
    reason="../shared/data (real tokenizers and templates) is not present",
)
QWEN3 = "hf/Qwen-Qwen3-0.6B.jinja"
CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
# a tool-use template that loops over `tools` without a guard, as Hermes 2 Pro's and Command-R+'s do
LOOPS_OVER_TOOLS = (
    "{% for t in tools %}{{ '<|im_start|>tool\n' + t['name'] + '<|im_end|>\n' }}{% endfor %}"
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def encode(tok, spec_data, row, template=None):
    from fttool.data.formats import Formatter
    from fttool.data.tokenize import Encoder

    ex = Formatter("chat", {}, {}, None)("data.jsonl:1", row)
    out = Encoder(tok, template, spec_data).encode_batch(["data.jsonl:1"], [ex])
    return {k: v[0] for k, v in out.items()}


def trained_text(tok, out):
    return [tok.decode(r) for r in tc.trained_runs(out["input_ids"], out["labels"])]


@needs_shared
def test_template_kwargs_reach_training_and_generation_prompts(tmp_path):
    """Qwen3 with enable_thinking=false writes the empty think block into the generation prompt, so it is prompt,
    not trained; by default the model writes it and it is trained. Generation prompts get the same variables."""
    from fttool.data import prompt_ids

    tok = tc.tokenizer(QWEN3)
    default = trained_text(tok, encode(tok, make_spec([], tmp_path).data, {"messages": CHAT}))
    off = make_spec(["data.template_kwargs={enable_thinking: false}"], tmp_path)
    assert off.data.template_kwargs == {"enable_thinking": False}
    no_think = trained_text(tok, encode(tok, off.data, {"messages": CHAT}))
    assert default == ["<think>\n\n</think>\n\nHello there<|im_end|>"]
    assert no_think == ["Hello there<|im_end|>"]
    prompt = tok.decode(prompt_ids(tok, CHAT[:1], off.data.template_kwargs))
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert tok.decode(prompt_ids(tok, CHAT[:1])).endswith("<|im_start|>assistant\n")


@needs_shared
def test_template_kwargs_are_part_of_the_cache_key(tmp_path):
    from fttool.data import cache

    tok = tc.tokenizer("chatml.jinja")
    a, b = make_spec([], tmp_path).data, make_spec(["data.template_kwargs={enable_thinking: false}"], tmp_path).data
    assert cache.key(b, 0, tok, "t", [], {})["data"]["template_kwargs"] == {"enable_thinking": False}
    assert cache.digest(cache.key(a, 0, tok, "t", [], {})) != cache.digest(cache.key(b, 0, tok, "t", [], {}))


def test_template_kwargs_from_the_command_line(tmp_path):
    ok = run_cli_here(
        "check",
        "data.template_kwargs.enable_thinking=false",
        "data.template_kwargs.date_string=26 Jul 2024",
        cwd=tmp_path,
    )
    assert ok.returncode == 0, ok.stderr
    bad = run_cli_here("check", "data.template_kwargs.add_generation_prompt=true", cwd=tmp_path)
    assert bad.returncode != 0 and "data.template_kwargs.add_generation_prompt: fttool sets" in bad.stderr


@needs_shared
def test_a_rows_tools_reach_the_template_as_the_list_it_holds(tmp_path):

    tok = tc.tokenizer("chatml.jinja")
    spec = make_spec([], tmp_path)
    empty = encode(tok, spec.data, {"messages": CHAT, "tools": []}, LOOPS_OVER_TOOLS)
    assert trained_text(tok, empty) == ["Hello there<|im_end|>"]
    listed = encode(tok, spec.data, {"messages": CHAT, "tools": [{"name": "get_weather"}]}, LOOPS_OVER_TOOLS)
    assert "get_weather" in tok.decode(listed["input_ids"])
    # no tools in the row: a template that loops over them gets an empty list, as the model's own chat code passes
    assert trained_text(tok, encode(tok, spec.data, {"messages": CHAT}, LOOPS_OVER_TOOLS)) == ["Hello there<|im_end|>"]
    default = make_spec(["data.template_kwargs={tools: []}"], tmp_path)
    assert trained_text(tok, encode(tok, default.data, {"messages": CHAT}, LOOPS_OVER_TOOLS)) == [
        "Hello there<|im_end|>"
    ]


@needs_shared
def test_documents_reach_the_template(tmp_path):
    tok = tc.tokenizer("hf/ibm-granite-granite-3.3-2B-Instruct.jinja")
    out = encode(tok, make_spec([], tmp_path).data, {"messages": CHAT, "documents": [{"text": "Doc about owls"}]})
    assert "Doc about owls" in tok.decode(out["input_ids"])
    assert all("owls" not in r for r in trained_text(tok, out))


@pytest.mark.skipif(not (SHARED_DATA / "tokenizers" / "phi-3-mini").is_dir(), reason="../shared/data is not present")
def test_literal_marker_text_is_plain_text_with_the_real_phi3_tokenizer(tmp_path):
    """A chat quoting phi-3's own <|end|> and <|user|>: kept, tokenized as characters, and the quote in the reply is
    trained like the rest of the reply; the turn structure is untouched."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(SHARED_DATA / "tokenizers" / "phi-3-mini"))
    row = {
        "messages": [
            {"role": "user", "content": "What is <|end|>?"},
            {"role": "assistant", "content": "It closes a turn: <|end|> then <|user|>."},
        ]
    }
    out = encode(tok, make_spec([], tmp_path).data, row)
    end, user = tok.convert_tokens_to_ids("<|end|>"), tok.convert_tokens_to_ids("<|user|>")
    assert out["input_ids"].count(end) == 2 and out["input_ids"].count(user) == 1  # the template's own only
    assert out["literal_markers"] == 3
    assert tok.decode(out["input_ids"]).count("<|end|>") == 4
    (run,) = tc.trained_runs(out["input_ids"], out["labels"])
    assert tok.decode(run) == "It closes a turn: <|end|> then <|user|>.<|end|>" and run[-1] == end


@needs_shared
def test_why_a_sample_has_nothing_to_train(tmp_path):
    """DeepSeek V3.1 strips the reasoning of every assistant message: a reply that is only reasoning renders empty,
    is not trained, and the sample is counted with that reason; a reply cut off by max_length is counted too."""
    from fttool.data import NO_TRAINED_WHY, fate

    tok = tc.tokenizer("hf/deepseek-ai-DeepSeek-V3.1.jinja")
    spec = make_spec([], tmp_path)
    row = {
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>only this</think>"}]
    }
    out = encode(tok, spec.data, row)
    assert out["empty_replies"] == 1 and all(x == -100 for x in out["labels"])
    assert fate(out["input_ids"], out["labels"], spec.data, out["empty_replies"])[3] == NO_TRAINED_WHY["empty"]
    short = make_spec(["data.max_length=8"], tmp_path)
    out = encode(
        tok,
        short.data,
        {
            "messages": [
                {"role": "user", "content": "Tell me a long story, please " * 3},
                {"role": "assistant", "content": "Once upon a time"},
            ]
        },
    )
    ids, labels, truncated, why = fate(out["input_ids"], out["labels"], short.data, out["empty_replies"])
    assert truncated and len(ids) == 8 and why == NO_TRAINED_WHY["truncated"]


@pytest.mark.slow
def test_mask_dump_from_the_command_line(tmp_path):
    """`fttool preview ... output=FILE.jsonl`: one object per row in file order, labels aligned with input_ids
    (-100 = not trained), refused rows with their error, truncation and drops marked; --samples limits it."""
    data = tmp_path / "d.jsonl"
    rows = [
        {"messages": CHAT},
        {"messages": [{"role": "user", "content": "no reply"}]},
        {"messages": [{"role": "user", "content": "long"}, {"role": "assistant", "content": "word " * 300}]},
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "masks.jsonl"
    r = run_cli("preview", "data=chat", f"data.path={data}", "data.max_length=64", f"output={out}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "2 samples (1 truncated" in r.stdout and "1 refused rows" in r.stdout
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [x["loc"] for x in recs] == [f"{data}:1", f"{data}:2", f"{data}:3"]
    first, refused, long = recs
    assert len(first["input_ids"]) == len(first["labels"]) and set(first) == {"loc", "input_ids", "labels"}
    assert any(x != -100 for x in first["labels"]) and first["labels"][0] == -100
    assert set(refused) == {"loc", "error"} and "no assistant reply" in refused["error"]
    assert long["truncated"] and len(long["input_ids"]) == 64
    r = run_cli("preview", "data=chat", f"data.path={data}", f"output={out}", "--samples", "1", cwd=tmp_path)
    assert r.returncode == 0 and len(out.read_text().splitlines()) == 1
    assert not list(tmp_path.glob(".masks.jsonl.tmp*"))  # written whole, then renamed
