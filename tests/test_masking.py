"""Masks on real chat templates: exactly the replies and the token that closes each one are trained.

Uses the real phi-3-mini tokenizer and every template in ../shared/data/chat_templates (skipped when that
folder is absent), single- and multi-turn, with and without a system message.
"""

import re

import pytest

from conftest import SHARED_DATA, make_spec
from fttool.config import objectives
from fttool.data.tokenizer import load_tokenizer
from template_cases import trained_runs

pytestmark = pytest.mark.skipif(
    not (SHARED_DATA / "tokenizers" / "phi-3-mini").is_dir(),
    reason="../shared/data (real tokenizers and templates) is not present",
)

SYSTEM = {"role": "system", "content": "You are terse. Never mention {{name}}."}
TURNS = [
    ("Reverse the words: red fox", "fox red"),
    ("Now: blue whale sings", "sings whale blue"),
    ("And: one two", "two one"),
]
CONVERSATIONS = {
    "single": [{"role": "user", "content": TURNS[0][0]}, {"role": "assistant", "content": TURNS[0][1]}],
    "multi": [m for u, a in TURNS for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})],
}
CONVERSATIONS["single+system"] = [SYSTEM] + CONVERSATIONS["single"]
CONVERSATIONS["multi+system"] = [SYSTEM] + CONVERSATIONS["multi"]
# Flattened as the collection's README says, qwen2.5's template writes "<|im_start|>assistant" and the reply with
# nothing between them, so one token ("ants" of "assistant" + "sings") spans header and reply; it is trained
# so that no character of the reply goes untrained.
GLUED = {"qwen2.5-instruct.jinja"}
END_MARKERS = re.compile(r"^(<\|?[\w./-]+\|?>|\s)*$")  # what may follow a reply in its trained run: end-of-turn tokens


def template_files():
    folder = SHARED_DATA / "chat_templates"
    return sorted(p.name for p in folder.glob("*.jinja")) if folder.is_dir() else []


def load_template(name):
    if name == "phi-3-mini's own":
        return None
    # the collection's README: strip the indentation that was added for reading
    return (SHARED_DATA / "chat_templates" / name).read_text().replace("    ", "").replace("\n", "")


@pytest.fixture(scope="module")
def phi3():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(SHARED_DATA / "tokenizers" / "phi-3-mini"))


@pytest.fixture(scope="module")
def data_spec(tmp_path_factory):
    return make_spec([], tmp_path_factory.mktemp("spec")).data


def squash(text):
    return re.sub(r"\s+", "", text)


def encode(tok, template, spec_data, msgs):
    from fttool.data.tokenize import Encoder

    out = Encoder(tok, template, spec_data).encode_batch(["t"], [{"kind": "chat", "messages": msgs, "tools": None}])
    return out["input_ids"][0], out["labels"][0], out["eos_appended"][0]


@pytest.mark.parametrize("conv", list(CONVERSATIONS))
@pytest.mark.parametrize("template", template_files() + ["phi-3-mini's own"])
def test_only_replies_and_their_end_of_turn_are_trained(phi3, data_spec, template, conv):
    msgs = CONVERSATIONS[conv]
    ids, labels, _ = encode(phi3, load_template(template), data_spec, msgs)
    assert len(ids) == len(labels)
    replies = [m["content"] for m in msgs if m["role"] == "assistant"]
    runs = trained_runs(ids, labels)
    assert len(runs) == len(replies), [phi3.decode(r) for r in runs]
    special = set(phi3.all_special_ids) | {i for i, t in phi3.added_tokens_decoder.items() if t.special}
    for run, reply in zip(runs, replies):
        text = squash(phi3.decode(run))
        at = text.find(squash(reply))
        assert at == 0 or (at > 0 and template in GLUED), (text, reply)  # the whole reply, no role header before it
        assert END_MARKERS.match(text[at + len(squash(reply)) :]), text  # after it only end-of-turn tokens
        assert run[-1] in special, phi3.decode(run)  # the reply is closed by a special token, which is trained
    trained_text = squash(phi3.decode([i for i, lab in zip(ids, labels) if lab != -100]))
    for m in msgs:
        if m["role"] != "assistant":
            assert squash(m["content"]) not in trained_text
    assert "{{name}}" in phi3.decode(ids) or conv in ("single", "multi")  # data is never rendered as Jinja


def test_phi3_own_template_trains_end_not_endoftext(phi3, data_spec):
    """phi-3 closes replies with <|end|> and writes <|endoftext|> once at the very end: only <|end|> is trained."""
    ids, labels, eos = encode(phi3, None, data_spec, CONVERSATIONS["multi"])
    end, eot = phi3.convert_tokens_to_ids("<|end|>"), phi3.eos_token_id
    assert eos == 0
    assert [r[-1] for r in trained_runs(ids, labels)] == [end, end, end]
    assert ids[-1] == eot and labels[-1] == -100


def test_template_without_end_of_turn_gets_eos(phi3, data_spec):
    """chatqa closes replies with nothing: fttool appends EOS after each reply and trains it."""
    ids, labels, eos = encode(phi3, load_template("chatqa.jinja"), data_spec, CONVERSATIONS["multi"])
    assert eos == 3
    assert all(r[-1] == phi3.eos_token_id for r in trained_runs(ids, labels))


@pytest.mark.parametrize(
    "overrides,expected_runs",
    [
        (["data.train_turns=last"], ["two one"]),
        (["data.train_roles=[user,assistant]"], [u for t in TURNS for u in t]),
    ],
)
def test_turn_and_role_selection(phi3, tmp_path, overrides, expected_runs):
    spec = make_spec(overrides, tmp_path)
    ids, labels, _ = encode(phi3, None, spec.data, CONVERSATIONS["multi"])
    runs = [squash(phi3.decode(r)) for r in trained_runs(ids, labels)]
    assert len(runs) == len(expected_runs)
    for run, text in zip(runs, expected_runs):
        assert run.startswith(squash(text))


def test_train_on_inputs_trains_every_token(phi3, tmp_path):
    spec = make_spec(["data.train_on_inputs=true"], tmp_path)
    ids, labels, _ = encode(phi3, None, spec.data, CONVERSATIONS["multi+system"])
    assert labels == ids


def test_padding_is_never_trained(tmp_path):
    """Padded batches label every pad position -100."""
    from fttool import data
    from fttool.data import pack

    spec = make_spec(["data.max_samples=8"], tmp_path)
    tok = load_tokenizer(spec)
    ds = data.prepare_datasets(spec, tok, objectives.of(spec).features).train.select_columns(["input_ids", "labels"])
    batch = pack.collator("none", tok)([ds[i] for i in range(8)])
    pads = batch["attention_mask"] == 0
    assert pads.any() and (batch["labels"][pads] == -100).all()
