"""Corpus files to documents: decode, split into records, and classify bad input (no Ray, no torch).

`parse_file` turns the bytes of one file into `(doc_id, text)` documents plus a list of
problems, each `(kind, one-line message naming the file and line)`. The Ray Data pipeline
calls it inside its read tasks and the single-process path calls it directly, so both see
the same documents. What happens to a problem (raise or skip and count) is the caller's
choice (`data.on_error`); skipped problems are counted in a `BadInputTally`.

Document ids are stable across machines and runs: the path relative to the source root for
`text`, `path:line` for `lines` and `jsonl` (1-based), `path:row` for `parquet` (0-based).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from raylm.data.corpus import is_validation
from raylm.errors import DataError

BAD_INPUT_KINDS = (
    "empty_file",
    "binary_file",
    "unreadable_file",
    "invalid_utf8",
    "malformed_json",
    "missing_field",
    "missing_column",
    "empty_document",
    "oversized_document",
    "nul_character",
)
"""Every kind of bad input, in the order summaries list them."""

_BINARY_PROBE_BYTES = 8192


@dataclass(frozen=True)
class FileSpec:
    """How to read one file: where it is shown, its format and how its documents are named."""

    path: str
    """The path as the filesystem knows it (shown in messages)."""
    format: str
    """text | lines | jsonl | parquet | pairs | chat"""
    id_base: str
    """Document id of the file (text) or the prefix of its documents' ids."""
    field: str = "text"
    column: str = "text"
    max_document_bytes: int = 16 * 2**20
    lenient: bool = False
    """The default corpus: undecodable bytes are replaced and empty files skipped silently, as
    `raylm.data.corpus` has always read the standard library."""
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    """pairs: the JSONL keys of the prompt (no loss) and the completion (trained)."""
    messages_field: str = "messages"
    template: str = "chatml"
    """chat: the JSONL key of the message list and the name of the template that renders it."""


Problem = tuple[str, str]  # (kind, message)


class BadInputTally:
    """Bad input skipped (distinct messages per kind) and documents read, for the run's summary.

    Pure: the single-process path uses it directly and the Ray path wraps it as an actor.
    """

    def __init__(self):
        self._messages: dict[str, dict[str, None]] = {}  # kind -> distinct messages, first seen first
        self._merged: dict[str, int] = {}  # kind -> count from merged reports
        self._examples: dict[str, str] = {}  # kind -> first message seen, added or merged
        self.documents = 0

    def add(self, problems: list[Problem], documents: int = 0) -> None:
        self.documents += documents
        for kind, message in problems:
            self._messages.setdefault(kind, {})[message] = None
            self._examples.setdefault(kind, message)

    def problems(self) -> list[Problem]:
        """The distinct problems added (not merged), first seen first: what another tally's `add` takes."""
        return [(kind, message) for kind, messages in self._messages.items() for message in messages]

    def merge(self, report: dict) -> None:
        """Add another tally's `report()` (of other files: its messages are not compared with ours)."""
        self.documents += report["documents"]
        for kind, n in report["skipped"].items():
            self._merged[kind] = self._merged.get(kind, 0) + n
            self._examples.setdefault(kind, report["examples"][kind])

    def report(self) -> dict:
        """{"documents": n, "skipped": {kind: n}, "examples": {kind: first message}}, kinds in
        BAD_INPUT_KINDS order (a kind outside it last rather than lost)."""
        order = {kind: i for i, kind in enumerate(BAD_INPUT_KINDS)}
        kinds = sorted(self._examples, key=lambda k: order.get(k, len(order)))  # stable: others as first seen
        return {
            "documents": self.documents,
            "skipped": {k: len(self._messages.get(k, ())) + self._merged.get(k, 0) for k in kinds},
            "examples": {k: self._examples[k] for k in kinds},
        }


