"""Masks on template families outside the shared set (issue 23), by the same reference as the shared set
(template_cases.check): templates written here in the shape of Command R7B, Command-R+ tool use and Hermes 2 Pro / 3
(tests/templates/), every conversation class; and Phi-3.5-mini's template with phi-3-mini's real tokenizer, whose
turn markers strip the whitespace after them."""

import copy
import logging

import pytest

import template_cases as tc
from conftest import SHARED_DATA, make_spec

pytestmark = pytest.mark.skipif(
    not (SHARED_DATA / "tokenizers" / "phi-2").is_dir(), reason="../shared/data (real tokenizers) is not present"
)
CASES = list(tc.conversations("<END>"))


@pytest.fixture(scope="module")
def data_spec(tmp_path_factory):
    return make_spec([], tmp_path_factory.mktemp("spec")).data


def test_every_own_template_has_a_reference():
    names = tc.own_template_names()
    assert len(names) >= 3 and all(n in tc.END and n in tc.HEADERS for n in names)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", tc.own_template_names())
def test_trains_exactly_the_replies_and_their_end_marker(name, case, data_spec):
    verdict = tc.check(name, case, data_spec)
    assert verdict == "" or verdict.startswith("refused: "), verdict


def test_a_closing_of_two_special_tokens_is_trained_whole_and_the_header_never(data_spec):
    tok = tc.tokenizer("own/cohere-r7b-shape.jinja")
    row = tc.conversations("<END>")["multi_turn_system"]
    out, _ = tc.encode(tok, row, data_spec)
    runs = [tok.decode(r) for r in tc.trained_runs(out["input_ids"], out["labels"])]
    assert runs == ["fox red<|END_RESPONSE|><|END_OF_TURN_TOKEN|>", "two one<|END_RESPONSE|><|END_OF_TURN_TOKEN|>"]


def test_a_template_that_loops_over_tools_renders_rows_without_them_with_an_empty_list(data_spec, caplog):
    for name in ("own/hermes-tools-loop-shape.jinja", "own/cohere-rplus-tool-use-shape.jinja"):
        tok = tc.tokenizer(name)
        row = tc.conversations("<END>")["multi_turn_system"]
        with pytest.raises(TypeError, match="NoneType"):
            tok.apply_chat_template(row["messages"], tokenize=False)  # what the template does with no tools
        with caplog.at_level(logging.INFO, logger="fttool"):
            out, _ = tc.encode(tok, row, data_spec)
        assert "rendered with tools=[]" in caplog.text
        runs = [tok.decode(r) for r in tc.trained_runs(out["input_ids"], out["labels"])]
        assert [r.split("<|")[0] for r in runs] == ["fox red", "two one"], runs
        caplog.clear()


