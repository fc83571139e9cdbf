"""Data formats and bad rows: each format encodes with loss on the answer only; ShareGPT and JSON-string
messages read like `messages`; every kind of bad row is dropped with a warning naming its rows, or stops
the search when more than half are bad; a chat template that refuses a row says which row and why."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import tiny_recipe_dict

import llmtune
from llmtune.api import load
from llmtune.errors import DataError, RecipeError
from llmtune.harness import data as D
from llmtune.harness import formats as F
from llmtune.harness import model as M
from llmtune.harness.data_sources import load_splits
from llmtune.harness.train import run_trial

# The tiny model's template with the role check taken out: it renders a tool turn like any other.
TOOL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
ALTERNATING_TEMPLATE = (
    "{% for message in messages %}{% if loop.index0 > 0 and message['role'] == messages[loop.index0 - 1]['role'] %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% endfor %}" + TOOL_TEMPLATE
)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def recipe_dict(tmp_path: Path, rows: list[dict], fmt: str, **data) -> dict:
    source = write_jsonl(tmp_path / "data.jsonl", rows)
    return tiny_recipe_dict(tmp_path, data={"source": str(source), "format": fmt, **data})


def validate(recipe: dict) -> list[str]:
    warnings: list[str] = []
    llmtune.validate(recipe, warn=warnings.append)
    return warnings


def chat(i: int) -> list[dict]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Say {i}."},
            {"role": "assistant", "content": f"{i}"}, {"role": "user", "content": "Again."},
            {"role": "assistant", "content": f"{i} {i}"}]


def sharegpt(messages: list[dict]) -> list[dict]:
    names = {"user": "human", "assistant": "gpt", "system": "system", "tool": "observation"}
    return [{"from": names[m["role"]], "value": m["content"]} for m in messages]


def good_row(fmt: str, i: int) -> dict:
    if fmt == "text":
        return {"text": f"plain text number {i}"}
    if fmt == "instruction":
        return {"instruction": f"Repeat {i}", "input": "" if i % 2 else f"{i}", "output": f"{i}"}
    return {"messages": chat(i)}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    return M.load_tokenizer(load(tiny_recipe_dict(Path("/unused"))).model)


def data_cfg(tmp_path: Path, fmt: str, **data):
    return load(tiny_recipe_dict(tmp_path, data={"source": "x.jsonl", "format": fmt, **data})).data


def trained_text(tokenizer, example: D.Example) -> str:
    return tokenizer.decode([t for t in example.labels if t != D.IGNORE])


# ------------------------------------------------------------------------------------------ good rows


def test_text_rows_train_on_every_token(tokenizer, tmp_path):
    ex = D.encode({"text": "plain text"}, data_cfg(tmp_path, "text"), tokenizer, 4096)
    assert tokenizer.decode(ex.input_ids) == "<|bos|>plain text<|eos|>"
    assert ex.labels[0] == D.IGNORE and ex.labels[1:] == ex.input_ids[1:]


def test_instruction_rows_train_on_the_output_only(tokenizer, tmp_path):
    cfg = data_cfg(tmp_path, "instruction")
    for row, prompt in (({"instruction": "Add", "input": "2 3", "output": "5"}, D.INSTRUCTION_PROMPT),
                        ({"instruction": "Say five", "input": None, "output": "5"}, D.INSTRUCTION_PROMPT_NO_INPUT)):
        ex = D.encode(row, cfg, tokenizer, 4096)
        assert trained_text(tokenizer, ex) == "5<|eos|>"
        shown = prompt.format(instruction=row["instruction"], input=row["input"])
        assert tokenizer.decode(ex.input_ids) == f"<|bos|>{shown}5<|eos|>"


def test_chat_rows_train_on_assistant_turns_only(tokenizer, tmp_path):
    row = {"messages": chat(7)}
    ex = D.encode(row, data_cfg(tmp_path, "chat"), tokenizer, 4096)
    assert trained_text(tokenizer, ex) == "7<|eos|>7 7<|eos|>"  # never the system or user turns
    assert tokenizer.decode(ex.input_ids) == tokenizer.apply_chat_template(row["messages"], tokenize=False)


def test_tool_turns_carry_no_loss_when_the_template_takes_them(tokenizer, tmp_path):
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = TOOL_TEMPLATE
    messages = [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "w", "arguments": {}}}]},
                {"role": "tool", "content": "sunny", "tool_call_id": "1"}, {"role": "assistant", "content": "It is sunny."}]
    ex = D.encode({"messages": messages}, data_cfg(tmp_path, "chat"), tok, 4096)
    assert trained_text(tok, ex) == "<|eos|>It is sunny.<|eos|>"  # the (empty) call turn, then the answer
    assert "<|tool|>\nsunny\n" in tok.decode(ex.input_ids)
    # ShareGPT's tool names map to the same turn
    for name in ("tool", "function", "observation"):
        row = {"conversations": [{"from": "human", "value": "Hi"}, {"from": name, "value": "sunny"},
                                 {"from": "gpt", "value": "ok"}]}
        assert F.parse_messages(row, data_cfg(tmp_path, "chat"))[0][1] == {"role": "tool", "content": "sunny"}


def test_sharegpt_and_json_string_rows_encode_like_messages_rows(tokenizer, tmp_path):
    conversations = [chat(i) for i in range(30)]
    files = {"messages": [{"messages": m} for m in conversations],
             "sharegpt": [{"conversations": sharegpt(m)} for m in conversations],
             "json string": [{"messages": json.dumps(m)} for m in conversations]}
    encoded = {}
    for name, rows in files.items():
        (tmp_path / name).mkdir()
        cfg = load(recipe_dict(tmp_path / name, rows, "chat")).data
        splits = load_splits(cfg)
        assert not splits.warnings
        encoded[name] = [D.encode_all(part, cfg, tokenizer, 256) for part in (splits.train, splits.eval)]
    assert encoded["sharegpt"] == encoded["messages"] == encoded["json string"]
    assert encoded["messages"][0][0] and encoded["messages"][0][1] == 0


def test_sharegpt_data_validates_and_trains(tmp_path, tiny_model_path):
    rows = [{"conversations": sharegpt(chat(i))} for i in range(60)]
    rows[4] = {"conversations": [{"from": "human", "value": "no answer"}]}
    rows[9] = {"conversations": [{"from": "bing", "value": "hi"}]}
    recipe = recipe_dict(tmp_path, rows, "chat", eval_fraction=0.2)
    recipe["train"] = {"budget": {"examples": 16}, "eval_points": 1, "eval_batch_size": 16}
    warnings = validate(recipe)
    assert warnings == [
        "data.source: dropped 1 of 60 rows of data.jsonl with no assistant turn (row 5); add the answer as an assistant "
        "turn, or remove the row (data.train_on: all trains on the whole conversation)",
        "data.source: dropped 1 of 60 rows of data.jsonl with the unknown role 'bing' (row 10); use the roles system, "
        "user, assistant, tool (ShareGPT: human, user, gpt, assistant, system, tool, function, observation), or "
        "remove the row"]
    r = load(recipe)
    res = run_trial(r, r.space.complete({}), tmp_path / "trial", fractions=[1.0], save_adapter=False)
    assert res.status == "complete", res.reason
    assert res.info["eval_examples"] == 12  # 20% of the 58 good rows, the same the preflight counted


# ------------------------------------------------------------------------------------------- bad rows

BAD = [  # format, how a row goes bad, the reason a report gives
    ("text", lambda r: r.update(text=None), "no 'text'"),
    ("text", lambda r: r.update(text="  "), "an empty 'text'"),
    ("instruction", lambda r: r.pop("output"), "no 'output'"),
    ("instruction", lambda r: r.update(output=None), "no 'output'"),
    ("instruction", lambda r: r.update(output=""), "an empty 'output'"),
    ("instruction", lambda r: r.pop("instruction"), "no 'instruction'"),
    ("instruction", lambda r: r.update(output=["a", "b"]), "a list in 'output', not text"),
    ("chat", lambda r: r.pop("messages"), "no 'messages'"),
    ("chat", lambda r: r.update(messages="[{'role': 'user'"), "a 'messages' string that is not JSON"),
    ("chat", lambda r: r.update(messages={"role": "user", "content": "hi"}), "a 'messages' that is not a list"),
    ("chat", lambda r: r.update(messages=[]), "an empty 'messages' list"),
    ("chat", lambda r: r["messages"][1].pop("role"), "a message without a role"),
    ("chat", lambda r: r["messages"][1].pop("content"), "a message without content"),
    ("chat", lambda r: r["messages"][1].update(content=None), "a message without content"),
    ("chat", lambda r: r["messages"][1].update(role="bot"), "the unknown role 'bot'"),
    ("chat", lambda r: r.update(messages=r["messages"][:2]), "no assistant turn"),
]


def rows_with_bad(fmt: str, spoil, bad_numbers: set[int], n: int = 20) -> list[dict]:
    rows = [good_row(fmt, i) for i in range(n)]
    for number in bad_numbers:
        spoil(rows[number - 1])
    return rows


@pytest.mark.parametrize("fmt, spoil, reason", BAD, ids=[f"{f}: {r}" for f, _, r in BAD])
def test_bad_rows_are_dropped_with_a_warning_and_stop_the_search_when_too_many(tmp_path, tiny_model_path, fmt, spoil,
                                                                                reason):
    recipe = recipe_dict(tmp_path, rows_with_bad(fmt, spoil, {3, 7}), fmt)
    (warning,) = validate(recipe)
    assert warning.startswith(f"data.source: dropped 2 of 20 rows of data.jsonl with {reason} (rows 3, 7); ")
    splits = load_splits(load(recipe).data)  # what a trial reads: the same rows dropped
    assert sorted(r.number for r in splits.train + splits.eval) == [n for n in range(1, 21) if n not in (3, 7)]
    assert "None" not in json.dumps([D.segments(r, load(recipe).data, _FakeTokenizer()) for r in splits.train])

    half = set(range(1, 21, 2))  # exactly half bad: still dropped
    assert validate(recipe_dict(tmp_path, rows_with_bad(fmt, spoil, half), fmt))[0].startswith(
        f"data.source: dropped 10 of 20 rows of data.jsonl with {reason} (rows 1, 3, 5, 7, 9 and 5 more); ")
    too_many = recipe_dict(tmp_path, rows_with_bad(fmt, spoil, half | {20}), fmt)
    with pytest.raises(RecipeError) as e:
        validate(too_many)
    assert (f"11 of 20 rows of data.jsonl (data.source) are bad, more than half, so llmtune stops instead of "
            f"dropping them: 11 with {reason} (rows 1, 3, 5, 7, 9 and 6 more): ") in str(e.value)
    with pytest.raises(DataError, match="more than half"):
        load_splits(load(too_many).data)  # and the trial refuses the same data


class _FakeTokenizer:
    eos_token = "</s>"
    chat_template = "set"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        return "".join(f"[{m['role']}]{m['content']}" for m in messages) + ("[assistant]" if add_generation_prompt else "")


def test_every_row_bad_names_the_fix(tmp_path, tiny_model_path):
    rows = [{"instruction": f"q{i}", "answer": f"a{i}"} for i in range(10)]
    with pytest.raises(RecipeError) as e:
        validate(recipe_dict(tmp_path, rows, "instruction"))
    assert ("data.output_field: 10 of 10 rows of data.jsonl (data.source) are bad, more than half, so llmtune stops "
            "instead of dropping them: 10 with no 'output' (rows 1, 2, 3, 4, 5 and 5 more): give each such row its "
            "answer, or remove it; if the answer is in another field, set data.output_field (fields here: "
            "instruction, answer)") in str(e.value)


@pytest.mark.parametrize("field", ["messages", "conversations"])
def test_chat_rows_under_another_format_say_set_format_chat(tmp_path, tiny_model_path, field):
    rows = [{field: chat(i) if field == "messages" else sharegpt(chat(i))} for i in range(10)]
    with pytest.raises(RecipeError) as e:
        validate(recipe_dict(tmp_path, rows, "instruction"))
    assert (f"data.format: 10 of 10 rows of data.jsonl (data.source) are bad, more than half, so llmtune stops instead "
            f"of dropping them: 10 with no 'instruction' but a field '{field}' (rows 1, 2, 3, 4, 5 and 5 more): these "
            f"look like chat rows; set data.format: chat") in str(e.value)
    assert "instruction_field" not in str(e.value)
    assert validate(recipe_dict(tmp_path, rows, "chat")) == []


def test_bad_eval_rows_are_reported_for_the_eval_source(tmp_path, tiny_model_path):
    eval_file = write_jsonl(tmp_path / "eval.jsonl", rows_with_bad("instruction", lambda r: r.update(output=None), {2}, 8))
    recipe = recipe_dict(tmp_path, [good_row("instruction", i) for i in range(20)], "instruction",
                         eval_source=str(eval_file))
    assert [w.split(";")[0] for w in validate(recipe)] == [
        "data.eval_source: dropped 1 of 8 rows of eval.jsonl with no 'output' (row 2)"]
    assert len(load_splits(load(recipe).data).eval) == 7


def test_a_conversation_without_an_answer_is_kept_when_training_on_all(tmp_path, tiny_model_path):
    rows = rows_with_bad("chat", lambda r: r.update(messages=r["messages"][:2]), {3, 7})
    assert validate(recipe_dict(tmp_path, rows, "chat", train_on="all")) == []


def test_cli_prints_warnings_to_stderr(tmp_path, tiny_model_path, capfd):
    from llmtune.cli import main

    recipe = recipe_dict(tmp_path, rows_with_bad("instruction", lambda r: r.pop("output"), {3}), "instruction")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["validate", str(path)]) == 0
    out, err = capfd.readouterr()
    assert ": ok" in out and "warning:" not in out
    assert err.startswith("warning: data.source: dropped 1 of 20 rows of data.jsonl with no 'output' (row 3); ")


# ------------------------------------------------------------------------------------ chat templates


def test_a_tool_turn_the_template_refuses_is_a_clear_error(tmp_path, tiny_model_path, tokenizer):
    rows = [{"messages": chat(i)} for i in range(20)]
    rows[5]["messages"].insert(3, {"role": "tool", "content": "result"})
    rows[8] = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "observation", "value": "x"},
                                 {"from": "gpt", "value": "ok"}]}
    with pytest.raises(RecipeError) as e:
        validate(recipe_dict(tmp_path, rows, "chat"))
    refusal = ("has a 'tool' turn, and the chat template of {} does not accept the 'tool' role (it says: Unknown role: "
               "tool); remove the tool turns from the data, or use a model whose chat template takes tool messages")
    refusal = refusal.format(tokenizer.name_or_path)
    # One problem per thing the template says, with the first row that makes it say so.
    assert str(e.value) == ("1 problem:\n  - data.source: row 6 of data.jsonl (data.format: chat, messages from "
                            f"'messages') {refusal}")
    cfg = load(recipe_dict(tmp_path, rows, "chat")).data
    splits = load_splits(cfg)
    (sharegpt_row,) = [r for r in splits.train + splits.eval if r.number == 9]
    with pytest.raises(DataError) as raised:
        D.encode_all([sharegpt_row], cfg, tokenizer, 256)  # the trial's path
    assert str(raised.value) == f"row 9 of data.jsonl (data.format: chat, messages from 'conversations' (ShareGPT)) {refusal}"
    assert raised.value.__cause__ is None and raised.value.__suppress_context__  # no Jinja traceback


def test_a_template_that_takes_tool_turns_validates(tmp_path, tiny_model_path):
    model_dir = tmp_path / "tool-model"
    shutil.copytree(tiny_model_path, model_dir)
    tok = M.load_tokenizer(load(tiny_recipe_dict(tmp_path)).model)
    tok.chat_template = TOOL_TEMPLATE
    tok.save_pretrained(model_dir)
    rows = [{"messages": chat(i)[:3] + [{"role": "tool", "content": f"t{i}"}] + chat(i)[3:]} for i in range(20)]
    recipe = recipe_dict(tmp_path, rows, "chat")
    recipe["model"] = {"name": str(model_dir)}
    assert validate(recipe) == []
    r = load(recipe)
    ex = D.encode(load_splits(r.data).train[0], r.data, M.load_tokenizer(r.model), 4096)
    assert "<|tool|>" not in trained_text(tok, ex) and "<|tool|>" in tok.decode(ex.input_ids)


def test_any_template_error_names_the_row_the_format_and_what_it_said(tokenizer, tmp_path):
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = ALTERNATING_TEMPLATE
    row = F.Row({"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"},
                                   {"from": "gpt", "value": "c"}]})
    row.number, row.origin = 12, "train.jsonl"
    with pytest.raises(DataError) as e:
        D.encode(row, data_cfg(tmp_path, "chat"), tok, 4096)
    assert str(e.value) == (
        f"row 12 of train.jsonl (data.format: chat, messages from 'conversations' (ShareGPT)): the chat template of "
        f"{tok.name_or_path} refused it (it says: Conversation roles must alternate user/assistant/user/assistant/...); "
        "change the row to what the template accepts, remove it, or use a model whose template takes it")
    assert e.value.__suppress_context__


def test_parse_keeps_message_extras_but_not_nulls(tmp_path):
    cfg = data_cfg(tmp_path, "chat")
    row = {"messages": [{"role": "user", "content": "hi", "name": None},
                        {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]}
    assert F.parse_messages(row, cfg) == ([{"role": "user", "content": "hi"},
                                           {"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}], "'messages'")
    # 'conversations' is read in place of the default field only
    renamed = dataclasses.replace(cfg, messages_field="dialog")
    assert F.check({"dialog": None, "conversations": sharegpt(chat(1))}, renamed).reason == "no 'dialog'"
    assert F.check({"conversations": sharegpt(chat(1))}, cfg) is None
