"""Reading uploads: formats, encodings and dialects, and the errors users see.

Each test profiles real bytes in the shape a tool writes them (Excel's exports, R,
polars' Parquet writer) and checks what was read, or the exact error raised.
"""

from __future__ import annotations

import codecs
import io
from typing import Any

import polars as pl
import pytest

from trinity_analysis.options import AnalysisOptions
from trinity_analysis.profile import profile_dataset
from trinity_analysis.reading import decode_text
from trinity_analysis.settings import DEFAULT_MAX_COLUMNS
from trinity_common.errors import PermanentJobError

# Excel's "CSV (semicolon)" in a German locale: decimal comma, point thousands, CRLF.
GERMAN_CSV = "Region;Umsatz;Menge\r\nNord;1.234,56;3\r\nSüd;980,5;4\r\nOst;12,25;5\r\n".encode()
# Excel's "Unicode text": UTF-16 LE with a byte-order mark, tab-separated, CRLF.
EXCEL_UNICODE_TEXT = codecs.BOM_UTF16_LE + "name\tscore\r\nZoë\t1.5\r\nÅsa\t2.5\r\n".encode(
    "utf-16-le"
)
WINDOWS_CSV = "name,city\r\nJosé,Málaga\r\nRenée,Orléans\r\n".encode("cp1252")


def profile(
    data: bytes, *, filename: str = "data.csv", content_type: str | None = None, **options: Any
) -> dict[str, Any]:
    return profile_dataset(
        data, filename=filename, content_type=content_type, options=AnalysisOptions(**options)
    )


def reading_of(result: dict[str, Any]) -> dict[str, Any]:
    keys = ("format", "encoding", "delimiter", "has_header", "decimal_comma", "row_count")
    return {key: result[key] for key in keys}


def column(result: dict[str, Any], name: str) -> dict[str, Any]:
    return next(column for column in result["columns"] if column["name"] == name)


def failure_of(data: bytes, *, filename: str = "data.csv", **options: Any) -> PermanentJobError:
    with pytest.raises(PermanentJobError) as caught:
        profile(data, filename=filename, **options)
    return caught.value


class TestDelimitedText:
    def test_semicolon_file_with_decimal_comma_is_read_as_numbers(self) -> None:
        result = profile(GERMAN_CSV)

        assert reading_of(result) == {
            "format": "csv",
            "encoding": "utf-8",
            "delimiter": ";",
            "has_header": True,
            "decimal_comma": True,
            "row_count": 3,
        }
        assert [column["name"] for column in result["columns"]] == ["Region", "Umsatz", "Menge"]
        assert column(result, "Umsatz")["numeric"]["sum"] == pytest.approx(1234.56 + 980.5 + 12.25)
        assert column(result, "Menge")["numeric"]["sum"] == 12

    def test_tab_separated_file_is_sniffed_under_a_csv_name(self) -> None:
        result = profile(b"city\ttemp\nOslo\t3.5\nRome\t17.25\n")

        assert result["delimiter"] == "\t"
        assert column(result, "temp")["numeric"]["max"] == 17.25

    def test_tsv_content_type_reads_tabs_without_sniffing(self) -> None:
        data = b"a,b\tc\n1,5\t2\n"

        result = profile(data, filename="upload", content_type="text/tab-separated-values")

        assert (result["format"], result["delimiter"]) == ("tsv", "\t")
        assert [column["name"] for column in result["columns"]] == ["a,b", "c"]

    def test_all_numeric_rows_are_read_without_a_header(self) -> None:
        result = profile(b"1,2.5,3\n4,5.5,6\n7,8.5,9\n")

        assert (result["has_header"], result["row_count"]) == (False, 3)
        assert [column["name"] for column in result["columns"]] == [
            "column_0",
            "column_1",
            "column_2",
        ]
        assert column(result, "column_1")["numeric"]["sum"] == 16.5

    def test_options_override_sniffed_header_and_delimiter(self) -> None:
        result = profile(b"a;b\n1;2\n", delimiter=",", has_header=False)

        assert (result["delimiter"], result["has_header"], result["row_count"]) == (",", False, 2)
        assert column(result, "column_0")["top_values"] == [
            {"value": "1;2", "count": 1},
            {"value": "a;b", "count": 1},
        ]

    def test_excel_separator_line_sets_the_delimiter(self) -> None:
        result = profile(b"sep=;\r\nx;y\r\n1;2\r\n")

        assert result["delimiter"] == ";"
        assert [column["name"] for column in result["columns"]] == ["x", "y"]

    def test_r_style_na_and_empty_fields_count_as_missing(self) -> None:
        result = profile(b'name,score\n"",NA\n,2\nann,3\n')

        assert column(result, "name")["missing"] == 2
        assert column(result, "name")["distinct"] == 1
        assert column(result, "score")["missing"] == 1


