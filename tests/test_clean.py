"""`leanlm data clean` on small files written here: what each stage removes, what it keeps, and bad input."""

import json

import pytest

from leanlm.clean import clean
from leanlm.cli import main
from leanlm.errors import ConfigError, DataError, OutputExistsError

DOC = ("The for statement is used to iterate over the elements of a sequence such as a string, tuple or list, "
       "or over any other iterable object; the starred expression list is evaluated once and yields an iterator.")
OTHER = ("A module can contain executable statements as well as function definitions; these statements are "
         "intended to initialize the module and are executed only the first time the module name is imported.")
THIRD = ("Exceptions are raised by the raise statement and handled by try statements whose except clauses name "
         "the exception classes they match, with finally clauses that run whatever happened in the block.")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def removed(out):
    return [json.loads(line) for line in (out / "removed.jsonl").read_text().splitlines()]


def kept(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def near_copy(text):
    words = text.split()
    del words[3]
    words[7], words[8] = words[8], words[7]
    words[12] = "banana"
    return "  ".join(words).upper() + " Subscribe to our newsletter."


def test_exact_normalized_and_near_duplicates_go_and_say_of_what(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": DOC}, {"text": OTHER}, {"text": DOC},
                                             {"text": "  " + DOC.upper().replace(" ", "\n")},
                                             {"text": near_copy(OTHER)}, {"text": THIRD}])
    report = clean([src], tmp_path / "out", progress=False)
    rows = {r["index"]: r for r in removed(tmp_path / "out")}
    assert {i: (r["reason"], r["of"]) for i, r in rows.items()} == {
        2: ("exact-duplicate", 0), 3: ("exact-duplicate", 0), 4: ("near-duplicate", 1)}
    assert rows[4]["record"] == {"text": near_copy(OTHER)} and rows[4]["source"] == str(src)
    assert [r["text"] for r in kept(tmp_path / "out" / "d.jsonl")] == [DOC, OTHER, THIRD]
    assert report["records"] == 6 and report["kept"] == 3
    assert (tmp_path / "out" / "report.md").read_text().count("near-duplicate") >= 1
    assert json.loads((tmp_path / "out" / "report.json").read_text())["counts"]["exact-duplicate"] == 2


def test_reordered_short_texts_are_not_near_duplicates(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": "convert an int to a string"},
                                             {"text": "convert a string to an int"}])
    clean([src], tmp_path / "out", progress=False)
    assert removed(tmp_path / "out") == []


def test_text_files_are_paragraphs_and_are_written_back_as_paragraphs(tmp_path):
    src = tmp_path / "notes.txt"
    src.write_text(f"{DOC}\n\n{OTHER}\n\n\n{DOC}\n")
    clean([src], tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "notes.txt").read_text() == f"{DOC}\n\n{OTHER}\n"
    assert [(r["index"], r["reason"], r["record"]) for r in removed(tmp_path / "out")] == [
        (2, "exact-duplicate", DOC)]


def test_directories_and_parquet_keep_their_layout_and_format(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    (tmp_path / "in" / "sub").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{"text": DOC, "id": 1}, {"text": DOC, "id": 2}]), tmp_path / "in" / "a.parquet")
    write_jsonl(tmp_path / "in" / "sub" / "b.jsonl", [{"text": OTHER}, {"text": DOC}])
    clean([tmp_path / "in"], tmp_path / "out", progress=False)
    assert pq.read_table(tmp_path / "out" / "in" / "a.parquet").to_pylist() == [{"text": DOC, "id": 1}]
    assert kept(tmp_path / "out" / "in" / "sub" / "b.jsonl") == [{"text": OTHER}]
    cross = [r for r in removed(tmp_path / "out") if r["source"].endswith("b.jsonl")]
    assert cross[0]["of"] == 0 and cross[0]["of_source"].endswith("a.parquet")


def chat(q, a):
    return {"messages": [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": q},
                         {"role": "assistant", "content": a}]}


def test_conflicting_answers_keep_the_majority_and_elaborations_agree(tmp_path):
    q = "What does len() return for a dict?"
    rows = [chat(q, "The number of keys in the dict."),
            chat(q.lower().rstrip("?"), "It returns the number of keys in the dict as an integer, counting each key "
                                        "once; an empty dict gives zero."),  # elaborates: agrees
            chat("What does len() return for a dict", "The number of values plus one."),  # contradicts
            chat("How do I reverse a list?", "Call list.reverse() or use reversed()."),
            chat("What does the 'is' operator test?", "Whether two names refer to the same object.")]
    src = write_jsonl(tmp_path / "chat.jsonl", rows)
    report = clean([src], tmp_path / "out", progress=False)
    assert [(r["index"], r["reason"], r["of"]) for r in removed(tmp_path / "out")] == [(2, "conflict", 0)]
    assert report["stats"]["conflict_groups"] == 1


