"""Sniffing how a delimited text file is written: delimiter, header, decimal mark.

Each guess is made on a sample of the first lines and gives way to the option a
client set. The delimiter is csv.Sniffer's pick among the usual four; the
header and the decimal mark come from how the sampled cells look.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from trinity_analysis.options import AnalysisOptions

__all__ = ["NULL_TOKENS", "TSV", "Dialect", "sniff_dialect"]

TSV: Final = "tsv"

# Values read as missing in delimited text, as pandas and R write them. A text
# column holding the literal "NA" (Namibia, say) loses those values: the price
# of reading R and pandas exports correctly.
NULL_TOKENS: Final = ("NA", "N/A", "n/a", "#N/A", "NaN", "nan", "NULL", "null", "None")

_DELIMITERS: Final = ",;\t|"
# Sniff on the first lines only: csv.Sniffer's cost grows quickly with the sample.
_SAMPLE_CHARS: Final = 64 * 1024
_SAMPLE_LINES: Final = 50
_EXCEL_SEPARATOR_LINE: Final = re.compile(r"sep=(.)\r?\n")
_NUMBER: Final = re.compile(
    r"[+-]?(?:\d+(?:[.,]\d+)?|[.,]\d+|\d{1,3}(?:[.,]\d{3})+(?:[.,]\d+)?)(?:[eE][+-]?\d+)?"
)
_COMMA_DECIMAL: Final = re.compile(r"[+-]?(?:\d+|\d{1,3}(?:\.\d{3})+),\d+")
_POINT_DECIMAL: Final = re.compile(r"[+-]?\d*\.\d+(?:[eE][+-]?\d+)?")
_POINT_THOUSANDS: Final = re.compile(r"[+-]?\d{1,3}(?:\.\d{3})+")


@dataclass(frozen=True, slots=True)
class Dialect:
    """How a delimited text file is written."""

    delimiter: str
    has_header: bool
    decimal_comma: bool


def sniff_dialect(text: str, *, fmt: str, options: AnalysisOptions) -> tuple[str, Dialect]:
    """Return the text to parse and its dialect, taking each option given over a guess.

    An Excel ``sep=;`` first line sets the delimiter and is removed from the text.
    Old Mac line endings (a lone CR) become LF, which polars reads.
    """
    if "\n" not in text:
        text = text.replace("\r", "\n")
    delimiter: str | None = options.delimiter
    if found := _EXCEL_SEPARATOR_LINE.match(text):
        text = text[found.end() :]
        delimiter = delimiter or found.group(1)

    sample = _sample(text)
    if delimiter is None:
        delimiter = "\t" if fmt == TSV else _sniff_delimiter(sample)
    rows = _sample_rows(sample, delimiter)
    has_header = options.has_header
    if has_header is None:
        has_header = _sniff_header(rows)
    decimal_comma = options.decimal_comma
    if decimal_comma is None:
        decimal_comma = _infer_decimal_comma(rows, delimiter)
    return text, Dialect(delimiter=delimiter, has_header=has_header, decimal_comma=decimal_comma)


def _sample(text: str) -> str:
    head = text[:_SAMPLE_CHARS]
    if len(text) > len(head) and "\n" in head:
        head = head[: head.rindex("\n")]  # drop the row the cut went through
    return "\n".join(head.split("\n", _SAMPLE_LINES)[:_SAMPLE_LINES])


def _sniff_delimiter(sample: str) -> str:
    try:
        return csv.Sniffer().sniff(sample, delimiters=_DELIMITERS).delimiter
    except csv.Error:
        # No candidate occurs consistently: most often a single column.
        return ","


def _sample_rows(sample: str, delimiter: str) -> list[list[str]]:
    try:
        return [row for row in csv.reader(io.StringIO(sample), delimiter=delimiter) if row]
    except csv.Error:
        return []  # the parse that follows reports the fault, with its line


def _sniff_header(rows: list[list[str]]) -> bool:
    """Return whether the first row names the columns rather than holding data.

    It is a header when it has text where the column below holds only numbers, and
    data when it holds only numbers or matches the numeric columns below. A table
    with no numeric column gives no evidence and is taken to have a header, as
    nearly every export does; ``csv.Sniffer.has_header`` answers the opposite for
    such tables, and re-sniffs the delimiter on its own, so it is not used.
    """
    if not rows:
        return True
    first, body = rows[0], rows[1:]
    if all(_is_number(cell) or _is_blank(cell) for cell in first):
        return False
    numeric = [index for index in range(len(first)) if _is_numeric_column(body, index)]
    if not numeric:
        return True
    return any(not _is_number(first[index]) for index in numeric)


def _is_numeric_column(rows: list[list[str]], index: int) -> bool:
    cells = [row[index] for row in rows if len(row) > index and not _is_blank(row[index])]
    return bool(cells) and all(_is_number(cell) for cell in cells)


def _is_number(cell: str) -> bool:
    return _NUMBER.fullmatch(cell.strip()) is not None


def _is_blank(cell: str) -> bool:
    return not cell.strip() or cell in NULL_TOKENS


def _infer_decimal_comma(rows: list[list[str]], delimiter: str) -> bool:
    """Return whether numbers use a decimal comma, as in ``2,5`` or ``1.234,56``.

    Only when the delimiter is not a comma, and some cell is such a number while
    none is an unambiguous point decimal; ``1.234`` may be either and is ignored.
    """
    if delimiter == ",":
        return False
    cells = [cell.strip() for row in rows for cell in row]
    has_comma = any(_COMMA_DECIMAL.fullmatch(cell) for cell in cells)
    has_point = any(
        _POINT_DECIMAL.fullmatch(cell) and not _POINT_THOUSANDS.fullmatch(cell) for cell in cells
    )
    return has_comma and not has_point
