"""`leanlm prompt compress` and `lint` on the tiny model and tokenizer built in conftest."""

import json
import re

import pytest

from leanlm.cli import main
from leanlm.errors import ConfigError
from leanlm.prompt import compress, lint
from leanlm.prompt.compress_ops import units

CONTEXT = ("The for statement is used to iterate over the elements of a sequence such as a string, tuple or list. "
           "The expression list is evaluated once; it should yield an iterable object. Guido added the \"else\" "
           "clause in 1991, see https://docs.python.org/3/reference/compound_stmts.html for the details. "
           "A \"break\" statement executed in the first suite terminates the loop without executing the else "
           "clause's suite, and os.path.join() is unrelated. The loop variable keeps its last value, 42 here. ") * 3


def is_subsequence(short: str, long: str) -> bool:
    it = iter(long.split())
    return all(w in it for w in short.split())


@pytest.mark.parametrize("budget", [0.6, 0.55, 560])
def test_compress_meets_the_budget_and_keeps_protected_spans(tiny, budget):
    result = compress(CONTEXT, budget, question="What does a break statement do?", model=tiny)
    target = round(budget * result.tokens_before) if budget < 1 else budget
    assert result.target == target
    assert target * 0.98 <= result.tokens_after <= target and not result.warnings
    assert len(tiny.tokenizer(result.text, add_special_tokens=False)["input_ids"]) == result.tokens_after
    assert is_subsequence(result.text, CONTEXT)  # whole words dropped, nothing rewritten
    for span in ("1991", "42", "https://docs.python.org/3/reference/compound_stmts.html", '"else"', "Guido",
                 "os.path.join()", '"break"'):
        assert span in result.text


def test_the_question_keeps_the_words_it_names(tiny):
    asked = compress(CONTEXT, 0.4, question="What value does the loop variable keep?", model=tiny)
    assert all(w in asked.text for w in ("loop", "variable", "keeps", "value"))
    # the sentence that shares most with the question stays whole
    assert "The loop variable keeps its last value, 42 here." in asked.text
    blind = compress(CONTEXT, 0.4, model=tiny)
    assert "The loop variable keeps its last value, 42 here." not in blind.text


def test_budget_errors_say_what_was_wrong(tiny):
    with pytest.raises(ConfigError, match="must be > 0"):
        compress(CONTEXT, 0, model=tiny)
    with pytest.raises(ConfigError, match=r"larger than the prompt \(\d+ tokens\)"):
        compress("a short prompt", 500, model=tiny)
    with pytest.raises(ConfigError, match="must be whole"):
        compress(CONTEXT, 10.5, model=tiny)
    with pytest.raises(ConfigError, match="empty"):
        compress("   ", 0.5, model=tiny)


def test_text_without_spaces_is_kept_whole_and_said_so(tiny):
    text = "The loop runs over every element of the list. " + "循环遍历列表中的每个元素并执行语句。" * 4
    result = compress(text, 0.5, model=tiny)
    assert "循环遍历列表中的每个元素并执行语句。" * 4 in result.text
    assert any("without spaces" in w for w in result.warnings)
    assert any("above the requested" in w for w in result.warnings)  # it could not get there: said so


def test_protected_spans_go_whole_and_last(tiny):
    text = CONTEXT + 'He said "the loop keeps its last value" twice. ' * 3
    result = compress(text, 120, model=tiny)
    assert 0.98 * 120 <= result.tokens_after <= 120 and any("dropped whole" in w for w in result.warnings)
    words = result.text.split()
    assert is_subsequence(result.text, text)
    # a protected span is all there or not at all: a quoted string never loses a word, a URL never its tail
    for i, w in enumerate(words):
        if w.startswith('"') and not w.endswith(('"', '",', '".')):
            assert " ".join(words[i:i + 7]).startswith('"the loop keeps its last value"')
        if w.startswith("https://"):
            assert w.rstrip(".,") == "https://docs.python.org/3/reference/compound_stmts.html"
    # only after every ordinary word has gone: what is left is mostly protected
    prot = [u for u in units(result.text) if u.protected]
    assert len(prot) >= 0.5 * len(units(result.text))


def test_units_protect_numbers_names_quotes_code_and_urls():
    us = units('The call `f(x)` runs at 10:30 with "quoted words" in Paris; see www.python.org and max_tokens, '
               'or not the rest.')
    protected = [u.word for u in us if u.protected]
    assert protected == ["`f(x)`", "10:30", '"quoted words"', "Paris;", "www.python.org", "max_tokens,"]


def test_lint_finds_duplicates_contradictions_buried_instructions_and_counts_tokens(tokenizer):
    filler = " ".join(["The manual describes the syntax of the language in detail."] * 60)
    prompt = ("Answer in English.\nUse markdown tables.\nKeep answers short.\n" + filler +
              "\nDo not use markdown tables.\n" + filler + "\nPlease keep answers short.\n")
    found = lint(prompt, tokenizer, price_per_million=0.5)
    kinds = [(f.kind, f.line, f.other_line) for f in found]
    assert ("contradiction", 5, 2) in kinds and ("duplicate", 7, 3) in kinds
    assert ("buried", 5, None) in kinds
    total = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert found[-1].kind == "tokens" and found[-1].message.startswith(f"{total} tokens, $")
    assert [f.kind for f in lint("Answer in English. Keep it short.", tokenizer)] == ["tokens"]


def test_cli_compress_and_lint(tiny_dir, tmp_path, capsys):
    src = tmp_path / "p.txt"
    src.write_text(CONTEXT)
    assert main(["prompt", "compress", str(src), "--budget", "0.5", "--model", str(tiny_dir), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens_after"] <= out["target"] and out["text"]
    src.write_text("Use bullet points.\nNever use bullet points.\n")
    assert main(["prompt", "lint", str(src), "--model", str(tiny_dir)]) == 1
    assert re.search(r"p\.txt:2: contradiction: contradicts line 1", capsys.readouterr().out)
    assert main(["prompt", "lint", str(tmp_path / "missing.txt"), "--model", str(tiny_dir)]) != 0
    assert "does not exist" in capsys.readouterr().err
