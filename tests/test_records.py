"""Data loading: every shape from JSONL, CSV and Parquet; each bad input ends in one clear error."""

import json

import pandas as pd
import pytest

from mansu.data.records import MCQRecord, QARecord, TextRecord, load_records

MCQ = {"question": "Where was Zorvath born?", "choices": ["Quorvel", "Varnoth", "Pellucor", "Obrecant"], "answer": 2}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_mcq_jsonl_round_trip(tmp_path):
    recs = load_records(write_jsonl(tmp_path / "f.jsonl", [MCQ, {**MCQ, "answer": 0, "subject": "Zorvath"}]))
    assert recs == [MCQRecord(MCQ["question"], tuple(MCQ["choices"]), 2),
                    MCQRecord(MCQ["question"], tuple(MCQ["choices"]), 0, subject="Zorvath")]


def test_qa_and_text_shapes(tmp_path):
    qa = load_records(write_jsonl(tmp_path / "qa.jsonl", [{"question": "Who?", "answer": "Kelandor"}]))
    text = load_records(write_jsonl(tmp_path / "t.jsonl", [{"text": "Kelandor plays the zelphine ."}]))
    assert qa == [QARecord("Who?", "Kelandor")] and text == [TextRecord("Kelandor plays the zelphine .")]


def test_csv_and_parquet_mcq(tmp_path):
    frame = pd.DataFrame([{**MCQ, "choices": json.dumps(MCQ["choices"])}])
    frame.to_csv(tmp_path / "f.csv", index=False)
    pd.DataFrame([MCQ]).to_parquet(tmp_path / "f.parquet")
    expected = [MCQRecord(MCQ["question"], tuple(MCQ["choices"]), 2)]
    assert load_records(tmp_path / "f.csv", "mcq") == expected
    assert load_records(tmp_path / "f.parquet", "mcq") == expected


@pytest.mark.parametrize("rows, message", [
    ([{**MCQ, "answer": 4}], r"f.jsonl:1: field 'answer' must be an integer index in 0..3, got 4"),
    ([MCQ, {**MCQ, "choices": ["only one"]}], r"f.jsonl:2: field 'choices' must be a list of at least 2"),
    ([{**MCQ, "question": ""}], r"f.jsonl:1: field 'question' must be a non-empty string"),
    ([{**MCQ, "answer": True}], r"field 'answer' must be an integer index"),
    ([{"foo": 1}], r"cannot tell the record shape"),
])
def test_bad_records_name_file_line_and_field(tmp_path, rows, message):
    with pytest.raises(ValueError, match=message):
        load_records(write_jsonl(tmp_path / "f.jsonl", rows))


def test_malformed_jsonl_reports_line(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text(json.dumps(MCQ) + "\n" + "{not json\n")
    with pytest.raises(ValueError, match=r"f.jsonl:2: malformed JSON"):
        load_records(path)


def test_missing_file_empty_split_and_unknown_type(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found"):
        load_records(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty split"):
        load_records(tmp_path / "empty.jsonl")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(ValueError, match=r"unsupported file type '.txt'; accepted are .jsonl"):
        load_records(tmp_path / "f.txt")
    with pytest.raises(ValueError, match="unknown data shape 'xml'"):
        load_records(tmp_path / "f.txt", "xml")


def test_utf8_byte_order_mark_is_accepted_in_jsonl_and_csv(tmp_path):
    (tmp_path / "f.jsonl").write_bytes(b"\xef\xbb\xbf" + (json.dumps(MCQ) + "\n").encode())
    frame = pd.DataFrame([{**MCQ, "choices": json.dumps(MCQ["choices"])}])
    (tmp_path / "f.csv").write_bytes(b"\xef\xbb\xbf" + frame.to_csv(index=False).encode())
    expected = [MCQRecord(MCQ["question"], tuple(MCQ["choices"]), 2)]
    assert load_records(tmp_path / "f.jsonl") == expected and load_records(tmp_path / "f.csv", "mcq") == expected


def test_a_byte_order_mark_after_the_first_line_is_not_json(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_bytes((json.dumps(MCQ) + "\n").encode() + b"\xef\xbb\xbf" + (json.dumps(MCQ) + "\n").encode())
    with pytest.raises(ValueError, match=r"f.jsonl:2: malformed JSON"):
        load_records(path)


def test_duplicated_keys_are_rejected(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text(json.dumps(MCQ) + "\n" + '{"question": "a", "choices": ["x", "y"], "answer": 0, "answer": 1}\n')
    with pytest.raises(ValueError,
                       match=r"f.jsonl:2: duplicated key 'answer' in one JSON object; each key may appear once"):
        load_records(path)
    (tmp_path / "f.csv").write_text('question,answer,answer\nWho?,Kelandor,Zorvath\n')
    with pytest.raises(ValueError, match=r"f.csv: duplicated column 'answer'; each column name may appear once"):
        load_records(tmp_path / "f.csv")


def test_binary_files_and_folders_name_the_file_and_what_is_accepted(tmp_path):
    (tmp_path / "f.jsonl").write_bytes(json.dumps(MCQ).encode() + b"\n\x00\x9f\x92\x96\n")
    with pytest.raises(ValueError, match=r"f.jsonl:2: not UTF-8 text \(byte 0x9f at column 2\); accepted are UTF-8 "
                                         r"text files \(.jsonl, .json, .csv\) or Parquet"):
        load_records(tmp_path / "f.jsonl")
    (tmp_path / "f.csv").write_bytes(b"question,answer\n\xff\xfe,x\n")
    with pytest.raises(ValueError, match=r"f.csv: not UTF-8 text \(byte 0xff at offset 16\)"):
        load_records(tmp_path / "f.csv")
    (tmp_path / "f.parquet").write_bytes(b"\x00\x01 not parquet")
    with pytest.raises(ValueError, match=r"f.parquet: cannot read as parquet \(.*\); accepted are .jsonl, .json"):
        load_records(tmp_path / "f.parquet")
    (tmp_path / "d.jsonl").mkdir()
    with pytest.raises(ValueError, match=r"d.jsonl: is a folder; give a data file \(.jsonl, .json, .csv, .parquet\)"):
        load_records(tmp_path / "d.jsonl")


def test_length_limits_per_field_and_per_line(tmp_path):
    from mansu.data.records import MAX_FIELD_CHARS, MAX_LINE_CHARS

    ok = {**MCQ, "question": "q" * MAX_FIELD_CHARS}
    assert load_records(write_jsonl(tmp_path / "ok.jsonl", [ok]))[0].question == ok["question"]
    long_choice = {**MCQ, "choices": ["a", "b" * (MAX_FIELD_CHARS + 1)], "answer": 0}
    with pytest.raises(ValueError,
                       match=r"f.jsonl:1: field 'choices' is 100,001 characters long; the limit is 100,000"):
        load_records(write_jsonl(tmp_path / "f.jsonl", [long_choice]))
    wide = {"question": "q", "choices": ["a", "b"], "answer": 0, "notes": "n" * MAX_LINE_CHARS}
    with pytest.raises(ValueError, match=r"g.jsonl:1: line is 1,000,06\d characters long; the limit is 1,000,000"):
        load_records(write_jsonl(tmp_path / "g.jsonl", [wide]))