def parse_file(data: bytes, spec: FileSpec) -> tuple[list[tuple[str, str]], list[Problem]]:
    """The documents of one file in file order, and the problems met (never raises on bad input)."""
    if spec.lenient:
        text = data.decode("utf-8", errors="replace")
        return ([(spec.id_base, text)] if text.strip() else []), []
    if not data:
        return [], [("empty_file", f"{spec.path}: empty file")]
    if spec.format == "parquet":
        return _parse_parquet(data, spec)
    nul = data.find(b"\0", 0, _BINARY_PROBE_BYTES)
    if nul >= 0:
        return [], [("binary_file", f"{spec.path}: binary file (NUL byte at offset {nul}), not {spec.format} text")]
    if spec.format == "text":
        return _parse_text(data, spec)
    return _parse_lines(data, spec)


def _too_big(size: int, spec: FileSpec, where: str) -> Problem:
    return ("oversized_document",
            f"{where}: document of {size:,} bytes exceeds data.max_document_bytes={spec.max_document_bytes:,}")


def _decode(data: bytes, where: str) -> tuple[str | None, Problem | None]:
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as e:
        return None, ("invalid_utf8", f"{where}: invalid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})")


def _load_json(line: str, where: str) -> tuple[object, Problem | None]:
    try:
        return json.loads(line), None
    except json.JSONDecodeError as e:
        return None, ("malformed_json", f"{where}: malformed JSON ({e.msg} at column {e.colno})")
    except RecursionError:
        # The C decoder stops at the recursion limit (about 1,000 levels) and unwinds cleanly,
        # so '[' * 10**6 costs microseconds and leaves the interpreter as it was.
        return None, ("malformed_json", f"{where}: malformed JSON (nested too deeply)")
    except ValueError as e:  # a number beyond Python's int digit limit (sys.get_int_max_str_digits)
        return None, ("malformed_json", f"{where}: malformed JSON ({str(e).split(';')[0].splitlines()[0]})")