@pytest.mark.parametrize("a, b, same", [
    ("Sure: the loop ends at j.", "The loop ends at j, and never includes j itself.", True),  # prefix vs suffix
    ("The loop ends at j.", "THE  LOOP\nENDS AT J", True),
    ("x == y implies that x is y", "x == y should that x is y", False),  # substituted by a stopword
    ("a module object named foo, not a module", "a scopes object named foo, not a module", False),  # one of two
    ("Keys should be integers.", "Keys should not be integers.", False),
    ("Keys should be integers.", "Keys should be integers. It is never required for speed.", True),
    ("Yes.", "No.", False),
    ("The default is 1.", "The default is 7.", False),
])
def test_answer_agreement(a, b, same):
    from leanlm.clean.conflict_ops import agree, answer_signature

    assert agree(answer_signature(a), answer_signature(b)) is same
    assert agree(answer_signature(b), answer_signature(a)) is same


def test_a_cut_short_copy_does_not_hide_a_contradiction(tmp_path):
    q = "Complete: the order in which attributes are defined in the ..."
    rows = [chat(q, "class body is preserved in the"),  # cut short: agrees with both of the next two
            chat(q, "class body is preserved in the new class's __dict__."),
            chat(q, "class body is preserved in the new class's __dict__ mapping."),
            chat(q, "underscores body is preserved in the new class's __dict__.")]
    src = write_jsonl(tmp_path / "chat.jsonl", rows)
    clean([src], tmp_path / "out", progress=False)
    assert sorted((r["index"], r["reason"]) for r in removed(tmp_path / "out")) == [
        (1, "near-duplicate"), (2, "near-duplicate"), (3, "conflict")]


def test_conflict_tie_drops_the_group_and_flag_keeps_it(tmp_path):
    rows = [{"prompt": "How many bits are in a byte?", "completion": "Eight bits, 8."},
            {"prompt": "How many bits are in a byte?", "completion": "Sixteen bits, 16."},
            {"prompt": "Is a tuple mutable?", "completion": "No, a tuple is immutable."},
            {"prompt": "Is a tuple mutable?", "completion": "No, a tuple is not immutable."}]
    src = write_jsonl(tmp_path / "pc.jsonl", rows)
    clean([src], tmp_path / "out", progress=False)
    assert sorted((r["index"], r["reason"], r["of"]) for r in removed(tmp_path / "out")) == [
        (0, "conflict", None), (1, "conflict", None), (2, "conflict", None), (3, "conflict", None)]
    clean([src], tmp_path / "flag", {"conflicts": {"policy": "flag"}}, progress=False)
    assert removed(tmp_path / "flag") == [] and len(kept(tmp_path / "flag" / "pc.jsonl")) == 4
    assert len((tmp_path / "flag" / "conflicts.jsonl").read_text().splitlines()) == 2


def test_pii_is_replaced_and_the_original_kept_aside(tmp_path):
    text = ("Write to jane.roe@acme-corp.io or call +44 20 7946 0958; card 4111 1111 1111 1111, server 8.8.4.4, "
            "token = 'Zx9kQ2mP7vL4tR8wY1nB'. Docs at user@example.com and 192.168.0.1 stay.")
    src = write_jsonl(tmp_path / "p.jsonl", [{"text": text}, {"text": DOC}])
    report = clean([src], tmp_path / "out", progress=False)
    out = kept(tmp_path / "out" / "p.jsonl")[0]["text"]
    assert out == ("Write to <EMAIL> or call <PHONE>; card <CARD_NUMBER>, server <IP_ADDRESS>, token = '<SECRET>'. "
                   "Docs at user@example.com and 192.168.0.1 stay.")
    assert removed(tmp_path / "out") == [{"source": str(src), "index": 0, "reason": "pii-redacted", "of": None,
                                          "record": {"text": text}}]
    assert report["pii"] == {"email": 1, "phone": 1, "card": 1, "ip": 1, "secret": 1} and report["kept"] == 2


def test_quality_rules_and_contamination(tmp_path):
    spam = "\n".join(["buy now"] * 10)
    evalf = write_jsonl(tmp_path / "eval.jsonl", [{"text": THIRD}])
    src = write_jsonl(tmp_path / "q.jsonl", [{"text": DOC}, {"text": spam}, {"text": "123 456 789 1011 1213 = 3592"},
                                             {"text": "Intro. " + THIRD[:150]}])
    clean([src], tmp_path / "out", {"contamination": {"eval_files": [str(evalf)]}}, progress=False)
    assert [(r["index"], r["reason"]) for r in removed(tmp_path / "out")] == [
        (1, "quality:max_duplicate_line_ratio"), (2, "quality:min_alpha_word_ratio"), (3, "contamination")]


