"""Data: formats, sources, templates, length policy, splits, mixtures, cache and bad input."""

import json
import re

import pytest

from conftest import SHARED_DATA, make_spec, run_cli, run_cli_here
from fttool.config import objectives
from fttool.data.tokenizer import load_tokenizer
from fttool.errors import UserError

needs_shared = pytest.mark.skipif(
    not (SHARED_DATA / "tokenizers" / "phi-3-mini").is_dir(),
    reason="../shared/data (real datasets and tokenizers) is not present",
)
PHI3 = SHARED_DATA / "tokenizers" / "phi-3-mini"
WORDS = "red fox blue sea pink cake gold ring wind hat".split()


def reversal_rows(n, start=0):
    """(prompt, reply) pairs of the demo task."""
    out = []
    for i in range(start, start + n):
        words = [WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(3 + i % 3)]
        out.append((f"Reverse the words: {' '.join(words)} #{i}", " ".join(reversed(words))))
    return out


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat_rows(n, start=0):
    return [
        {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]}
        for p, a in reversal_rows(n, start)
    ]


FORMAT_ROWS = {
    "chat": lambda n: chat_rows(n),
    "sharegpt": lambda n: [
        {"conversations": [{"from": "human", "value": p}, {"from": "gpt", "value": a}]} for p, a in reversal_rows(n)
    ],
    "alpaca": lambda n: [{"instruction": "Reverse the words.", "input": p, "output": a} for p, a in reversal_rows(n)],
    "completion": lambda n: [{"text": f"{p} => {a}"} for p, a in reversal_rows(n)],
    "segments": lambda n: [
        {"segments": [{"text": p + " => ", "train": False}, {"text": a, "train": True}]} for p, a in reversal_rows(n)
    ],
    "preference": lambda n: [{"prompt": p, "chosen": a, "rejected": p} for p, a in reversal_rows(n)],
}


def build(overrides, tmp_path, use_cache=True):
    from fttool import data

    spec = make_spec(overrides, tmp_path)
    return data.prepare_datasets(spec, load_tokenizer(spec), objectives.of(spec).features, use_cache=use_cache), spec


def trained_text(tok, row):
    return tok.decode([i for i, lab in zip(row["input_ids"], row["labels"]) if lab != -100])


# -- formats ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", list(FORMAT_ROWS))
def test_every_format_tokenizes_with_replies_trained(fmt, tmp_path):

    path = write_jsonl(tmp_path / "d.jsonl", FORMAT_ROWS[fmt](20))
    prepared, spec = build(["data=chat", f"data.format={fmt}", f"data.path={path}"], tmp_path)
    tok = load_tokenizer(spec)
    assert prepared.stats.samples == 20
    reply = reversal_rows(1)[0][1]
    text = trained_text(tok, prepared.train[0])
    assert reply.replace(" ", "") in text.replace(" ", "")
    if fmt == "completion":  # continued pre-training: every token is trained
        assert prepared.train[0]["labels"] == prepared.train[0]["input_ids"]
    else:
        assert "Reverse" not in text  # the prompt is never trained


