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
