"""tidpo.data: loading preference rows, tokenisation (ids, weights, truncation) and collation.

Expected token ids come from the real GPT-2 tokenizer called directly here ("Hello world" -> [15496, 995],
EOS = pad = 50256), never from the code under test.
"""

from __future__ import annotations

import copy
import json
import math
import sys

import pytest
import torch

from tidpo.apps.assets import gpt2_tokenizer
from tidpo.data import PreferenceCollator, PreferenceDataset, load_preference_rows, tokenize_preference_rows
from tidpo.data.loading import ROW_ORIGIN

EOS = PAD = 50256
HELLO_WORLD = [15496, 995]
IGNORE = -100

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def tok():
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def chat_tok(tok):
    chat = copy.deepcopy(tok)
    chat.chat_template = CHAT_TEMPLATE
    return chat


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def pair(prompt="Hello world", chosen=" yes", rejected=" no way", **extra) -> dict:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **extra}


ROWS = [pair(), pair("The sky is", " blue", " green and wide", extra=1)]


# ----------------------------------------------------------------------------------------------------
# load_preference_rows: sources
# ----------------------------------------------------------------------------------------------------


def test_load_list_and_tuple_copy_rows():
    rows = load_preference_rows(ROWS)
    assert rows == ROWS and all(a is not b for a, b in zip(rows, ROWS, strict=True))
    rows[0]["chosen_weights"] = [1.0]
    assert "chosen_weights" not in ROWS[0]
    assert load_preference_rows(tuple(ROWS)) == ROWS


def test_load_datasets_dataset_and_dataset_dict_error():
    datasets = pytest.importorskip("datasets")
    rows = [pair(), pair("The sky is", " blue", " green")]
    dataset = datasets.Dataset.from_list(rows)
    assert load_preference_rows(dataset) == rows
    with pytest.raises(ValueError, match=r"source is a DatasetDict with splits \['train'\].*source\['train'\]"):
        load_preference_rows(datasets.DatasetDict(train=dataset))


def without_origin(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != ROW_ORIGIN} for row in rows]


def test_rows_from_files_name_their_file_and_line(tmp_path, tok):
    """Errors point at the file line of the row, whatever blank lines, folders or splits came before."""
    (tmp_path / "gaps.jsonl").write_text("\n" + json.dumps(pair()) + "\n\n" + json.dumps(pair(chosen=" ")) + "\n")
    rows = load_preference_rows(tmp_path / "gaps.jsonl")
    path = tmp_path / "gaps.jsonl"
    assert [row[ROW_ORIGIN] for row in rows] == [f"{path} line 2", f"{path} line 4"]
    with pytest.raises(ValueError, match=r"gaps.jsonl line 4: 'chosen' is empty"):
        tokenize_preference_rows(rows[::-1], tok, progress=False)  # reordered: the label follows the row
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.jsonl").write_text("\n".join(json.dumps(pair()) for _ in range(3)) + "\n")
    (folder / "b.jsonl").write_text(json.dumps(pair()) + "\n" + json.dumps({"prompt": "p", "chosen": "c"}) + "\n")
    with pytest.raises(ValueError, match=r"b.jsonl line 2 has no 'rejected' column \(found \['chosen', 'prompt'\]\)"):
        load_preference_rows(folder)
    (folder / "b.jsonl").write_text(json.dumps(pair()) + "\n" + json.dumps(pair(chosen_weights=[1.0])) + "\n")
    with pytest.raises(ValueError, match=r"b.jsonl line 2 has 'chosen_weights' but no 'rejected_weights'"):
        tokenize_preference_rows(load_preference_rows(folder), tok, progress=False)
    (tmp_path / "array.json").write_text(json.dumps([pair(), {"prompt": "p"}]))
    with pytest.raises(ValueError, match=r"array.json item 1 \(0-based\) has no 'chosen'"):
        load_preference_rows(tmp_path / "array.json")


def test_load_json_array_json_lines_jsonl_and_parquet(tmp_path):
    (tmp_path / "array.json").write_text(json.dumps(ROWS))
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(row) for row in ROWS) + "\n")
    (tmp_path / "single.json").write_text(json.dumps(ROWS[0], indent=2))
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(row) for row in ROWS) + "\n\n")
    for name in ("array.json", "lines.json", "rows.jsonl"):
        assert without_origin(load_preference_rows(tmp_path / name)) == ROWS, name
        assert without_origin(load_preference_rows(str(tmp_path / name))) == ROWS, name
    assert without_origin(load_preference_rows(tmp_path / "single.json")) == ROWS[:1]

    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    rows = [pair(), pair("The sky is", " blue", " green")]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    assert without_origin(load_preference_rows(tmp_path / "rows.parquet")) == rows


