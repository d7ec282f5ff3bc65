"""Masks on template families outside the shared set (issue 23), by the same reference as the shared set
(template_cases.check): templates written here in the shape of Command R7B, Command-R+ tool use and Hermes 2 Pro / 3
(tests/templates/), every conversation class; and Phi-3.5-mini's template with phi-3-mini's real tokenizer, whose
turn markers strip the whitespace after them."""

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
