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