class TestEncodings:
    def test_excel_unicode_text_is_read_as_utf16_with_clean_names(self) -> None:
        result = profile(EXCEL_UNICODE_TEXT, filename="export.txt")

        assert (result["encoding"], result["delimiter"]) == ("utf-16-le", "\t")
        assert [column["name"] for column in result["columns"]] == ["name", "score"]
        assert column(result, "name")["top_values"] == [
            {"value": "Zoë", "count": 1},
            {"value": "Åsa", "count": 1},
        ]

    def test_windows_bytes_fail_as_utf8_naming_offset_and_option(self) -> None:
        error = failure_of(WINDOWS_CSV)

        assert error.error_type == "encoding"
        assert error.message == (
            "the file is not valid utf-8: byte 0xE9 at byte offset 14 (line 2) cannot be "
            "decoded (invalid continuation byte); set options.encoding to the encoding it "
            "was saved in, for example 'cp1252' for a Western European Windows export, or "
            "save it again as UTF-8"
        )

    def test_windows_bytes_are_read_with_encoding_cp1252(self) -> None:
        result = profile(WINDOWS_CSV, encoding="cp1252")

        assert result["encoding"] == "cp1252"
        assert column(result, "city")["top_values"] == [
            {"value": "Málaga", "count": 1},
            {"value": "Orléans", "count": 1},
        ]

    def test_utf16_without_byte_order_mark_fails_naming_the_option(self) -> None:
        error = failure_of("a,b\n1,2\n".encode("utf-16-be"))

        assert error.error_type == "encoding"
        assert "set options.encoding to 'utf-16-le' or 'utf-16-be'" in error.message

    def test_unknown_encoding_option_is_refused_before_any_reading(self) -> None:
        """Refused when the options are built, so the gateway answers 400 at submission."""
        with pytest.raises(ValueError, match="'klingon' is not a text encoding"):
            AnalysisOptions(encoding="klingon")

    @pytest.mark.parametrize(
        ("encoding", "reason"),
        [
            ("idna", "decoding with 'idna' codec failed (UnicodeError: Unsupported error handling"),
            ("undefined", "decoding with 'undefined' codec failed (UnicodeError: undefined"),
            ("punycode", "decoding with 'punycode' codec failed (UnicodeError: Invalid extended"),
        ],
        ids=["idna", "undefined", "punycode"],
    )
    def test_codec_that_cannot_decode_a_file_is_refused_in_the_options(
        self, encoding: str, reason: str
    ) -> None:
        """Python knows these names, so looking them up is not enough."""
        with pytest.raises(ValueError, match="cannot decode a file") as caught:
            AnalysisOptions(encoding=encoding)

        assert str(caught.value).startswith(
            f"options.encoding '{encoding}' cannot decode a file ({reason}"
        )

    @pytest.mark.parametrize("encoding", ["utf-32", "utf-16", "utf-7", "cp037", "iso2022_jp"])
    def test_unusual_text_encodings_are_accepted_in_the_options(self, encoding: str) -> None:
        assert AnalysisOptions(encoding=encoding).encoding == encoding

    @pytest.mark.parametrize(
        ("encoding", "data"),
        [
            ("undefined", b"a,b\n1,2\n"),
            ("punycode", b"a,b\n1,2\n"),
            ("idna", "a,b\nJosé,2\n".encode("cp1252")),
            ("rot13", b"a,b\n1,2\n"),
        ],
        ids=["undefined", "punycode", "idna-non-ascii", "bytes-codec"],
    )
    def test_codec_that_cannot_decode_fails_the_job_permanently(
        self, encoding: str, data: bytes
    ) -> None:
        """The options refuse these names, but a gateway on another Python might not.

        A plain UnicodeError escaping would count as retryable and loop to a dead letter.
        """
        with pytest.raises(PermanentJobError) as caught:
            decode_text(data, encoding=encoding)

        assert caught.value.error_type == "encoding"
        assert caught.value.message.startswith(
            f"options.encoding '{encoding}' cannot decode a file ("
        )
        assert caught.value.message.endswith(
            "; set it to a text encoding such as 'utf-8', 'cp1252' or 'latin-1'"
        )


