"""Commands: what a job asks its queue's service to do.

A command is the contract between whoever submits a job (the gateway, or another
service through `trinity_common.client`) and the service that runs it, so it lives
here rather than in either. Each command is strict about its own fields: the
gateway decodes client input into it and answers 4xx naming any bad field.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

import msgspec

__all__ = ["AnalysisOptions", "Command", "RunAnalysis"]

DatasetId = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{32}$", description="A dataset id.")]

# Bytes decoded as the analysis service decodes a file: strictly, then with "replace"
# to find the line of a bad byte, so with high bytes that make "replace" do something.
_ENCODING_PROBES: Final = (
    (b"name,value\r\nx,1.5\n", "strict"),
    (b"name,value\r\nx,\x80\xe9\xff\n", "replace"),
)


class AnalysisOptions(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """How to read and profile a dataset. Every option has a working default."""

    encoding: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,39}$")] | None = (
        None
    )
    """Text encoding of the file, such as ``cp1252``; None reads a BOM if there is one,
    else strict UTF-8."""

    delimiter: Literal[",", ";", "\t", "|", ":", " "] | None = None
    """Field separator of a delimited file; None sniffs among ``,``, ``;``, tab and ``|``."""

    has_header: bool | None = None
    """Whether the first row names the columns; None sniffs it."""

    decimal_comma: bool | None = None
    """Whether numbers use a decimal comma (``1.234,56``); None infers it."""

    histogram_bins: Annotated[int, msgspec.Meta(ge=1, le=200)] = 10
    """Number of equal-width bins in each numeric column's histogram."""

    top_values: Annotated[int, msgspec.Meta(ge=1, le=100)] = 5
    """How many of the most frequent values to list for each text column."""

    correlations: bool = True
    """Whether to compute Pearson correlations between numeric columns."""

    max_correlation_columns: Annotated[int, msgspec.Meta(ge=2, le=2000)] = 500
    """Numeric columns beyond this many are left out of the correlation matrix."""

    def __post_init__(self) -> None:
        if self.encoding is not None:
            _check_encoding(self.encoding)


def _check_encoding(name: str) -> None:
    """Raise ValueError unless the codec ``name`` can decode a file's bytes into text.

    A name that passes is one the analysis service can use: any failure left is
    a fault of the data, which it reports by byte offset and line.
    """
    for probe, errors in _ENCODING_PROBES:
        try:
            probe.decode(name, errors)
        except UnicodeDecodeError:
            pass  # a real encoding these bytes are not valid in (utf-32, say)
        except LookupError as err:
            # Unknown names, and bytes-to-bytes codecs (rot13, base64): bytes.decode
            # refuses a codec that is not marked as a text encoding.
            raise ValueError(
                f"options.encoding {name!r} is not a text encoding Python knows"
            ) from err
        except UnicodeError as err:
            # Text codecs that cannot read a file: "undefined" refuses everything;
            # "idna" and "punycode" read host names, refusing "replace" or commas.
            raise ValueError(
                f"options.encoding {name!r} cannot decode a file ({err}); use a text "
                "encoding such as 'utf-8', 'cp1252' or 'latin-1'"
            ) from err


class RunAnalysis(msgspec.Struct, kw_only=True, frozen=True, tag="run_analysis"):
    """Profile an uploaded dataset."""

    dataset_id: DatasetId
    options: AnalysisOptions = msgspec.field(default_factory=AnalysisOptions)


Command = RunAnalysis