def test_load_parquet_without_pyarrow_names_the_extra(tmp_path, monkeypatch):
    path = tmp_path / "rows.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match=r'pip install "tidpo\[data\]"'):
        load_preference_rows(path)


def test_load_folder_of_files_sorted_by_name(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    first, second, third = pair(chosen=" a"), pair(chosen=" b"), pair(chosen=" c")
    (tmp_path / "b.jsonl").write_text(json.dumps(second) + "\n")
    (tmp_path / "a.json").write_text(json.dumps([first]))
    pq.write_table(pa.Table.from_pylist([third]), tmp_path / "c.parquet")
    (tmp_path / "notes.txt").write_text("not data")
    assert without_origin(load_preference_rows(tmp_path)) == [first, second, third]


def test_load_save_to_disk_folders(tmp_path):
    datasets = pytest.importorskip("datasets")
    dataset = datasets.Dataset.from_list([pair(), pair(chosen=" sure")])
    dataset.save_to_disk(str(tmp_path / "saved"))
    assert load_preference_rows(tmp_path / "saved") == [pair(), pair(chosen=" sure")]
    datasets.DatasetDict(train=dataset).save_to_disk(str(tmp_path / "saved_dict"))
    with pytest.raises(ValueError, match=r"DatasetDict with splits \['train'\]"):
        load_preference_rows(tmp_path / "saved_dict")


def test_load_source_errors(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_preference_rows(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no .json/.jsonl/.parquet files"):
        load_preference_rows(tmp_path / "empty")
    (tmp_path / "rows.csv").write_text("prompt,chosen,rejected\n")
    with pytest.raises(ValueError, match="unsupported suffix"):
        load_preference_rows(tmp_path / "rows.csv")
    (tmp_path / "bad.jsonl").write_text(json.dumps(pair()) + "\n{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl line 2 is not valid JSON"):
        load_preference_rows(tmp_path / "bad.jsonl")
    (tmp_path / "scalars.json").write_text("[1, 2]")
    with pytest.raises(TypeError, match=r"source .*scalars.json item 0 \(0-based\) must be a dict, got int"):
        load_preference_rows(tmp_path / "scalars.json")
    (tmp_path / "nothing.jsonl").write_text("")
    with pytest.raises(ValueError, match="source has no rows"):
        load_preference_rows(tmp_path / "nothing.jsonl")
    with pytest.raises(TypeError, match="source must be a datasets.Dataset, a list of dicts, or a path"):
        load_preference_rows(42)


def test_load_missing_column_names_row_and_column():
    with pytest.raises(ValueError, match=r"row 1 \(0-based\) of .* has no 'chosen' column .*explicit-prompt"):
        load_preference_rows([pair(), {"prompt": "p", "rejected": "r"}])


# ----------------------------------------------------------------------------------------------------
# load_preference_rows: weights
# ----------------------------------------------------------------------------------------------------


WEIGHT_ROWS = [{"chosen_weights": [0.5], "rejected_weights": [1.0, 2.0]},
               {"chosen_weights": [3.0], "rejected_weights": [1.5, 1.5, 1.5]}]


def test_weights_merge_from_list_and_jsonl(tmp_path):
    for weights in (WEIGHT_ROWS, tmp_path / "w.jsonl"):
        (tmp_path / "w.jsonl").write_text("\n".join(json.dumps(w) for w in WEIGHT_ROWS))
        rows = load_preference_rows(ROWS, weights=weights)
        assert [row["chosen_weights"] for row in rows] == [[0.5], [3.0]]
        assert [row["rejected_weights"] for row in rows] == [[1.0, 2.0], [1.5, 1.5, 1.5]]
        assert rows[1]["extra"] == 1 and "chosen_weights" not in ROWS[0]


def test_weights_with_matching_prompts_are_accepted():
    weights = [dict(w, prompt=row["prompt"]) for w, row in zip(WEIGHT_ROWS, ROWS, strict=True)]
    rows = load_preference_rows(ROWS, weights=weights)
    assert "prompt" in rows[0] and rows[0]["prompt"] == "Hello world" and rows[0]["chosen_weights"] == [0.5]


def test_weights_mismatches():
    with pytest.raises(ValueError, match="weights has 1 rows but source has 2 rows"):
        load_preference_rows(ROWS, weights=WEIGHT_ROWS[:1])
    wrong_prompt = [dict(WEIGHT_ROWS[0], prompt="Hello world"), dict(WEIGHT_ROWS[1], prompt="other data")]
    with pytest.raises(ValueError, match=r"weights row 1 \(0-based\) of the given list has prompt 'other data' but "
                                         r"data row 1 \(0-based\) has"):
        load_preference_rows(ROWS, weights=wrong_prompt)
    with pytest.raises(ValueError, match=r"weights row 0 \(0-based\) of the given list has no 'rejected_weights'"):
        load_preference_rows(ROWS, weights=[{"chosen_weights": [1.0]}, WEIGHT_ROWS[1]])
    with pytest.raises(ValueError, match=r"row 0 \(0-based\) already has a 'chosen_weights' column"):
        load_preference_rows([pair(chosen_weights=[1.0]), ROWS[1]], weights=WEIGHT_ROWS)


# ----------------------------------------------------------------------------------------------------
# tokenize_preference_rows: plain text
# ----------------------------------------------------------------------------------------------------


def test_plain_text_token_layout(tok):
    dataset = tokenize_preference_rows(ROWS, tok, progress=False)
    assert isinstance(dataset, PreferenceDataset) and len(dataset) == 2
    assert dataset.column_names == ["row", "prompt_input_ids", "chosen_input_ids", "rejected_input_ids"]
    first = dataset[0]
    assert first == {"row": 0, "prompt_input_ids": HELLO_WORLD, "chosen_input_ids": ids(tok, " yes") + [EOS],
                     "rejected_input_ids": ids(tok, " no way") + [EOS]}
    second = dataset[1]
    assert second["row"] == 1
    assert second["prompt_input_ids"] == ids(tok, "The sky is")
    assert second["chosen_input_ids"] == ids(tok, " blue") + [EOS]
    assert second["rejected_input_ids"] == ids(tok, " green and wide") + [EOS]


def test_plain_text_weights_are_aligned_with_eos_weight_zero(tok):
    n_chosen, n_rejected = len(ids(tok, " yes")), len(ids(tok, " no way"))
    row = pair(chosen_weights=[1.25] * n_chosen, rejected_weights=[0.5 + i for i in range(n_rejected)])
    item = tokenize_preference_rows([row], tok, progress=False)[0]
    assert item["chosen_weights"] == [1.25] * n_chosen + [0.0]
    assert item["rejected_weights"] == [0.5 + i for i in range(n_rejected)] + [0.0]
    assert len(item["chosen_weights"]) == len(item["chosen_input_ids"])
    assert len(item["rejected_weights"]) == len(item["rejected_input_ids"])


def test_custom_weight_columns_and_ignoring_weights(tok):
    n_chosen, n_rejected = len(ids(tok, " yes")), len(ids(tok, " no way"))
    row = pair(wc=[2.0] * n_chosen, wr=[3.0] * n_rejected, chosen_weights=[9.0] * 99)
    item = tokenize_preference_rows([row], tok, weights_columns=("wc", "wr"), progress=False)[0]
    assert item["chosen_weights"] == [2.0] * n_chosen + [0.0]
    assert item["rejected_weights"] == [3.0] * n_rejected + [0.0]
    item = tokenize_preference_rows([row], tok, weights_columns=None, progress=False)[0]
    assert "chosen_weights" not in item and "rejected_weights" not in item


def test_weights_errors_name_the_row(tok):
    n_chosen = len(ids(tok, " yes and more words"))
    good = pair(chosen=" yes and more words", chosen_weights=[1.0] * n_chosen, rejected_weights=[1.0] * 2)
    bad_length = dict(good, chosen_weights=[1.0] * (n_chosen - 1))
    message = (rf"row 1 \(0-based\): chosen_weights has {n_chosen - 1} values but the chosen response has "
               rf"{n_chosen + 1} tokens \(weights cover every response token but the final EOS")
    with pytest.raises(ValueError, match=message):
        tokenize_preference_rows([good, bad_length], tok, progress=False)
    for value in (math.nan, math.inf, "1.0", None, True):
        row = dict(good, rejected_weights=[1.0, value])
        with pytest.raises(ValueError, match=r"row 0 \(0-based\): rejected_weights\[1\] is .*finite numbers"):
            tokenize_preference_rows([row], tok, progress=False)
    with pytest.raises(ValueError, match=r"row 0 \(0-based\): chosen_weights must be a list of floats, got str"):
        tokenize_preference_rows([dict(good, chosen_weights="1 1 1")], tok, progress=False)
    with pytest.raises(ValueError, match=r"row 0 \(0-based\) has 'chosen_weights' but no 'rejected_weights'"):
        tokenize_preference_rows([pair(chosen_weights=[1.0])], tok, progress=False)
    with pytest.raises(ValueError, match=r"row 1 \(0-based\) has no token weights .* which this loss needs:"
                                         r" .*--weights PATH"):
        tokenize_preference_rows([good, pair()], tok, require_weights=True, progress=False)
    with pytest.raises(ValueError, match=r"row 1 \(0-based\) has no token weights but row 0 \(0-based\) has"):
        tokenize_preference_rows([good, pair()], tok, progress=False)


def test_plain_text_row_errors(tok):
    with pytest.raises(ValueError, match=r"row 1 \(0-based\): 'chosen' is empty or only whitespace"):
        tokenize_preference_rows([pair(), pair(chosen=" \n ")], tok, progress=False)
    with pytest.raises(ValueError, match=r"row 0 \(0-based\): 'prompt' is empty"):
        tokenize_preference_rows([pair(prompt="")], tok, progress=False)
    with pytest.raises(ValueError, match=r"row 0 \(0-based\): 'rejected' must be a string like 'prompt'.*got NoneType"):
        tokenize_preference_rows([pair(rejected=None)], tok, progress=False)
    with pytest.raises(ValueError, match=r"row 0 \(0-based\): 'prompt' must be a string .* got int"):
        tokenize_preference_rows([pair(prompt=3)], tok, progress=False)
    with pytest.raises(ValueError, match=r"row 0 \(0-based\) has no 'rejected' column"):
        tokenize_preference_rows([{"prompt": "p", "chosen": "c"}], tok, progress=False)
    no_eos = copy.deepcopy(tok)
    no_eos.eos_token = None
    with pytest.raises(ValueError, match=r"row 0 \(0-based\): the tokenizer has no eos_token_id"):
        tokenize_preference_rows([pair()], no_eos, progress=False)


def test_argument_validation_names_the_argument(tok):
    with pytest.raises(ValueError, match=r"max_length must be in \[1, inf\)"):
        tokenize_preference_rows(ROWS, tok, max_length=0, max_prompt_length=1)
    for value in (0, 8, 9):
        with pytest.raises(ValueError, match="max_prompt_length must satisfy 0 < max_prompt_length < max_length"):
            tokenize_preference_rows(ROWS, tok, max_length=8, max_prompt_length=value)
    with pytest.raises(ValueError, match="truncation_mode must be one of"):
        tokenize_preference_rows(ROWS, tok, truncation_mode="left")
    with pytest.raises(TypeError, match="max_length must be an int"):
        tokenize_preference_rows(ROWS, tok, max_length=8.0)
    with pytest.raises(ValueError, match="weights_columns must be None or two column names"):
        tokenize_preference_rows(ROWS, tok, weights_columns="chosen_weights")
    with pytest.raises(ValueError, match="require_weights=True needs weights_columns"):
        tokenize_preference_rows(ROWS, tok, weights_columns=None, require_weights=True)
    with pytest.raises(TypeError, match="rows must be a list of dicts"):
        tokenize_preference_rows(iter(ROWS), tok)
    with pytest.raises(ValueError, match="rows is empty"):
        tokenize_preference_rows([], tok)


# ----------------------------------------------------------------------------------------------------
# truncation
# ----------------------------------------------------------------------------------------------------

LONG_PROMPT = "one two three four five six seven eight"  # 8 GPT-2 tokens


def test_no_truncation_at_exactly_max_length(tok):
    prompt_ids = ids(tok, LONG_PROMPT)
    chosen_ids = ids(tok, " a b c") + [EOS]
    length = len(prompt_ids) + len(chosen_ids)
    item = tokenize_preference_rows([pair(LONG_PROMPT, " a b c", " d")], tok, max_length=length,
                                    max_prompt_length=2, progress=False)[0]
    assert item["prompt_input_ids"] == prompt_ids and item["chosen_input_ids"] == chosen_ids


@pytest.mark.parametrize("mode", ["keep_end", "keep_start"])
def test_prompt_truncation_modes(tok, mode):
    prompt_ids = ids(tok, LONG_PROMPT)
    assert len(prompt_ids) == 8
    row = pair(LONG_PROMPT, " a b", " c", chosen_weights=[1.0, 2.0], rejected_weights=[3.0])
    item = tokenize_preference_rows([row], tok, max_length=10, max_prompt_length=3, truncation_mode=mode,
                                    progress=False)[0]
    assert item["prompt_input_ids"] == (prompt_ids[-3:] if mode == "keep_end" else prompt_ids[:3])
    # 3 + 3 <= 10: the responses are untouched, EOS keeps weight 0.
    assert item["chosen_input_ids"] == ids(tok, " a b") + [EOS]
    assert item["chosen_weights"] == [1.0, 2.0, 0.0]
    assert item["rejected_weights"] == [3.0, 0.0]


def test_response_truncation_keeps_start_and_zeroes_last_kept_weight(tok):
    chosen_text = " alpha beta gamma delta epsilon zeta"
    chosen_ids = ids(tok, chosen_text)
    rejected_ids = ids(tok, " no")
    weights = [float(i + 1) for i in range(len(chosen_ids))]
    row = pair(LONG_PROMPT, chosen_text, " no", chosen_weights=weights, rejected_weights=[7.0])
    item = tokenize_preference_rows([row], tok, max_length=7, max_prompt_length=3, progress=False)[0]
    assert item["prompt_input_ids"] == ids(tok, LONG_PROMPT)[-3:]
    assert item["chosen_input_ids"] == chosen_ids[:4]
    assert item["chosen_weights"] == weights[:3] + [0.0]
    # The rejected response fits (2 tokens <= 4) and is left as it was.
    assert item["rejected_input_ids"] == rejected_ids + [EOS]
    assert item["rejected_weights"] == [7.0, 0.0]


# ----------------------------------------------------------------------------------------------------
# conversational rows
# ----------------------------------------------------------------------------------------------------


def chat_row(reply="Sure thing", other="No", **extra) -> dict:
    return {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
            "chosen": [{"role": "assistant", "content": reply}],
            "rejected": [{"role": "assistant", "content": other}], **extra}


def test_conversational_prompt_and_response_ids(chat_tok):
    prompt_text = "<|system|>Be brief.\n<|user|>Hi there\n<|assistant|>"
    expected_prompt = ids(chat_tok, prompt_text)
    full_chosen = ids(chat_tok, "<|system|>Be brief.\n<|user|>Hi there\n<|assistant|>Sure thing\n")
    full_rejected = ids(chat_tok, "<|system|>Be brief.\n<|user|>Hi there\n<|assistant|>No\n")
    assert full_chosen[: len(expected_prompt)] == expected_prompt
    item = tokenize_preference_rows([chat_row()], chat_tok, progress=False)[0]
    assert item["prompt_input_ids"] == expected_prompt
    assert item["chosen_input_ids"] == full_chosen[len(expected_prompt):] == ids(chat_tok, "Sure thing\n")
    assert item["rejected_input_ids"] == full_rejected[len(expected_prompt):]
    assert EOS not in item["chosen_input_ids"]


def test_conversational_weights_cover_all_but_final_token(chat_tok):
    n_chosen, n_rejected = len(ids(chat_tok, "Sure thing\n")), len(ids(chat_tok, "No\n"))
    row = chat_row(chosen_weights=[2.0] * (n_chosen - 1), rejected_weights=[0.5] * (n_rejected - 1))
    item = tokenize_preference_rows([row], chat_tok, progress=False)[0]
    assert item["chosen_weights"] == [2.0] * (n_chosen - 1) + [0.0]
    assert item["rejected_weights"] == [0.5] * (n_rejected - 1) + [0.0]
    with pytest.raises(ValueError, match=r"row 0 \(0-based\): chosen_weights has .* but the final one"):
        tokenize_preference_rows([dict(row, chosen_weights=[2.0] * n_chosen)], chat_tok, progress=False)


def test_conversational_errors(tok, chat_tok):
    with pytest.raises(ValueError, match=r"row 0 \(0-based\) is conversational .* no chat_template.*plain-text rows"):
        tokenize_preference_rows([chat_row()], tok, progress=False)
    mismatched = copy.deepcopy(tok)
    mismatched.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                                "{% if add_generation_prompt %}assistant:\n{% endif %}")
    with pytest.raises(ValueError, match=r"row 0 \(0-based\): the chat template renders prompt \+ chosen so"
                                         r" that it does not"):
        tokenize_preference_rows([chat_row()], mismatched, progress=False)
    with pytest.raises(ValueError, match=r"row 0 \(0-based\): 'chosen' must be a non-empty list of .*got str"):
        tokenize_preference_rows([dict(chat_row(), chosen="Sure")], chat_tok, progress=False)
    with pytest.raises(ValueError, match=r"row 0 \(0-based\): 'rejected' message 0 must be a dict with 'role'"
                                         r" and 'content'"):
        tokenize_preference_rows([dict(chat_row(), rejected=[{"content": "x"}])], chat_tok, progress=False)


def test_plain_and_conversational_rows_mix_in_order(chat_tok):
    rows = [pair(), chat_row(), pair("The sky is", " blue", " green")]
    dataset = tokenize_preference_rows(rows, chat_tok, progress=False)
    assert [item["row"] for item in dataset] == [0, 1, 2]
    assert dataset[0]["prompt_input_ids"] == HELLO_WORLD
    assert dataset[1]["chosen_input_ids"] == ids(chat_tok, "Sure thing\n")
    assert dataset[2]["chosen_input_ids"] == ids(chat_tok, " blue") + [EOS]


class _DictChatTokenizer:
    """A tokenizer whose ``apply_chat_template`` returns a dict, like transformers 5 by default."""

    def __init__(self, tok):
        self._tok = tok
        self.chat_template = tok.chat_template

    def apply_chat_template(self, messages, **kwargs):
        kwargs.pop("return_dict", None)
        if kwargs.get("tokenize") is False:  # rendering to text returns the text, as in transformers
            return self._tok.apply_chat_template(messages, **kwargs)
        return dict(self._tok.apply_chat_template(messages, return_dict=True, **kwargs))


def test_conversational_accepts_dict_results(chat_tok):
    expected = tokenize_preference_rows([chat_row()], chat_tok, progress=False)[0]
    assert tokenize_preference_rows([chat_row()], _DictChatTokenizer(chat_tok), progress=False)[0] == expected


def test_many_rows_keep_order_and_show_progress(tok, capsys):
    rows = [pair(f"Question {i}:", f" answer {i}", " no") for i in range(600)]
    dataset = tokenize_preference_rows(rows, tok, desc="tokenising test rows")
    assert "tokenising test rows" in capsys.readouterr().err
    for i in (0, 511, 512, 599):
        assert dataset[i]["row"] == i
        assert dataset[i]["prompt_input_ids"] == ids(tok, f"Question {i}:")
        assert dataset[i]["chosen_input_ids"] == ids(tok, f" answer {i}") + [EOS]


# ----------------------------------------------------------------------------------------------------
# PreferenceDataset
# ----------------------------------------------------------------------------------------------------


def test_with_columns_adds_aligned_values(tok):
    dataset = tokenize_preference_rows(ROWS, tok, progress=False)
    chosen = [[-0.5] * len(dataset[i]["chosen_input_ids"]) for i in range(2)]
    rejected = [torch.full((len(dataset[i]["rejected_input_ids"]),), -1.5) for i in range(2)]
    extended = dataset.with_columns(chosen_ref_logps=chosen, rejected_ref_logps=rejected, score=[1, 2])
    assert extended.column_names == dataset.column_names + ["chosen_ref_logps", "rejected_ref_logps", "score"]
    assert "chosen_ref_logps" not in dataset.column_names
    assert extended[1]["rejected_ref_logps"] == [-1.5] * len(dataset[1]["rejected_input_ids"])
    assert extended[0]["score"] == 1 and extended[0]["chosen_input_ids"] == dataset[0]["chosen_input_ids"]


def test_with_columns_errors_name_the_item(tok):
    dataset = tokenize_preference_rows(ROWS, tok, progress=False)
    short = [[0.0] * len(dataset[0]["chosen_input_ids"]), [0.0]]
    with pytest.raises(ValueError, match=r"item 1 \(row 1\): chosen_ref_logps has 1 values but chosen_input_ids"):
        dataset.with_columns(chosen_ref_logps=short)
    with pytest.raises(ValueError, match="chosen_ref_logps has 1 values but the dataset has 2 items"):
        dataset.with_columns(chosen_ref_logps=short[:1])
    with pytest.raises(ValueError, match="'row' is a built-in column"):
        dataset.with_columns(row=[5, 6])


# ----------------------------------------------------------------------------------------------------
# PreferenceCollator
# ----------------------------------------------------------------------------------------------------


def test_collator_layout(tok):
    dataset = tokenize_preference_rows(ROWS, tok, progress=False)
    batch = PreferenceCollator(PAD)([dataset[0], dataset[1]])
    p0, p1 = HELLO_WORLD, ids(tok, "The sky is")
    c0, c1 = ids(tok, " yes") + [EOS], ids(tok, " blue") + [EOS]
    r0, r1 = ids(tok, " no way") + [EOS], ids(tok, " green and wide") + [EOS]
    sequences = [(p0, c0), (p1, c1), (p0, r0), (p1, r1)]
    width = max(len(p) + len(r) for p, r in sequences)
    assert batch["input_ids"].shape == (4, width) and batch["input_ids"].dtype == torch.long
    for row, (prompt, response) in enumerate(sequences):
        pad = width - len(prompt) - len(response)
        assert batch["input_ids"][row].tolist() == prompt + response + [PAD] * pad
        assert batch["attention_mask"][row].tolist() == [1] * (len(prompt) + len(response)) + [0] * pad
        assert batch["labels"][row].tolist() == [IGNORE] * len(prompt) + response + [IGNORE] * pad
    prompt_width = max(len(p0), len(p1))
    assert batch["prompt_input_ids"].tolist() == [[PAD] * (prompt_width - len(p)) + p for p in (p0, p1)]
    assert batch["prompt_attention_mask"].tolist() == [[0] * (prompt_width - len(p)) + [1] * len(p)
                                                       for p in (p0, p1)]
    assert batch["row"].tolist() == [0, 1]
    assert "weights" not in batch and "ref_logps" not in batch
    assert batch["attention_mask"].dtype == batch["labels"].dtype == torch.long


def test_collator_pad_to_multiple_and_ignore_index(tok):
    dataset = tokenize_preference_rows(ROWS, tok, progress=False)
    batch = PreferenceCollator(0, ignore_index=-1, pad_to_multiple_of=8)(list(dataset))
    longest = int(batch["attention_mask"].sum(1).max())
    assert batch["input_ids"].shape[1] == 8 * math.ceil(longest / 8)
    assert batch["input_ids"][batch["attention_mask"] == 0].eq(0).all()
    assert batch["labels"][0, : len(HELLO_WORLD)].tolist() == [-1, -1]


def test_collator_weights_and_ref_logps(tok):
    rows = [pair(chosen_weights=[2.0], rejected_weights=[3.0, 4.0]),
            pair("The sky is", " blue", " green", chosen_weights=[5.0], rejected_weights=[6.0])]
    dataset = tokenize_preference_rows(rows, tok, progress=False)
    dataset = dataset.with_columns(
        chosen_ref_logps=[[-1.0, -2.0], [-3.0, -4.0]], rejected_ref_logps=[[-5.0, -6.0, -7.0], [-8.0, -9.0]])
    batch = PreferenceCollator(PAD)(list(dataset))
    p0, p1 = len(HELLO_WORLD), len(ids(tok, "The sky is"))
    width = batch["input_ids"].shape[1]
    expected_weights = [[0.0] * p0 + [2.0, 0.0], [0.0] * p1 + [5.0, 0.0],
                        [0.0] * p0 + [3.0, 4.0, 0.0], [0.0] * p1 + [6.0, 0.0]]
    expected_ref = [[0.0] * p0 + [-1.0, -2.0], [0.0] * p1 + [-3.0, -4.0],
                    [0.0] * p0 + [-5.0, -6.0, -7.0], [0.0] * p1 + [-8.0, -9.0]]
    for name, expected in (("weights", expected_weights), ("ref_logps", expected_ref)):
        assert batch[name].dtype == torch.float32
        assert batch[name].tolist() == [row + [0.0] * (width - len(row)) for row in expected], name
    # Weights sit exactly on the labelled positions' rows: zero wherever labels are ignored.
    assert batch["weights"][batch["labels"] == IGNORE].eq(0).all()


def test_collator_with_dataloader(tok):
    dataset = tokenize_preference_rows(ROWS * 3, tok, progress=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=PreferenceCollator(PAD))
    shapes = [tuple(batch["input_ids"].shape) for batch in loader]
    assert [s[0] for s in shapes] == [8, 4]


def test_collator_errors(tok):
    with pytest.raises(TypeError, match="pad_token_id is None; set tokenizer.pad_token"):
        PreferenceCollator(None)
    with pytest.raises(TypeError, match="pad_token_id must be an int"):
        PreferenceCollator(1.0)
    with pytest.raises(ValueError, match=r"pad_to_multiple_of must be in \[1, inf\)"):
        PreferenceCollator(PAD, pad_to_multiple_of=0)
    collator = PreferenceCollator(PAD)
    with pytest.raises(ValueError, match="items is empty"):
        collator([])
    rows = [pair(chosen_weights=[2.0], rejected_weights=[3.0, 4.0]), pair()]
    weighted = tokenize_preference_rows(rows[:1], tok, progress=False)[0]
    plain = dict(tokenize_preference_rows(rows[1:], tok, progress=False)[0], row=7)
    with pytest.raises(ValueError, match=r"items \[1\] \(rows \[7\]\) lack 'chosen_weights' / 'rejected_weights'"):
        collator([weighted, plain])
    with pytest.raises(ValueError, match=r"item 0 \(row 0\): chosen_weights has 1 values but the response has 2"):
        collator([dict(weighted, chosen_weights=[1.0])])
    with pytest.raises(ValueError, match=r"item 0 \(row 7\): chosen_input_ids is empty"):
        collator([dict(plain, chosen_input_ids=[])])
    with pytest.raises(ValueError, match="item 0 has no 'row' column"):
        collator([{"prompt_input_ids": [1], "chosen_input_ids": [2], "rejected_input_ids": [3]}])


# ----------------------------------------------------------------------------------------------------
# special tokens already in the text are not doubled
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bos_tok(tok):
    """GPT-2 with a distinct BOS ``<s>`` that the tokenizer adds in front of every text, as Llama's does, and
    an end-of-turn special token ``<|eot|>``."""
    from tokenizers.processors import TemplateProcessing

    t = copy.deepcopy(tok)
    t.add_special_tokens({"bos_token": "<s>", "additional_special_tokens": ["<|eot|>"]})
    t._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", t.bos_token_id)])
    return t


def test_plain_rows_do_not_double_bos_or_eos(bos_tok):
    bos = bos_tok.bos_token_id
    assert bos_tok("Hello world").input_ids == [bos, *HELLO_WORLD]  # the tokenizer adds a BOS itself
    rows = [pair(prompt="<s>Hello world", chosen=" yes<|endoftext|>", rejected=" no way<|endoftext|>  "),
            pair(prompt="Hello world")]
    data = tokenize_preference_rows(rows, bos_tok, progress=False)
    assert data[0]["prompt_input_ids"] == [bos, *HELLO_WORLD] == data[1]["prompt_input_ids"]
    assert data[0]["chosen_input_ids"] == ids(bos_tok, " yes") + [EOS] == data[1]["chosen_input_ids"]
    # Whitespace after the EOS text is dropped with it: still one EOS.
    assert data[0]["rejected_input_ids"] == ids(bos_tok, " no way") + [EOS]
    spaced = tokenize_preference_rows([pair(prompt="  <s>Hello world")], bos_tok, progress=False)
    assert spaced[0]["prompt_input_ids"] == [bos, *HELLO_WORLD]
    # Weights still cover every response token but the (single) EOS.
    weighted = tokenize_preference_rows([{**rows[0], "chosen_weights": [0.5], "rejected_weights": [1.0] * 2}],
                                        bos_tok, progress=False)
    assert weighted[0]["chosen_weights"] == [0.5, 0.0]


@pytest.mark.parametrize("terminator", ["eos_token", "'<|eot|>'"])
def test_chat_rows_do_not_double_the_turn_terminator_or_bos(bos_tok, terminator):
    chat = copy.deepcopy(bos_tok)
    chat.chat_template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
                          "{% if m['role'] == 'assistant' %}{{ " + terminator + " }}{% endif %}\n{% endfor %}"
                          "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    end = chat.eos_token if terminator == "eos_token" else "<|eot|>"
    prompt = [{"role": "user", "content": "Hi"}]

    def rendered(reply: str) -> list[int]:  # the template applied to the clean reply, by the tokenizer itself
        full = chat.apply_chat_template(prompt + [{"role": "assistant", "content": reply}], tokenize=False)
        head = chat.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        return chat(full[len(head):], add_special_tokens=False).input_ids

    row = {"prompt": prompt, "chosen": [{"role": "assistant", "content": f"Yes{end}"}],
           "rejected": [{"role": "assistant", "content": f"No {end} "}]}
    item = tokenize_preference_rows([row], chat, progress=False)[0]
    assert item["prompt_input_ids"][:2] == [chat.bos_token_id, chat("<|user|>", add_special_tokens=False).input_ids[0]]
    assert item["chosen_input_ids"] == rendered("Yes")
    assert item["rejected_input_ids"] == rendered("No ")  # the terminator and what follows it go, nothing else
    assert item["chosen_input_ids"].count(chat.convert_tokens_to_ids(end)) == 1