class TestUnreadableText:
    def test_zero_bytes_fail_as_empty_file(self) -> None:
        error = failure_of(b"", filename="nothing.csv")

        assert (error.error_type, error.message) == (
            "empty_file",
            "'nothing.csv' is empty (0 bytes)",
        )

    def test_byte_order_mark_and_blank_lines_fail_as_empty_file(self) -> None:
        error = failure_of(codecs.BOM_UTF8 + b" \r\n\r\n")

        assert error.error_type == "empty_file"

    def test_header_only_fails_as_no_rows(self) -> None:
        error = failure_of(b"region,month,revenue\r\n")

        assert error.error_type == "no_rows"
        assert error.message.startswith("the file names 3 column(s) but holds no data rows")

    def test_row_wider_than_the_header_fails_naming_its_line(self) -> None:
        error = failure_of(b"a,b\n1,2\n3,4\n5,6,7\n")

        assert error.error_type == "malformed"
        assert error.message.startswith("line 4 has 3 fields where the first row has 2;")

    def test_title_line_above_the_header_fails_as_no_header(self) -> None:
        error = failure_of(b"Sales report 2024\nregion,units,price\nnorth,3,1.5\n")

        assert error.error_type == "no_header"
        assert error.message.startswith("the first line names 1 column(s) but line 2 has 3")

    def test_unclosed_quote_fails_as_malformed_naming_its_line(self) -> None:
        error = failure_of(b'a,b\n"open,1\n2,3\n')

        assert error.error_type == "malformed"
        assert error.message.startswith("line 3 opens a quote it never closes")


class TestOtherFormats:
    def test_json_lines_are_read_by_extension(self) -> None:
        data = b'{"city": "Oslo", "temp": 3.5}\n\n{"city": "Rome", "temp": 17.25}\n'

        result = profile(data, filename="temps.jsonl")

        assert reading_of(result) == {
            "format": "jsonl",
            "encoding": "utf-8",
            "delimiter": None,
            "has_header": None,
            "decimal_comma": None,
            "row_count": 2,
        }
        assert column(result, "temp")["numeric"]["sum"] == 20.75

    def test_json_lines_are_read_by_content_type(self) -> None:
        result = profile(b'{"a": 1}\n{"a": 2}\n', filename="x", content_type="application/x-ndjson")

        assert result["format"] == "jsonl"

    def test_broken_json_line_fails_naming_its_line(self) -> None:
        error = failure_of(b'{"a": 1}\n{"a": 2}\n{"a": \n', filename="x.ndjson")

        assert error.error_type == "malformed"
        assert error.message.startswith("the file is not valid JSON lines at line 3:")

    def test_parquet_is_read_by_magic_bytes_whatever_its_name(self) -> None:
        frame = pl.DataFrame({"city": ["Oslo", "Rome", None], "temp": [3.5, 17.25, None]})
        buffer = io.BytesIO()
        frame.write_parquet(buffer)

        result = profile(buffer.getvalue(), filename="upload.bin")

        assert reading_of(result) == {
            "format": "parquet",
            "encoding": None,
            "delimiter": None,
            "has_header": None,
            "decimal_comma": None,
            "row_count": 3,
        }
        assert column(result, "temp")["missing"] == 1
        assert column(result, "temp")["numeric"]["mean"] == pytest.approx(10.375)

    def test_parquet_name_without_parquet_bytes_fails_as_malformed(self) -> None:
        error = failure_of(b"city,temp\n", filename="temps.parquet")

        assert error.error_type == "malformed"

    def test_excel_workbook_fails_as_unsupported_format(self) -> None:
        error = failure_of(b"PK\x03\x04\x14\x00\x06\x00", filename="book.xlsx")

        assert error.error_type == "unsupported_format"
        assert "save the sheet as 'CSV UTF-8'" in error.message

    def test_json_document_fails_as_unsupported_format(self) -> None:
        error = failure_of(b'[{"a": 1}]', filename="rows.json")

        assert error.error_type == "unsupported_format"