def _lone_surrogate(value: str, where: str) -> Problem | None:
    """A JSON escape may spell half a surrogate pair (\\ud800): a str that no UTF-8 encoder, sentencepiece
    included, accepts."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        return ("invalid_utf8",
                f"{where}: invalid text (lone surrogate \\u{ord(value[e.start]):04x} at character {e.start})")
    return None


def _parse_text(data: bytes, spec: FileSpec):
    if len(data) > spec.max_document_bytes:
        return [], [_too_big(len(data), spec, spec.path)]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        return [], [("invalid_utf8", f"{spec.path}:{line}: invalid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})")]
    if not text.strip():
        return [], [("empty_document", f"{spec.path}: empty document (only whitespace)")]
    return [(spec.id_base, text)], []


def _parse_lines(data: bytes, spec: FileSpec):
    docs, problems = [], []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue  # blank lines separate records; they are not documents
        where = f"{spec.path}:{number}"
        if len(raw) > spec.max_document_bytes:
            problems.append(_too_big(len(raw), spec, where))
            continue
        line, problem = _decode(raw.rstrip(b"\r"), where)
        if problem is not None:
            problems.append(problem)
            continue
        doc_id = f"{spec.id_base}:{number}"
        if spec.format == "lines":
            if line.startswith(SEGMENT):
                problems.append(_nul(where, "line"))
            else:
                docs.append((doc_id, line))
            continue
        record, problem = _load_json(line, where)
        if problem is not None:
            problems.append(problem)
            continue
        if spec.format in SUPERVISED_FORMATS:
            doc, problem = _supervised_document(record, spec, where)
            if problem is not None:
                problems.append(problem)
            else:
                docs.append((doc_id, doc))
            continue
        if not isinstance(record, dict) or spec.field not in record:
            what = "record" if isinstance(record, dict) else f"JSON {type(record).__name__}, not an object,"
            problems.append(("missing_field", f"{where}: {what} has no field {spec.field!r} (data.sources.*.field)"))
            continue
        value = record[spec.field]
        if not isinstance(value, str):
            problems.append(("missing_field",
                             f"{where}: field {spec.field!r} holds {type(value).__name__}, expected a string"))
        elif not value.strip():
            problems.append(("empty_document", f"{where}: empty document (field {spec.field!r} is blank)"))
        elif (surrogate := _lone_surrogate(value, where)) is not None:
            problems.append(surrogate)
        elif len(value) > spec.max_document_bytes:
            problems.append(_too_big(len(value.encode()), spec, where))
        elif value.startswith(SEGMENT):
            problems.append(_nul(where, spec.field))
        else:
            docs.append((doc_id, value))
    return docs, problems


def _nul(where: str, field: str) -> Problem:
    return ("nul_character", f"{where}: field {field!r} holds a NUL character (\\u0000), which raylm reserves")


def _string_field(record: dict, key: str, where: str, option: str, allow_blank: bool = False
                  ) -> tuple[str | None, Problem | None]:
    if key not in record:
        return None, ("missing_field", f"{where}: record has no field {key!r} ({option})")
    value = record[key]
    if not isinstance(value, str):
        return None, ("missing_field", f"{where}: field {key!r} holds {type(value).__name__}, expected a string")
    if not allow_blank and not value.strip():
        return None, ("empty_document", f"{where}: empty document (field {key!r} is blank)")
    if SEGMENT in value:
        return None, _nul(where, key)
    return value, _lone_surrogate(value, where)


def _supervised_document(record: object, spec: FileSpec, where: str) -> tuple[str, Problem | None]:
    """A pairs or chat record as one supervised document (`supervised_document`), or its problem."""
    if not isinstance(record, dict):
        return "", ("missing_field", f"{where}: JSON {type(record).__name__}, not an object, is not a "
                                     f"{spec.format} record")
    if spec.format == "pairs":
        prompt, problem = _string_field(record, spec.prompt_field, where, "data.sources.*.prompt_field",
                                        allow_blank=True)
        if problem is not None:
            return "", problem
        completion, problem = _string_field(record, spec.completion_field, where, "data.sources.*.completion_field")
        if problem is not None:
            return "", problem
        segments = [prompt, completion]
    else:
        from raylm.data.chat import render_segments

        messages = record.get(spec.messages_field)
        if messages is None:
            return "", ("missing_field", f"{where}: record has no field {spec.messages_field!r} "
                                         f"(data.sources.*.messages_field)")
        segments, message = render_segments(messages, spec.template)
        if message is not None:
            return "", ("missing_field", f"{where}: field {spec.messages_field!r}: {message}")
        if any(SEGMENT in seg for seg in segments):
            return "", _nul(where, spec.messages_field)
        for seg in segments:
            if (surrogate := _lone_surrogate(seg, where)) is not None:
                return "", surrogate
    doc = supervised_document(segments)
    if len(doc) > spec.max_document_bytes:
        return "", _too_big(len(doc.encode()), spec, where)
    return doc, None


SUPERVISED_FORMATS = ("pairs", "chat")
SEGMENT = "\0"
"""Opens a supervised document and separates its segments. A NUL never reaches training inside
text (text files with one are binary; a record or cell holding a leading one is bad input), so
a document that starts with it is unambiguously supervised."""


def supervised_document(segments: list[str]) -> str:
    """Segments alternating no-loss (even: prompt, template text) and trained (odd: completion,
    assistant turn) as one document string, which travels through every data path as text does."""
    return SEGMENT + SEGMENT.join(segments)


def document_segments(text: str) -> list[str] | None:
    """The segments of a supervised document, or None for plain text."""
    return text[1:].split(SEGMENT) if text.startswith(SEGMENT) else None


def plain_text(text: str) -> str:
    """The text a document renders to (segments joined): what the tokenizer is trained on."""
    return text.replace(SEGMENT, "") if text.startswith(SEGMENT) else text


def _parse_parquet(data: bytes, spec: FileSpec):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(io.BytesIO(data))
    except (pa.ArrowException, OSError) as e:
        return [], [("unreadable_file", f"{spec.path}: not a Parquet file ({str(e).splitlines()[0]})")]
    if spec.column not in schema.names:
        return [], [("missing_column", f"{spec.path}: no column {spec.column!r} (columns: {', '.join(schema.names)})")]
    column_type = schema.field(spec.column).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)
            or pa.types.is_binary(column_type) or pa.types.is_large_binary(column_type)):
        return [], [("missing_column", f"{spec.path}: column {spec.column!r} has type {column_type}, expected string")]
    values = pq.read_table(io.BytesIO(data), columns=[spec.column]).column(0).to_pylist()
    if not values:
        return [], [("empty_file", f"{spec.path}: empty file (no rows)")]
    docs, problems = [], []
    for row, value in enumerate(values):
        where = f"{spec.path}:row {row}"
        if isinstance(value, bytes):
            if len(value) > spec.max_document_bytes:
                problems.append(_too_big(len(value), spec, where))
                continue
            value, problem = _decode(value, where)
            if problem is not None:
                problems.append(problem)
                continue
        if value is None or not value.strip():
            problems.append(("empty_document", f"{where}: empty document (column {spec.column!r} is null or blank)"))
        elif len(value) > spec.max_document_bytes:
            problems.append(_too_big(len(value.encode()), spec, where))
        elif value.startswith(SEGMENT):
            problems.append(_nul(where, spec.column))
        else:
            docs.append((f"{spec.id_base}:{row}", value))
    return docs, problems


def split_documents(files: Iterable[tuple[bytes, FileSpec]], split: str, val_fraction: float, on_error: str
                    ) -> tuple[list[tuple[str, str]], list[Problem]]:
    """The documents of `split` in the given files, in order, and the bad input skipped.

    The one parse loop: Ray Data's read tasks and the single-process path both call it. With
    on_error="raise" the first problem raises DataError (one line naming file and line)."""
    kept: list[tuple[str, str]] = []
    problems: list[Problem] = []
    for data, spec in files:
        docs, bad = parse_file(data, spec)
        if bad and on_error == "raise":
            raise DataError(bad[0][1])
        problems.extend(bad)
        # A text file's split was decided by the plan (raylm.data.plan.heldout_text_files).
        kept.extend((doc_id, text) for doc_id, text in docs
                    if spec.format == "text" or is_validation(doc_id, val_fraction) == (split == "validation"))
    return kept, problems


def read_documents(files: Iterable[tuple[str, FileSpec]], filesystem, split: str, val_fraction: float,
                   on_error: str, tally: BadInputTally | None = None) -> Iterator[list[tuple[str, str]]]:
    """Each file's (doc_id, text) documents of `split`, file by file in the given order, each file
    read whole when the caller asks for it and not before.

    The one reader of planned files: the single-process path (`raylm.data.local`), `raylm eval`
    and Ray Data's read tasks (`raylm.ray.stages`) all call it. `files`: (path, FileSpec) pairs
    of a file plan; `filesystem`: the plan's pyarrow filesystem. Bad input raises DataError
    (on_error="raise") or is added to `tally` and skipped."""
    for path, spec in files:
        with filesystem.open_input_stream(path) as stream:
            data = stream.read()
        docs, problems = split_documents([(data, spec)], split, val_fraction, on_error)
        if tally is not None:
            tally.add(problems, len(docs))
        yield docs


def json_lines(lines: Iterable[str], where: str) -> Iterator[tuple[int, object]]:
    """(line number from 1, parsed value) of each non-blank line of a small JSONL file that a
    command reads whole (`raylm generate --prompts`, `raylm eval --task` examples); the first
    line that is not JSON raises DataError "<where> line N: not JSON"."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise DataError(f"{where} line {number}: not JSON") from None
        yield number, record


def sample_priority(seed: int, doc_id: str) -> float:
    """A seeded uniform number per document: the tokenizer sample is the lowest-priority documents."""
    digest = hashlib.blake2b(f"{seed}\0{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64