@pytest.mark.parametrize("content, message", [
    ('{"text": "ok"}\n{"text": "unclosed\n', "d.jsonl:2: not valid JSON"),
    ('{"text": 5}\n', "d.jsonl:1: 'text' must be a string"),
    ('[1, 2]\n', "d.jsonl:1: expected a JSON object"),
    ('{"body": "x"}\n', "record has none of 'text'"),
    ("\n\n", "holds no records"),
])
def test_bad_records_name_file_and_line(tmp_path, content, message):
    (tmp_path / "d.jsonl").write_text(content)
    with pytest.raises(DataError, match=message):
        clean([tmp_path / "d.jsonl"], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_bad_paths_configs_and_existing_output(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no .txt, .jsonl, .parquet file"):
        clean([tmp_path / "empty"], tmp_path / "out")
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": DOC}])
    with pytest.raises(ConfigError, match="unknown key 'semantic_dedup'.*valid keys: conflicts, contamination"):
        clean([src], tmp_path / "out", {"semantic_dedup": {}})
    with pytest.raises(ConfigError, match=r"threshold = 1.5 is outside \[0, 1\]"):
        clean([src], tmp_path / "out", {"near_duplicates": {"threshold": 1.5}})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        clean([src], tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    clean([src], tmp_path / "out", overwrite=True, progress=False)
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "d.jsonl").exists()


def test_cli_cleans_and_reports_errors_in_one_line(tmp_path, capsys):
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": DOC}, {"text": DOC}])
    cfg = tmp_path / "clean.yaml"
    cfg.write_text("conflicts:\n  policy: drop\nquality:\n  min_words: 2\n")
    assert main(["data", "clean", str(src), "--out", str(tmp_path / "out"), "--config", str(cfg)]) == 0
    assert "exact-duplicate: 1" in capsys.readouterr().out
    assert main(["data", "clean", str(src), "--out", str(tmp_path / "out")]) == 2
    assert "already exists" in capsys.readouterr().err
    cfg.write_text("quality:\n  min_word: 2\n")
    assert main(["data", "clean", str(src), "--out", str(tmp_path / "o2"), "--config", str(cfg)]) == 2
    assert "did you mean 'min_words'" in capsys.readouterr().err


def test_workers_give_the_same_result_and_lines_come_back_byte_for_byte(tmp_path, monkeypatch):
    import leanlm.clean.analyze as analyze

    monkeypatch.setattr(analyze, "BATCH", 3)  # several batches, so order across workers matters
    monkeypatch.setattr("leanlm.clean.run.BATCH", 3)
    chat = {"messages": [{"role": "user", "content": "Mail me at jane.doe@acme.io"},
                         {"role": "assistant", "content": "Sure, noted."}]}
    rows = [{"text": DOC}, {"text": OTHER}, chat, {"text": DOC}, {"text": near_copy(OTHER)}, {"text": THIRD},
            {"text": "caf\u00e9 " + THIRD[:90]}, {"text": "x"}]
    src = tmp_path / "d.jsonl"
    # non-ASCII escaped and spaced differently from json.dumps' defaults: kept lines must be copied, not re-encoded
    src.write_text("".join(json.dumps(r, ensure_ascii=True, separators=(",", ":")) + "\n" for r in rows))
    one = clean([src], tmp_path / "one", progress=False, workers=1)
    two = clean([src], tmp_path / "two", progress=False, workers=2)
    assert (tmp_path / "one" / "removed.jsonl").read_text() == (tmp_path / "two" / "removed.jsonl").read_text()
    assert (tmp_path / "one" / "d.jsonl").read_bytes() == (tmp_path / "two" / "d.jsonl").read_bytes()
    assert one["counts"] == two["counts"] == {"exact-duplicate": 1, "near-duplicate": 1, "pii-redacted": 1,
                                            "quality:min_mean_word_length": 1}
    lines = src.read_text().splitlines(keepends=True)
    out = (tmp_path / "one" / "d.jsonl").read_text().splitlines(keepends=True)
    assert out[0] == lines[0] and out[-1] == lines[6] and "\\u00e9" in out[-1]
    assert json.loads(out[2])["messages"][0]["content"] == "Mail me at <EMAIL>"
    with pytest.raises(ConfigError, match="workers must be >= 1"):
        clean([src], tmp_path / "zero", progress=False, workers=0)


def test_ray_engine_on_a_local_cluster_gives_the_local_result(tmp_path, monkeypatch):
    ray_module = pytest.importorskip("ray")
    if not ray_module.is_initialized():  # the cluster this test starts goes with it
        monkeypatch.setattr("leanlm.clean.analyze.RayWorkers.close", lambda self: ray_module.shutdown())
    monkeypatch.setattr("leanlm.clean.run.BATCH", 3)  # several batches in flight at once
    chat = {"messages": [{"role": "user", "content": "Call me on +1 415 555 0100"},
                         {"role": "assistant", "content": "Sure."}]}
    rows = [{"text": DOC}, {"text": OTHER}, chat, {"text": DOC}, {"text": near_copy(OTHER)}, {"text": THIRD},
            {"text": "x"}, {"text": near_copy(DOC)}]
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    local = clean([src], tmp_path / "local", progress=False)
    ray = clean([src], tmp_path / "ray", progress=False, engine="ray", ray_address="local")
    assert ray["engine"] == "ray" and ray["counts"] == local["counts"]
    assert local["counts"]["near-duplicate"] == 2 and local["counts"]["pii-redacted"] == 1
    for name in ("removed.jsonl", "d.jsonl"):
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    with pytest.raises(ConfigError, match="engine 'spark'"):
        clean([src], tmp_path / "spark", progress=False, engine="spark")