def numbers_csv(columns: int, rows: int = 2) -> bytes:
    header = ",".join(f"c{i}" for i in range(columns))
    body = "".join(",".join(str(row + i) for i in range(columns)) + "\n" for row in range(rows))
    return f"{header}\n{body}".encode()


def too_wide(data: bytes, *, filename: str = "wide.csv", max_columns: int) -> PermanentJobError:
    options = AnalysisOptions()
    with pytest.raises(PermanentJobError) as caught:
        profile_dataset(
            data, filename=filename, content_type=None, options=options, max_columns=max_columns
        )
    return caught.value


class TestWideFiles:
    def test_csv_wider_than_the_limit_fails_naming_width_and_limit(self) -> None:
        error = too_wide(numbers_csv(6), max_columns=5)

        assert error.error_type == "too_wide"
        assert error.message == (
            "the file has 6 columns, more than the 5 this service profiles; upload only the "
            "columns you need, or split the file into narrower ones (the limit is the "
            "analysis service's TRINITY_ANALYSIS_MAX_COLUMNS setting)"
        )

    def test_csv_as_wide_as_the_limit_is_profiled(self) -> None:
        options = AnalysisOptions()

        result = profile_dataset(
            numbers_csv(5), filename="wide.csv", content_type=None, options=options, max_columns=5
        )

        assert result["column_count"] == 5

    def test_csv_width_is_checked_on_the_header_before_parsing(self) -> None:
        """A ragged body would fail the parse; the width check comes first, so it never runs."""
        data = numbers_csv(6) + b"1,2,3,4,5,6,7,8\n"

        error = too_wide(data, max_columns=5)

        assert error.error_type == "too_wide"

    def test_parquet_wider_than_the_limit_fails_on_its_schema(self) -> None:
        buffer = io.BytesIO()
        pl.DataFrame({f"c{i}": [i] for i in range(6)}).write_parquet(buffer)

        error = too_wide(buffer.getvalue(), filename="wide.parquet", max_columns=5)

        assert error.error_type == "too_wide"
        assert error.message.startswith("the file has 6 columns, more than the 5 ")

    def test_json_lines_wider_than_the_limit_fail_after_parsing(self) -> None:
        """Keys may differ from line to line, so only the parsed table tells the width."""
        data = b'{"a": 1, "b": 2, "c": 3}\n{"d": 4, "e": 5, "f": 6}\n'

        error = too_wide(data, filename="wide.jsonl", max_columns=5)

        assert error.message.startswith("the file has 6 columns, more than the 5 ")

    def test_default_limit_refuses_one_column_more(self) -> None:
        data = numbers_csv(DEFAULT_MAX_COLUMNS + 1, rows=1)

        with pytest.raises(PermanentJobError) as caught:
            profile_dataset(data, filename="wide.csv", content_type=None, options=AnalysisOptions())

        assert caught.value.error_type == "too_wide"
        assert caught.value.message.startswith(
            "the file has 10,001 columns, more than the 10,000 this service profiles;"
        )
