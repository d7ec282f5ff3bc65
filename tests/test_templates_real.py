"""Exactly the right tokens on every real chat template in ../shared/data/chat_templates (and hf/): every
conversation class of the masking issue, judged against the hand-written reference in template_cases.py.
Adding a template file adds its cases; one without reference markers fails until they are written down."""

import pytest

import template_cases as tc
from conftest import SHARED_DATA, make_spec

pytestmark = pytest.mark.skipif(
    not (SHARED_DATA / "tokenizers" / "phi-2").is_dir() or not tc.template_names(),
    reason="../shared/data (real tokenizers and templates) is not present",
)
CASES = list(tc.conversations("<END>"))


@pytest.fixture(scope="module")
def data_spec(tmp_path_factory):
    return make_spec([], tmp_path_factory.mktemp("spec")).data


def test_every_template_file_has_a_reference():
    missing = [n for n in tc.template_names() if n not in tc.END or n not in tc.HEADERS]
    assert not missing, f"write the end and header markers of {missing} into tests/template_cases.py"
    assert len([n for n in tc.template_names() if n.startswith("hf/")]) >= 21


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", tc.template_names())
def test_trains_exactly_the_replies_and_their_end_marker(name, case, data_spec):
    # "" = masked exactly right; "refused: ..." = the template cannot render this conversation and fttool refused
    # it with its message (check() asserts that refusal): both are right, anything else raises
    verdict = tc.check(name, case, data_spec)
    assert verdict == "" or verdict.startswith("refused: "), verdict
