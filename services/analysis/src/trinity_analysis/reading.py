"""Turn the bytes of an upload into a polars DataFrame.

Reading happens in two steps, so a caller can report progress between them:
`decode_dataset` picks the format and decodes text, `parse_source` parses it.

The format comes from magic bytes first, then the file name, then the content
type, because browsers label files poorly (Windows sends a ``.csv`` as
``application/vnd.ms-excel``). Text is decoded here rather than by polars: a
byte-order mark selects UTF-8 or UTF-16, anything else must be strict
UTF-8 unless ``options.encoding`` names another encoding, and the mark is
dropped, so polars always reads clean UTF-8 and no column name starts with
``\\ufeff``. Every failure is a `PermanentJobError` whose message says what to
change; no decoding or polars error escapes.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from dataclasses import dataclass
from pathlib import PurePath
from typing import TYPE_CHECKING, Final

import polars as pl
import polars.selectors as cs

from trinity_analysis.dialect import NULL_TOKENS, TSV, Dialect, sniff_dialect
from trinity_analysis.settings import DEFAULT_MAX_COLUMNS
from trinity_common.errors import PermanentJobError

if TYPE_CHECKING:
    from collections.abc import Iterator

    from trinity_analysis.options import AnalysisOptions

__all__ = [
    "Source",
    "Table",
    "decode_dataset",
    "decode_text",
    "detect_format",
    "parse_source",
]

CSV: Final = "csv"
JSONL: Final = "jsonl"
PARQUET: Final = "parquet"

_PARQUET_MAGIC: Final = b"PAR1"
_BOMS: Final = (
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
_SUFFIXES: Final = {
    ".csv": CSV, ".txt": CSV, ".tsv": TSV, ".tab": TSV,
    ".jsonl": JSONL, ".ndjson": JSONL, ".parquet": PARQUET,
}  # fmt: skip
_MEDIA_TYPES: Final = {
    "text/csv": CSV, "application/csv": CSV, "text/plain": CSV,
    "text/tab-separated-values": TSV,
    "application/x-ndjson": JSONL, "application/jsonl": JSONL, "application/x-jsonlines": JSONL,
    "application/vnd.apache.parquet": PARQUET, "application/x-parquet": PARQUET,
}  # fmt: skip
_UNSUPPORTED_MAGIC: Final = (
    (b"PK\x03\x04", "a ZIP archive or an Excel workbook"),
    (b"\xd0\xcf\x11\xe0", "an Excel 97-2003 workbook"),
    (b"\x1f\x8b", "a gzip archive"),
)
_DELIMITER_NAMES: Final = {",": "comma", ";": "semicolon", "\t": "tab", "|": "pipe"}
# The same shapes, for polars' regex engine: numbers such as 1.234,56 or 1.234.
_GROUPED_DECIMAL_COMMA: Final = r"^[+-]?\d{1,3}(\.\d{3})*(,\d+)?$"


@dataclass(frozen=True, slots=True)
class Source:
    """An upload in its detected format: decoded text, or the bytes of a binary format."""

    format: str
    content: str | bytes
    encoding: str | None


@dataclass(frozen=True, slots=True)
class Table:
    """A parsed dataset, with how it was read; the dialect is None unless delimited."""

    frame: pl.DataFrame
    format: str
    encoding: str | None
    dialect: Dialect | None


def decode_dataset(
    data: bytes, *, filename: str, content_type: str | None, options: AnalysisOptions
) -> Source:
    """Detect the format of ``data`` and decode it if it is text.

    Raises:
        PermanentJobError: the file is empty, in an unsupported format, or not
            valid in its encoding.
    """
    if not data:
        raise PermanentJobError(f"{filename!r} is empty (0 bytes)", error_type="empty_file")
    fmt = detect_format(data, filename=filename, content_type=content_type)
    if fmt == PARQUET:
        return Source(format=fmt, content=data, encoding=None)

    text, encoding = decode_text(data, encoding=options.encoding)
    if not text.strip():
        raise PermanentJobError(
            f"{filename!r} holds no data, only whitespace or a byte-order mark",
            error_type="empty_file",
        )
    return Source(format=fmt, content=text, encoding=encoding)


def detect_format(data: bytes, *, filename: str, content_type: str | None) -> str:
    """Return ``csv``, ``tsv``, ``jsonl`` or ``parquet``; delimited text by default."""
    if data.startswith(_PARQUET_MAGIC):
        return PARQUET
    for magic, what in _UNSUPPORTED_MAGIC:
        if data.startswith(magic):
            raise _unsupported(filename, what)

    suffix = PurePath(filename).suffix.lower()
    media_type = (content_type or "").partition(";")[0].strip().lower()
    fmt = _SUFFIXES.get(suffix) or _MEDIA_TYPES.get(media_type)
    if fmt == PARQUET:
        raise PermanentJobError(
            f"{filename!r} is labelled Parquet but does not start with the Parquet magic "
            "bytes PAR1; upload the file as written, not renamed or truncated",
            error_type="malformed",
        )
    if fmt is None and (suffix == ".json" or media_type == "application/json"):
        raise _unsupported(filename, "a JSON document rather than JSON lines")
    return fmt or CSV


def decode_text(data: bytes, *, encoding: str | None) -> tuple[str, str]:
    """Return the text of ``data`` without a byte-order mark, and the encoding used.

    With no ``encoding``, a byte-order mark picks the Unicode encoding and anything
    else must be UTF-8. We never guess a legacy code page: a wrong guess gives wrong
    text silently, where an error names the option that fixes it.
    """
    name = encoding or _encoding_from_bom(data)
    try:
        codec = codecs.lookup(name).name
    except LookupError as err:
        raise _unusable_encoding(name, err) from err
    try:
        text = data.decode(codec)
    except LookupError as err:  # a bytes-to-bytes codec, such as rot13
        raise _unusable_encoding(name, err) from err
    except UnicodeDecodeError as err:
        raise _undecodable(data, codec, err) from err
    except UnicodeError as err:
        # Not a fault of the data: the codec cannot read files ("undefined", "idna").
        # AnalysisOptions refuses such names, but a command may come from a gateway
        # whose Python knows other codecs; retrying would fail the same way.
        raise _unusable_encoding(name, err) from err
    if "\x00" in text:
        # Valid UTF-8, but text files hold no NUL: this is UTF-16 without a mark.
        raise PermanentJobError(
            f"the file read as {codec} contains NUL characters (the first byte 0x00 is at "
            f"byte offset {data.find(0)}), so it is likely UTF-16 without a byte-order "
            "mark; set options.encoding to 'utf-16-le' or 'utf-16-be'",
            error_type="encoding",
        )
    return text.removeprefix("\ufeff"), codec


def parse_source(
    source: Source, *, options: AnalysisOptions, max_columns: int = DEFAULT_MAX_COLUMNS
) -> Table:
    """Parse a decoded upload into a table; every missing value comes out null.

    Empty text and float NaN count as missing, so they are made null here. A file
    with more than ``max_columns`` columns is refused before it is parsed when its
    header row or Parquet schema shows it, and otherwise (JSON lines) just after.

    Raises:
        PermanentJobError: the content cannot be parsed, holds no rows, or has
            more than ``max_columns`` columns.
    """
    dialect = None
    if isinstance(source.content, bytes):
        _require_width(_parquet_width(source.content), max_columns)
        frame = _read_parquet(source.content)
    elif source.format == JSONL:
        frame = _read_json_lines(source.content)
    else:
        text, dialect = sniff_dialect(source.content, fmt=source.format, options=options)
        _require_width(_first_row_width(text, dialect.delimiter), max_columns)
        frame = _read_delimited(text, dialect)
    _require_width(frame.width, max_columns)

    frame = frame.with_columns(cs.string().replace("", None), cs.float().fill_nan(None))
    if dialect is not None and dialect.decimal_comma:
        frame = _parse_grouped_numbers(frame)
    _require_rows(frame)
    return Table(frame=frame, format=source.format, encoding=source.encoding, dialect=dialect)


def _encoding_from_bom(data: bytes) -> str:
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            return encoding
    return "utf-8"


def _unusable_encoding(name: str, err: Exception) -> PermanentJobError:
    return PermanentJobError(
        f"options.encoding {name!r} cannot decode a file ({err}); set it to a text "
        "encoding such as 'utf-8', 'cp1252' or 'latin-1'",
        error_type="encoding",
    )


def _undecodable(data: bytes, codec: str, err: UnicodeDecodeError) -> PermanentJobError:
    try:
        line = data[: err.start].decode(codec, errors="replace").count("\n") + 1
    except UnicodeError as replace_err:
        return _unusable_encoding(codec, replace_err)  # "idna" refuses "replace"
    return PermanentJobError(
        f"the file is not valid {codec}: byte 0x{data[err.start]:02X} at byte offset "
        f"{err.start} (line {line}) cannot be decoded ({err.reason}); set "
        "options.encoding to the encoding it was saved in, for example 'cp1252' for a "
        "Western European Windows export, or save it again as UTF-8",
        error_type="encoding",
    )


def _unsupported(filename: str, what: str) -> PermanentJobError:
    return PermanentJobError(
        f"{filename!r} looks like {what}, which cannot be profiled; upload CSV, TSV, "
        "JSON lines or Parquet (from a spreadsheet, save the sheet as 'CSV UTF-8')",
        error_type="unsupported_format",
    )


def _read_delimited(text: str, dialect: Dialect) -> pl.DataFrame:
    try:
        return pl.read_csv(
            io.BytesIO(text.encode()),
            separator=dialect.delimiter,
            has_header=dialect.has_header,
            decimal_comma=dialect.decimal_comma,
            encoding="utf8",
            null_values=list(NULL_TOKENS),
            # Infer from every row: a text value after the first rows must not fail the parse.
            infer_schema_length=None,
            try_parse_dates=True,
        )
    except pl.exceptions.PolarsError as err:
        raise _malformed_delimited(text, dialect, err) from err


def _malformed_delimited(text: str, dialect: Dialect, err: Exception) -> PermanentJobError:
    name = _DELIMITER_NAMES.get(dialect.delimiter, repr(dialect.delimiter))
    advice = f"fix the file, or set options.delimiter if its fields are not {name}-separated"
    found = _find_ragged_row(text, dialect.delimiter)
    if found is None:
        reason = str(err).split("\n", 1)[0]
        message = f"the file cannot be read as {name}-separated text ({reason}); {advice}"
        return PermanentJobError(message, error_type="malformed")

    line, width, expected = found
    if width == 0:
        message = f"line {line} opens a quote it never closes, or has text after one; {advice}"
        return PermanentJobError(message, error_type="malformed")
    if line == 2 and dialect.has_header:
        message = (
            f"the first line names {expected} column(s) but line 2 has {width} fields: the "
            "file must start with its header row, so remove any title line above it; "
            f"{advice}"
        )
        return PermanentJobError(message, error_type="no_header")
    message = f"line {line} has {width} fields where the first row has {expected}; {advice}"
    return PermanentJobError(message, error_type="malformed")


def _find_ragged_row(text: str, delimiter: str) -> tuple[int, int, int] | None:
    """Return the line, width and expected width of the first row wider than the first.

    A quoting fault is reported at the line where the reader gave up, with width 0.
    This only explains a parse that already failed, so its cost does not matter.
    """
    reader = csv.reader(io.StringIO(text), delimiter=delimiter, strict=True)
    expected = 0
    try:
        for row in reader:
            if expected and len(row) > expected:
                return reader.line_num, len(row), expected
            expected = expected or len(row)
    except csv.Error:
        return reader.line_num, 0, expected
    return None


def _parse_grouped_numbers(frame: pl.DataFrame) -> pl.DataFrame:
    """Read text columns of numbers like ``1.234,56`` as floats.

    polars' ``decimal_comma`` reads ``2,5`` but leaves thousands separators as text.
    """
    grouped = [
        name
        for name, dtype in frame.schema.items()
        if dtype == pl.String
        and frame[name].null_count() < frame.height
        and frame[name].drop_nulls().str.contains(_GROUPED_DECIMAL_COMMA).all()
    ]
    return frame.with_columns(
        pl.col(grouped)
        .str.replace_all(".", "", literal=True)
        .str.replace(",", ".", literal=True)
        .cast(pl.Float64)
    )


def _read_json_lines(text: str) -> pl.DataFrame:
    try:
        return pl.read_ndjson(io.BytesIO(text.encode()), infer_schema_length=None)
    except pl.exceptions.PolarsError as err:
        line = _find_bad_json_line(text)
        where = f" at line {line}" if line else ""
        raise PermanentJobError(
            f"the file is not valid JSON lines{where}: {str(err).splitlines()[0]}; each "
            "line must hold one JSON object",
            error_type="malformed",
        ) from err


def _find_bad_json_line(text: str) -> int | None:
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            if line.strip() and not isinstance(json.loads(line), dict):
                return number
        except ValueError:
            return number
    return None


def _read_parquet(data: bytes) -> pl.DataFrame:
    try:
        return pl.read_parquet(io.BytesIO(data))
    except pl.exceptions.PolarsError as err:
        raise _unreadable_parquet(err) from err


def _parquet_width(data: bytes) -> int:
    try:
        return len(pl.read_parquet_schema(io.BytesIO(data)))
    except pl.exceptions.PolarsError as err:
        raise _unreadable_parquet(err) from err


def _unreadable_parquet(err: Exception) -> PermanentJobError:
    return PermanentJobError(
        f"the file is not a readable Parquet file: {str(err).splitlines()[0]}; "
        "upload it again as written by its tool, not truncated or edited",
        error_type="malformed",
    )


def _first_row_width(text: str, delimiter: str) -> int:
    """Return the number of fields in the first row, reading no further than it."""
    try:
        return len(next(csv.reader(_lines(text), delimiter=delimiter), []))
    except csv.Error:
        return 0  # the parse that follows reports the fault, with its line


def _lines(text: str) -> Iterator[str]:
    """Yield the lines of ``text`` one at a time, without copying all of it first."""
    start = 0
    while start < len(text):
        end = text.find("\n", start) + 1 or len(text)
        yield text[start:end]
        start = end


def _require_width(width: int, max_columns: int) -> None:
    if width > max_columns:
        raise PermanentJobError(
            f"the file has {width:,} columns, more than the {max_columns:,} this service "
            "profiles; upload only the columns you need, or split the file into narrower "
            "ones (the limit is the analysis service's TRINITY_ANALYSIS_MAX_COLUMNS setting)",
            error_type="too_wide",
        )


def _require_rows(frame: pl.DataFrame) -> None:
    if frame.width == 0:
        raise PermanentJobError("the file has no columns", error_type="empty_file")
    if frame.height == 0:
        raise PermanentJobError(
            f"the file names {frame.width} column(s) but holds no data rows; upload a file "
            "with at least one row (if the only line of a delimited file is data, set "
            "options.has_header to false)",
            error_type="no_rows",
        )