def test_column_mapping_for_non_standard_names(tmp_path):
    rows = [{"prompt_text": p, "answer": a} for p, a in reversal_rows(5)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    prepared, _ = build(
        ["data=alpaca", f"data.path={path}", "data.columns={instruction: prompt_text, output: answer}"], tmp_path
    )
    assert prepared.stats.samples == 5


def test_wrong_format_is_named(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", FORMAT_ROWS["sharegpt"](2))
    with pytest.raises(
        UserError, match=r":1: row has no 'instruction' field.*These rows look like data.format=sharegpt"
    ):
        build(["data=alpaca", f"data.path={path}"], tmp_path)


def test_unknown_column_mapping_is_a_config_error(tmp_path):
    r = run_cli_here("check", "data=alpaca", "data.path=x.json", "data.columns={instrction: q}", cwd=tmp_path)
    assert r.returncode == 2 and "data.columns.instrction" in r.stderr and "Did you mean 'instruction'" in r.stderr


@needs_shared
def test_sharegpt_multi_turn_real_data(tmp_path):

    path = SHARED_DATA / "sharegpt" / "fastchat_dummy_conversation.json"
    prepared, spec = build(
        [
            f"model.name_or_path={PHI3}",
            "data=chat",
            "data.format=sharegpt",
            f"data.path={path}",
            "data.max_length=4096",
        ],
        tmp_path,
    )
    rows = json.loads(path.read_text())
    assert prepared.stats.samples == len(rows) == 500
    tok = load_tokenizer(spec)
    end = tok.convert_tokens_to_ids("<|end|>")
    for i in (0, 7, 123):  # every gpt turn is trained, each closed by <|end|>
        row = prepared.train[i]
        gpt_turns = sum(1 for m in rows[i]["conversations"] if m["from"] == "gpt")
        closed = sum(1 for t, lab in zip(row["input_ids"], row["labels"]) if lab == end)
        assert closed == gpt_turns


@needs_shared
def test_tool_calls_real_data(tmp_path):
    """glaive: function_call turns are trained as assistant output, observations are not; tools reach the prompt."""

    path = SHARED_DATA / "sharegpt" / "llamafactory_glaive_toolcall_en_demo.json"
    prepared, spec = build(
        [
            f"model.name_or_path={PHI3}",
            "data=chat",
            "data.format=sharegpt",
            f"data.path={path}",
            "data.max_length=4096",
            "data.template=chatml",
            "data.allow_template_change=true",
        ],
        tmp_path,
    )
    st = prepared.stats  # one conversation of 11.6k tokens keeps no reply within 4096 tokens: dropped, and counted
    assert (st.samples, st.truncated, st.dropped_no_trained_tokens) == (299, 1, 1) and st.tools_in_system > 0
    tok = load_tokenizer(spec)
    rows = json.loads(path.read_text())
    i = next(k for k, r in enumerate(rows) if any(m["from"] == "function_call" for m in r["conversations"]))
    text = trained_text(tok, prepared.train[i]).replace(" ", "")
    call = next(m["value"] for m in rows[i]["conversations"] if m["from"] == "function_call")
    observation = next(m["value"] for m in rows[i]["conversations"] if m["from"] == "observation")
    assert call.replace(" ", "")[:40] in text and observation.replace(" ", "")[:40] not in text
    assert "search_recipes" in tok.decode(prepared.train[0]["input_ids"])  # the tool schema is in the prompt


@needs_shared
def test_template_that_drops_a_role_is_refused(tmp_path):
    """phi-3's own template renders only system/user/assistant: tool observations would silently vanish."""
    path = SHARED_DATA / "sharegpt" / "llamafactory_glaive_toolcall_en_demo.json"
    with pytest.raises(UserError, match=r"record #\d+: the chat template leaves out message #\d+ \(role tool\)"):
        build([f"model.name_or_path={PHI3}", "data=chat", "data.format=sharegpt", f"data.path={path}"], tmp_path)


@needs_shared
def test_preference_pairs_real_data(tmp_path):

    path = SHARED_DATA / "preference" / "llamafactory_dpo_en_demo.json"
    prepared, spec = build(
        [
            f"model.name_or_path={PHI3}",
            "data=chat",
            "data.format=preference",
            f"data.path={path}",
            "data.columns={prompt: conversations, role: from, content: value}",
            "data.max_length=8192",
        ],
        tmp_path,
    )
    assert prepared.stats.samples == 300
    rows = json.loads(path.read_text())
    tok = load_tokenizer(spec)
    text = trained_text(tok, prepared.train[0]).replace(" ", "")
    assert rows[0]["chosen"]["value"].replace(" ", "").replace("\n", "")[:40] in text.replace("\n", "")
    assert rows[0]["rejected"]["value"].replace(" ", "")[:40] not in text


@needs_shared
def test_literal_braces_stay_literal(tmp_path):

    path = SHARED_DATA / "alpaca" / "llamafactory_identity.json"
    prepared, spec = build([f"model.name_or_path={PHI3}", "data=alpaca", f"data.path={path}"], tmp_path)
    tok = load_tokenizer(spec)
    assert prepared.stats.samples == 91
    assert "{{name}}" in tok.decode(prepared.train[0]["input_ids"])


# -- templates --------------------------------------------------------------------------------------------
@needs_shared
def test_changing_the_tokenizers_template_needs_consent(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", chat_rows(3))
    base = [f"model.name_or_path={PHI3}", "data=chat", f"data.path={path}", "data.template=chatml"]
    with pytest.raises(UserError) as e:
        build(base, tmp_path)
    assert "tokenizer's own: '<|system|>" in str(e.value) and "data.template:   '<|im_start|>system" in str(e.value)
    assert "data.allow_template_change=true" in str(e.value)
    prepared, _ = build(base + ["data.allow_template_change=true"], tmp_path)
    assert prepared.stats.samples == 3


@needs_shared
def test_tokenizer_without_template_needs_one(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", chat_rows(3))
    phi2 = SHARED_DATA / "tokenizers" / "phi-2"
    with pytest.raises(UserError, match="has no chat template.*data.template to one of chatml"):
        build([f"model.name_or_path={phi2}", "data=chat", f"data.path={path}"], tmp_path)
    prepared, _ = build(
        [f"model.name_or_path={phi2}", "data=chat", f"data.path={path}", "data.template=llama-3"], tmp_path
    )
    # phi-2 does not know <|eot_id|> as a token, so it is text there and EOS closes every reply
    assert prepared.stats.samples == 3 and prepared.stats.eos_appended == 3


@pytest.mark.parametrize("name", ["chatml", "llama-3", "mistral", "alpaca", "phi-3", "gemma", "zephyr"])
def test_named_templates_close_every_reply(name, tmp_path):
    """Each shipped template renders system/user/assistant/tool and ends every reply with a token that is trained."""
    from fttool.data.templates import NAMED
    from fttool.data.tokenize import Encoder

    spec = make_spec([f"data.template={name}", "data.allow_template_change=true"], tmp_path)
    tok = load_tokenizer(spec)
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Reverse: a b"},
        {"role": "assistant", "content": "b a"},
        {"role": "tool", "content": "ok"},
        {"role": "user", "content": "Reverse: c d"},
        {"role": "assistant", "content": "d c"},
    ]
    out = Encoder(tok, NAMED[name], spec.data).encode_batch(["t"], [{"kind": "chat", "messages": msgs, "tools": None}])
    ids, labels = out["input_ids"][0], out["labels"][0]
    text = tok.decode([i for i, lab in zip(ids, labels) if lab != -100])
    assert text.replace(" ", "").startswith("ba") and "Reverse" not in text and "ok" not in text
    assert (
        labels[max(i for i, lab in enumerate(labels) if lab != -100)] in tok.all_special_ids
    )  # a closing token, trained


def test_unknown_template_name(tmp_path):
    r = run_cli_here("check", "data.template=chatlm", cwd=tmp_path)
    assert r.returncode == 2 and "Did you mean chatml?" in r.stderr and "Named templates:" in r.stderr


# -- sources ----------------------------------------------------------------------------------------------
def test_parquet_csv_folder_and_glob_read_the_same_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"instruction": "Reverse the words.", "input": p, "output": a} for p, a in reversal_rows(12)]
    folder = tmp_path / "parts"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", rows[:4])
    pq.write_table(pa.Table.from_pylist(rows[4:8]), folder / "b.parquet")
    import csv

    with open(folder / "c.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        w.writeheader()
        w.writerows(rows[8:])
    for path in (folder, folder / "*.*"):
        prepared, _ = build(["data=alpaca", f"data.path={path}"], tmp_path)
        assert prepared.stats.samples == 12 and prepared.stats.rows == 12


def test_csv_keeps_numbers_as_text(tmp_path):
    (tmp_path / "d.csv").write_text("instruction,input,output\nWhat is 6*7?,,042\n")

    prepared, spec = build(["data=alpaca", f"data.path={tmp_path / 'd.csv'}"], tmp_path)
    assert "042" in trained_text(load_tokenizer(spec), prepared.train[0])


def test_mixture_with_weights(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", chat_rows(10))
    b = write_jsonl(tmp_path / "b.jsonl", chat_rows(20, start=100))
    mix = f"data.mix=[{{path: {a}, weight: 2.0}}, {{path: {b}, weight: 0.5}}]"
    prepared, _ = build(["data=chat", "data.path=null", mix], tmp_path)
    assert prepared.stats.per_source == {str(a): 20, str(b): 10}
    assert prepared.stats.samples == 30


def test_mixture_of_formats(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", chat_rows(4))
    b = write_jsonl(tmp_path / "b.jsonl", FORMAT_ROWS["alpaca"](6))
    mix = f"data.mix=[{{path: {a}}}, {{path: {b}, format: alpaca}}]"
    prepared, _ = build(["data=chat", "data.path=null", mix], tmp_path)
    assert prepared.stats.samples == 10


# -- length, splits, dedup --------------------------------------------------------------------------------
def long_message_data(tmp_path, n, index):
    """n chat rows whose first row has a message (index 0 = prompt, 1 = reply) far over 40 tokens."""
    rows = chat_rows(n)
    rows[0]["messages"][index]["content"] = " ".join(WORDS * 20)
    return ["data=chat", f"data.path={write_jsonl(tmp_path / 'd.jsonl', rows)}", "data.max_length=40"]


def test_length_policy_is_counted(tmp_path):
    args = long_message_data(tmp_path, 10, index=1)
    prepared, _ = build(args, tmp_path)
    assert prepared.stats.truncated == 1 and prepared.stats.samples == 10
    assert max(prepared.train["length"]) == 40
    prepared, _ = build(args + ["data.truncation=drop"], tmp_path)
    assert prepared.stats.dropped_too_long == 1 and prepared.stats.samples == 9


def test_sample_whose_reply_is_truncated_away_is_dropped_and_counted(tmp_path):
    prepared, _ = build(long_message_data(tmp_path, 4, index=0), tmp_path)  # the prompt alone fills max_length
    assert prepared.stats.dropped_no_trained_tokens == 1 and prepared.stats.samples == 3
    assert all(any(lab != -100 for lab in row) for row in prepared.train["labels"])


def test_seeded_splits_by_ratio(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", chat_rows(100))
    args = ["data=chat", f"data.path={path}", "data.val_ratio=0.1", "data.test_ratio=0.2", "data.test_path=null"]
    from fttool.data import test_rows

    p1, s1 = build(args, tmp_path)
    p2, s2 = build(args, tmp_path, use_cache=False)
    p3, s3 = build(args + ["seed=7"], tmp_path)
    (t1, _), (t2, _), (t3, _) = test_rows(s1), test_rows(s2), test_rows(s3)  # the split `fttool eval` scores
    assert (p1.stats.samples, len(p1.validation), len(t1)) == (70, 10, 20)
    assert [loc for loc, _ in t1] == [loc for loc, _ in t2]
    assert [loc for loc, _ in t1] != [loc for loc, _ in t3]
    assert not set(p1.train["loc"]) & {loc for loc, _ in t1}


def test_split_by_file(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", chat_rows(8))
    val = write_jsonl(tmp_path / "val.jsonl", chat_rows(3, start=50))
    test = write_jsonl(tmp_path / "test.jsonl", chat_rows(4, start=80))
    from fttool.data import eval_example, test_rows

    prepared, spec = build(
        ["data=chat", f"data.path={train}", f"data.val_path={val}", f"data.test_path={test}"], tmp_path
    )
    rows, _ = test_rows(spec)
    assert (prepared.stats.samples, len(prepared.validation), len(rows)) == (8, 3, 4)
    assert eval_example(*rows[0])["reference"] == reversal_rows(1, start=80)[0][1]


def test_exact_duplicates_removed_and_counted(tmp_path):
    rows = chat_rows(5)
    path = write_jsonl(tmp_path / "d.jsonl", rows + rows[:3])
    prepared, _ = build(["data=chat", f"data.path={path}", "data.dedup=true"], tmp_path)
    assert prepared.stats.duplicates_removed == 3 and prepared.stats.samples == 5


# -- cache ------------------------------------------------------------------------------------------------
def test_cache_is_reused_and_invalidated(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", chat_rows(30))
    args = ["data=chat", f"data.path={path}", f"data.cache_dir={tmp_path / 'cache'}"]
    first, _ = build(args, tmp_path)
    again, _ = build(args, tmp_path)
    assert not first.from_cache and again.from_cache and again.cache_dir == first.cache_dir
    assert again.train["input_ids"] == first.train["input_ids"]
    same, _ = build(args + ["data.packing=padding_free", "data.num_proc=1"], tmp_path)  # batching only: same key
    assert same.from_cache and same.cache_dir == first.cache_dir
    folders = {first.cache_dir}
    for change in (
        ["data.max_length=64"],
        ["data.train_on_inputs=true"],
        ["data.template=chatml"],
        ["seed=1", "data.val_ratio=0.1"],
    ):
        changed, _ = build(args + change, tmp_path)
        assert not changed.from_cache and changed.cache_dir not in folders, change
        folders.add(changed.cache_dir)
    with open(path, "a") as f:  # the source's content changes
        f.write(json.dumps(chat_rows(1, start=500)[0]) + "\n")
    changed, _ = build(args, tmp_path)
    assert not changed.from_cache and changed.stats.samples == 31


@needs_shared
def test_cache_key_covers_the_tokenizer(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", chat_rows(5))
    args = [
        "data=chat",
        f"data.path={path}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.template=chatml",
        "data.allow_template_change=true",
    ]
    tiny, _ = build(args, tmp_path)
    phi3, _ = build(args + [f"model.name_or_path={PHI3}"], tmp_path)
    assert phi3.cache_dir != tiny.cache_dir and not phi3.from_cache


def test_parallel_tokenization_gives_the_same_tokens(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", chat_rows(64))
    one, _ = build(["data=chat", f"data.path={path}", "data.num_proc=1"], tmp_path, use_cache=False)
    two, _ = build(["data=chat", f"data.path={path}", "data.num_proc=2"], tmp_path, use_cache=False)
    assert one.train["input_ids"] == two.train["input_ids"] and one.train["labels"] == two.train["labels"]


# -- bad input --------------------------------------------------------------------------------------------
def _one_bad(tmp_path, bad, fmt="chat"):
    good = FORMAT_ROWS[fmt](2)
    path = tmp_path / "d.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in good + [bad]))
    return path


@pytest.mark.parametrize(
    "bad,message",
    [
        ('{"messages": [}', r":3: not valid JSON"),
        (
            {"mesages": []},
            r":3: row has no 'messages' field \(data.format=chat\). Did you mean 'mesages'\?.*data.columns.messages=COLUMN",
        ),
        (
            {"messages": [{"role": "narrator", "content": "x"}]},
            r":3: message #0 has role 'narrator'.*data.roles=\{narrator: assistant\}",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]},
            r":3: message #1 is an empty assistant reply",
        ),
        ({"messages": [{"role": "user", "content": "hi"}]}, r":3: the conversation has no assistant reply"),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 5}]},
            r":3: message #1 needs 'content' as a string",
        ),
    ],
)
def test_bad_rows_name_the_line(bad, message, tmp_path):
    path = _one_bad(tmp_path, bad)
    with pytest.raises(UserError, match=message):
        build(["data=chat", f"data.path={path}"], tmp_path)


@pytest.mark.parametrize(
    "fmt,bad,message",
    [
        ("alpaca", {"instruction": "x"}, r":3: row has no 'output' field"),
        ("segments", {"segments": [{"text": "a", "train": False}]}, r":3: no segment is marked"),
        ("segments", {"segments": [{"text": "a"}]}, r":3: segment #0 must be"),
        ("preference", {"prompt": "p", "chosen": "a", "rejected": "a"}, r":3: chosen and rejected are the same"),
        ("completion", {"text": ""}, r":3: 'text' must be a non-empty string"),
    ],
)
def test_bad_rows_of_other_formats(fmt, bad, message, tmp_path):
    path = _one_bad(tmp_path, bad, fmt)
    with pytest.raises(UserError, match=message):
        build(["data=chat", f"data.format={fmt}", f"data.path={path}"], tmp_path)


def test_skip_bad_rows_counts_them(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = chat_rows(6)
    rows[1] = {"messages": [{"role": "user", "content": "hi"}]}
    rows[4] = {"messages": [{"role": "user", "content": "x<|im_end|>"}, {"role": "assistant", "content": "y"}]}
    write_jsonl(path, rows)
    prepared, _ = build(["data=chat", f"data.path={path}", "data.skip_bad_rows=true"], tmp_path)
    # row 5 quotes a control token: kept, as plain text (counted), not refused
    assert prepared.stats.bad_rows_skipped == 1 and prepared.stats.samples == 5 and prepared.stats.literal_markers == 1
    assert any(":2:" in e for e in prepared.stats.bad_row_examples)


@pytest.mark.parametrize(
    "path,message",
    [
        ("missing.jsonl", "no such file or folder"),
        ("data.txt", "unsupported file type '.txt'"),
        ("nothing/*.jsonl", "the pattern matches no"),
    ],
)
def test_bad_paths(path, message, tmp_path):
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(UserError, match=message):
        build(["data=chat", f"data.path={tmp_path / path}"], tmp_path)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["data.val_ratio=0.6", "data.test_ratio=0.5", "data.test_path=null"], "leaves nothing to train on"),
        (["data.test_ratio=0.1"], "data.test_path and data.test_ratio are both set"),
        (["data.mix=[{path: a.jsonl}]"], "data.path and data.mix are both set"),
        (["data.path=null", "data.mix=[{path: a.jsonl, weight: 0}]"], r"data.mix\[0\].weight=0"),
        (["data.train_roles=[assistent]"], "data.train_roles"),
        (["data.roles={bot: assistent}"], "data.roles.bot=assistent"),
        (["data.packing=bin"], "Did you mean bins"),
        (["data.format=sharegtp"], "Did you mean sharegpt"),
    ],
)
def test_bad_data_config(overrides, message, tmp_path):
    r = run_cli_here("check", *overrides, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert re.search(message, r.stderr), r.stderr


# -- verbs ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_preview_marks_trained_tokens_and_prints_stats(tmp_path):
    r = run_cli("preview", "data.max_samples=50", "--samples", "2", f"data.cache_dir={tmp_path / 'c'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("── sample") == 2 and "[[" in r.stdout and "\033[" not in r.stdout  # piped: brackets
    for stat in ("samples       50", "trained", "truncated 0", "padding_free 100%", "bins of 128", "lengths"):
        assert stat in r.stdout
    assert not (tmp_path / "runs").exists()  # preview writes no run folder


@pytest.mark.slow
def test_preprocess_then_train_uses_the_cache(tmp_path):
    args = ["data.max_samples=64", f"data.cache_dir={tmp_path / 'c'}"]
    r = run_cli("preprocess", *args, cwd=tmp_path)
    assert r.returncode == 0 and "tokenized in" in r.stdout, r.stderr
    r = run_cli("preprocess", *args, cwd=tmp_path)
    assert "loaded from the cache" in r.stdout
    r = run_cli(
        *args,
        "train.max_steps=2",
        "eval.after_training=false",
        "run_name=t",
        f"output_dir={tmp_path / 'runs'}",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert "data: loaded from cache" in (tmp_path / "runs" / "t" / "train.log").read_text()


def test_samples_flag_belongs_to_preview(tmp_path):
    r = run_cli_here("check", "--samples", "2", cwd=tmp_path)
    assert r.returncode == 2 and "--samples and output= belong to the preview verb" in r.stderr


def test_length_histogram_covers_every_sample():
    from fttool.data.stats import histogram

    hist = histogram([3, 5, 5, 9, 40, 100], max_length=64)
    assert hist[0][0] == 3 and hist[-1][1] == 64 and sum(c for *_, c in hist) == 6
    assert all(lo <= hi for lo, hi, _ in hist) and len(hist) <= 8
    assert histogram([], 64) == []