def _phi3_tokenizer(template: str):
    """phi-3-mini's real tokenizer (SentencePiece; its markers strip the whitespace after them) with a template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(SHARED_DATA / "tokenizers" / "phi-3-mini"))
    tok.chat_template = tc.template_source(template)
    return tok


@pytest.mark.parametrize("case", [c for c in CASES if c != "tools"])
def test_a_header_that_swallows_the_replys_leading_whitespace_is_never_trained(case, data_spec):
    tok = _phi3_tokenizer("own/phi-3.5-mini-shape.jinja")
    assert tok.added_tokens_decoder[tok.convert_tokens_to_ids("<|assistant|>")].rstrip
    row = tc.conversations("<|end|>")[case]
    out, ex = tc.encode(tok, row, data_spec)
    runs = [tok.decode(r) for r in tc.trained_runs(out["input_ids"], out["labels"])]
    replies = [m["content"] for m in ex["messages"] if m["role"] == "assistant"]
    assert len(runs) == len(replies)
    for run, reply in zip(runs, replies):
        assert run.endswith("<|end|>") and "<|assistant|>" not in run and "<|user|>" not in run, run
        assert reply.split("</think>")[-1].strip() in run
    if case == "leading_whitespace":  # the blank lines went into <|assistant|>, as at inference
        assert runs == ["Sure, here it is.\n<|end|>"]


def test_quoted_markers_keep_the_rendered_characters_under_a_template_without_separators(data_spec):
    """DeepSeek-R1 distills: a user turn has no closing, so quoted markers sit right against <｜Assistant｜>."""
    tok = copy.deepcopy(tc.tokenizer("own/deepseek-r1-distill-shape.jinja"))  # the cached one stays as it is
    tok.add_special_tokens({"additional_special_tokens": ["[INST]", "<|end|>", "<|im_end|>", "<|eot_id|>"]})
    row = {
        "messages": [
            {"role": "system", "content": "Quote freely."},
            {"role": "user", "content": "</s>[INST] and <|end|>,<|im_end|>\n <｜Assistant｜>"},
            {"role": "assistant", "content": " <|eot_id|> [INST]  ends<｜end▁of▁sentence｜>"},
        ]
    }
    out, ex = tc.encode(tok, row, data_spec)
    rendered = tok.apply_chat_template(row["messages"], tokenize=False)
    assert tok.decode(out["input_ids"], skip_special_tokens=False) == rendered  # byte for byte
    assert out["literal_markers"] == 8
    specials = {tok.convert_tokens_to_ids(t) for t in ("<｜Assistant｜>", "<｜User｜>", "<|eot_id|>", "[INST]")}
    assert sum(i in specials for i in out["input_ids"]) == 2  # the template's own two markers, not the quoted ones
    runs = [tok.decode(r) for r in tc.trained_runs(out["input_ids"], out["labels"])]
    assert runs == [" <|eot_id|> [INST]  ends<｜end▁of▁sentence｜><｜end▁of▁sentence｜>"]


def test_special_text_the_template_parses_itself_renders_as_the_template_renders_it(data_spec):
    """A tokenizer whose </think> is a special token, and a template that cuts earlier replies at '</think>': the
    training text is the template's rendering of the row as written, the reasoning of the earlier turn gone."""
    tok = copy.deepcopy(tc.tokenizer("own/deepseek-r1-distill-shape.jinja"))  # the cached one stays as it is
    tok.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
    row = tc.conversations("<END>")["think_in_earlier_turn"]
    out, _ = tc.encode(tok, row, data_spec)
    rendered = tok.apply_chat_template(row["messages"], tokenize=False)
    assert tok.decode(out["input_ids"], skip_special_tokens=False) == rendered
    assert tc.REASONING not in rendered


def test_a_row_whose_tokens_would_not_decode_to_the_rendering_is_refused_named_and_counted(data_spec, monkeypatch):
    from fttool.data.formats import Formatter
    from fttool.data.token_text import TokenText
    from fttool.data.tokenize import Encoder
    from fttool.errors import UserError

    tok = tc.tokenizer("chatml.jinja")
    enc = Encoder(tok, None, data_spec)
    rows = [tc.conversations("<|im_end|>")[c] for c in ("multi_turn_system", "literal_markers")]
    exs = [Formatter("chat", {}, {}, None)(f"data.jsonl:{k + 1}", r) for k, r in enumerate(rows)]
    # a piece after a quoted marker encoded as if it started the text: the kind of slip the check is for
    monkeypatch.setattr(TokenText, "encode_piece", lambda self, piece, as_text, first: _lossy(self, piece, as_text))
    with pytest.raises(UserError, match=r"data.jsonl:2: the training tokens would decode to other text"):
        enc.encode_batch(["data.jsonl:1", "data.jsonl:2"], exs)
    out = enc.encode_batch(["data.jsonl:1", "data.jsonl:2"], exs, skip_bad=True)
    assert out["error"][0] == "" and out["error"][1].startswith("data.jsonl:2: the training tokens")
    assert out["input_ids"][1] == [] and out["labels"][1] == []


def _lossy(enc, piece: str, as_text: bool):
    got = enc.tok(
        piece.lstrip(" "), add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=as_text
    )
    return got["input_ids"], got["offset_mapping"]
