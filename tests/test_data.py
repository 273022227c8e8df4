import json

import pytest
import torch

from leanlm.data.corpus import (
    calibration_samples,
    default_corpus,
    load_corpus,
    load_texts,
    make_windows,
    tokenize,
)
from leanlm.errors import DataError


def test_default_corpus_is_split_90_10():
    corpus = default_corpus()
    total = len(corpus.train) + len(corpus.eval)
    assert total > 400_000
    assert len(corpus.train) == int(total * 0.9)
    assert load_corpus(None).eval == corpus.eval


def test_jsonl_text_and_chat(tmp_path, tokenizer):
    tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "plain"}) + "\n\n" + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    assert load_texts(f, tokenizer) == ["plain", "<user>hi\n"]
    tokenizer.chat_template = None


def test_malformed_jsonl_names_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON"):
        load_texts(f)


def test_record_without_text_names_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: .*neither a 'text'"):
        load_texts(f)


def test_chat_without_template_is_an_error(tmp_path, tokenizer):
    f = tmp_path / "chat.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match=r"chat\.jsonl:1: .*chat template"):
        load_texts(f, tokenizer)


@pytest.mark.parametrize("name,content", [("empty.txt", ""), ("blank.jsonl", "\n\n"), ("spaces.txt", "   \n")])
def test_empty_files_are_errors(tmp_path, name, content):
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(DataError, match="holds no text"):
        load_texts(f)


def test_invalid_utf8_names_line(tmp_path):
    f = tmp_path / "bin.txt"
    f.write_bytes(b"line one\nline two \xff\xfe\n")
    with pytest.raises(DataError, match=r"bin\.txt:2: not valid UTF-8"):
        load_texts(f)


def test_parquet_and_directory(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a", "b"]}), tmp_path / "x.parquet")
    (tmp_path / "y.txt").write_text("c")
    (tmp_path / "ignored.csv").write_text("z")
    assert load_texts(tmp_path) == ["a", "b", "c"]


def test_missing_path_and_unsupported_type(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_texts(tmp_path / "nope.txt")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match="unsupported data file type"):
        load_texts(tmp_path / "x.csv")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="holds no"):
        load_texts(empty)


def test_windows_drop_the_tail():
    w = make_windows(torch.arange(1030), 512)
    assert w.shape == (2, 512) and w[1, 0] == 512
    with pytest.raises(DataError, match="fewer than one 512-token window"):
        make_windows(torch.arange(100), 512)


def test_calibration_is_deterministic(tokenizer):
    text = default_corpus().train[:50_000]
    a = calibration_samples(tokenizer, text, 8, 64, seed=3)
    b = calibration_samples(tokenizer, text, 8, 64, seed=3)
    c = calibration_samples(tokenizer, text, 8, 64, seed=4)
    assert a.shape == (8, 64) and torch.equal(a, b) and not torch.equal(a, c)
    ids = tokenize(tokenizer, text)
    start = (ids == a[0, 0]).nonzero()[:, 0]
    assert any(torch.equal(ids[s : s + 64], a[0]) for s in start.tolist())


def test_calibration_text_too_short(tokenizer):
    with pytest.raises(DataError, match="shorter than the requested sample length 512"):
        calibration_samples(tokenizer, "just a few words", 4, 512)


def test_calibration_warns_when_the_text_is_smaller_than_the_samples(tokenizer, caplog):
    text = default_corpus().train[:2_000]
    calibration_samples(tokenizer, text, 4, 64)
    assert not caplog.records
    calibration_samples(tokenizer, text, 64, 64)
    assert "the samples overlap" in caplog.text and "64 x 64 were asked for" in caplog.text
