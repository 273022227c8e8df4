"""Records as the cleaner sees them, read from and written back to the user's formats.

A `.txt` file's records are its blank-line-separated paragraphs; a `.jsonl` or `.parquet` record is an object
with `text`, chat `messages`, or `prompt` and `completion`. Chat and prompt/completion records also carry
their prompt (every turn before the last assistant turn) and answer (that turn), which the conflict stage
compares. Errors name the file and line."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from leanlm.errors import DataError

SUFFIXES = (".txt", ".jsonl", ".parquet")
_PARAGRAPH = re.compile(r"\n(?:[ \t]*\n)+")


@dataclass
class Record:
    source: str        # the input file
    index: int         # 0-based position among that file's records
    raw: Any           # the record as read: a str paragraph or a JSON object
    text: str          # what duplicates and filters look at
    prompt: str | None = None
    answer: str | None = None
    where: str = ""    # file:line, for messages
    line: str | None = None  # a JSONL record's line as read: a kept, unchanged record is written back as is


def input_files(inputs: list[str | Path]) -> list[tuple[Path, Path]]:
    """(file, its path relative to the output directory) for every input, refused before any work when a path
    is missing, has an unknown type, or is a directory with no readable file."""
    if not inputs:
        raise DataError("no input given: name one or more .txt/.jsonl/.parquet files or directories")
    out = []
    for source in inputs:
        path = Path(source).expanduser()
        if not path.exists():
            raise DataError(f"input {path} does not exist")
        if path.is_dir():
            files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in SUFFIXES)
            if not files:
                raise DataError(f"input directory {path} holds no {', '.join(SUFFIXES)} file")
            out += [(f, Path(path.name) / f.relative_to(path)) for f in files]
        elif path.suffix not in SUFFIXES:
            raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(SUFFIXES)}")
        else:
            out.append((path, Path(path.name)))
    names = [rel for _, rel in out]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise DataError(f"two inputs would both be written as {dup}; rename one or put them in one directory")
    return out


def read_records(path: Path, wanted=None) -> Iterator[tuple[int, Record | None]]:
    """(index, record) for each record of `path`; with `wanted` (a set of indices) the others come back as
    None without being parsed, so a pass that needs a few records does not pay for decoding them all."""
    source = str(path)
    for index, where, payload in read_raw(path):
        yield index, (to_record(path.suffix, source, index, where, payload)
                      if wanted is None or index in wanted else None)


def read_raw(path: Path) -> Iterator[tuple[int, str, Any]]:
    """(index, file:line, payload) with only the framing done: a JSONL line still as text, a paragraph, a
    parquet row. Parsing is `to_record`'s, so worker processes can share it."""
    reader = {".txt": _read_txt, ".jsonl": _read_jsonl, ".parquet": _read_parquet}[path.suffix]
    yield from reader(path)


def to_record(suffix: str, source: str, index: int, where: str, payload: Any) -> Record:
    if suffix == ".txt":
        return Record(source, index, payload, payload, where=where)
    if suffix == ".jsonl":
        try:
            obj = json.loads(payload)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from err
        return parse_record(obj, source, index, where, payload)
    return parse_record(payload, source, index, where)


def _read_txt(path: Path) -> Iterator[tuple[int, str, str]]:
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 text ({err.reason})") from err
    index, line, pos = 0, 1, 0
    for m in [*_PARAGRAPH.finditer(content), None]:
        end = m.start() if m else len(content)
        para = content[pos:end].strip("\n")
        if para.strip():
            yield index, f"{path}:{line}", para
            index += 1
        if m:
            line += content[pos:m.end()].count("\n")
            pos = m.end()


def _read_jsonl(path: Path) -> Iterator[tuple[int, str, str]]:
    index, lineno = 0, 0
    with open(path, encoding="utf-8") as fh:
        try:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                yield index, f"{path}:{lineno}", line
                index += 1
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not valid UTF-8 after line {lineno}") from err


def _read_parquet(path: Path) -> Iterator[tuple[int, str, dict]]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several unrelated types for corrupt files
        raise DataError(f"{path}: not a readable parquet file ({err})") from err
    index = 0
    for batch in table.iter_batches(batch_size=4096):
        for obj in batch.to_pylist():
            yield index, f"{path}: row {index + 1}", obj
            index += 1


def parse_record(obj: Any, source: str, index: int, where: str, line: str | None = None) -> Record:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with 'text', 'messages' or 'prompt'/'completion', "
                        f"got {type(obj).__name__}")
    if "messages" in obj:
        msgs = obj["messages"]
        if not (isinstance(msgs, list) and msgs and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                        and isinstance(m.get("content"), str) for m in msgs)):
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role': str, 'content': str}} objects")
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        text = "\n".join(m["content"] for m in msgs)
        if last is None:
            return Record(source, index, obj, text, where=where, line=line)
        prompt = "\n".join(m["content"] for m in msgs[:last] if m["role"] != "system") or ""
        return Record(source, index, obj, text, prompt, msgs[last]["content"], where, line)
    if "prompt" in obj or "completion" in obj:
        for name in ("prompt", "completion"):
            if not isinstance(obj.get(name), str):
                raise DataError(f"{where}: '{name}' must be a string, got {type(obj.get(name)).__name__}")
        return Record(source, index, obj, obj["prompt"] + "\n" + obj["completion"], obj["prompt"], obj["completion"],
                      where, line)
    if "text" in obj:
        if not isinstance(obj["text"], str):
            raise DataError(f"{where}: 'text' must be a string, got {type(obj['text']).__name__}")
        return Record(source, index, obj, obj["text"], where=where, line=line)
    raise DataError(f"{where}: record has none of 'text', 'messages', 'prompt'/'completion' (fields: {sorted(obj)})")


def map_strings(raw: Any, fn) -> Any:
    """The record with `fn` applied to every string it holds (a paragraph, or an object's string values)."""
    if isinstance(raw, str):
        return fn(raw)
    if isinstance(raw, dict):
        return {k: map_strings(v, fn) for k, v in raw.items()}
    if isinstance(raw, list):
        return [map_strings(v, fn) for v in raw]
    return raw


class Writer:
    """Kept records into one output file in its input's format. A parquet output keeps its input's schema and is
    written a row group at a time, so memory holds one group, not the file."""

    _GROUP = 4096

    def __init__(self, path: Path, source: Path):
        self.path, self.suffix, self.rows = path, source.suffix, []
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = None if self.suffix == ".parquet" else open(path, "w", encoding="utf-8")
        self.first, self.parquet = True, None
        if self.suffix == ".parquet":
            import pyarrow.parquet as pq

            self.schema = pq.ParquetFile(source).schema_arrow

    def write(self, raw: Any, line: str | None = None) -> None:
        """`line`, when given, is the record's JSONL line as read: written back byte for byte."""
        if self.suffix == ".txt":
            self.fh.write(("" if self.first else "\n\n") + raw.strip("\n"))
        elif self.suffix == ".jsonl":
            self.fh.write(line.rstrip("\r\n") + "\n" if line is not None else json.dumps(raw, ensure_ascii=False) + "\n")
        else:
            self.rows.append(raw)
            if len(self.rows) >= self._GROUP:
                self._flush()
        self.first = False

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.parquet is None:
            self.parquet = pq.ParquetWriter(self.path, self.schema)
        self.parquet.write_table(pa.Table.from_pylist(self.rows, schema=self.schema))
        self.rows = []

    def close(self) -> None:
        if self.fh:
            if self.suffix == ".txt" and not self.first:
                self.fh.write("\n")
            self.fh.close()
            return
        if self.rows or self.parquet is None:
            self._flush()
        self.parquet.close()
