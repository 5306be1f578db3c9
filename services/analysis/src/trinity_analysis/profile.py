"""Profile a dataset: what each column holds, and how numeric columns correlate.

`profile_dataset` is pure and synchronous, and takes and returns plain data, so the
service can run it in a separate process. The profile is a JSON-able dict::

    {"format", "encoding", "delimiter", "has_header", "decimal_comma",
     "row_count", "column_count",
     "columns": [{"name", "dtype", "kind", "missing", "distinct",
                  "numeric": {"min", "max", "mean", "std", "sum",
                              "quantiles": {"p05", "p25", "p50", "p75", "p95"},
                              "histogram": {"edges", "counts"}} | None,
                  "top_values": [{"value", "count"}, ...] | None}],
     "correlations": {"method": "pearson", "columns", "matrix"} | None}

``encoding`` is None for Parquet; ``delimiter``, ``has_header`` and
``decimal_comma`` are None unless the file is delimited text. ``kind`` is
``numeric``, ``text``, ``boolean``, ``temporal``, ``empty`` (no value at all) or
``other`` (nested or binary values, which get counts only).

Conventions:

- ``missing`` counts nulls, and also empty strings in text columns and NaN in
  float columns, which reading turns into nulls; ``distinct`` counts the distinct
  values that are not missing.
- ``std`` is the sample standard deviation (ddof=1), None below two values.
- Quantiles use linear interpolation between the two nearest ranks (numpy's and
  pandas' default; type 7 of Hyndman and Fan).
- The histogram has ``histogram_bins`` equal-width bins from min to max, each
  closed on the left, the last also on the right (as ``numpy.histogram``).
- ``top_values`` lists the most frequent values of text and boolean columns,
  most frequent first, ties in value order.
- Every float is finite or None: NaN and infinities are reported as None.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import polars as pl

from trinity_analysis.reading import decode_dataset, parse_source
from trinity_analysis.settings import DEFAULT_MAX_COLUMNS

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from numpy.typing import NDArray

    from trinity_analysis.options import AnalysisOptions
    from trinity_analysis.reading import Table

__all__ = ["correlate_columns", "pearson_matrix", "profile_columns", "profile_dataset"]

_SUMMARIES: Final[dict[str, Callable[[pl.Expr], pl.Expr]]] = {
    "min": pl.Expr.min,
    "max": pl.Expr.max,
    "mean": pl.Expr.mean,
    "std": lambda column: column.std(ddof=1),
    "sum": pl.Expr.sum,
}
_QUANTILES: Final = {"p05": 0.05, "p25": 0.25, "p50": 0.5, "p75": 0.75, "p95": 0.95}
# Columns are profiled in at most this many batches, each reporting progress once.
_MAX_BATCHES: Final = 16
_MIN_BATCH_COLUMNS: Final = 25
# Percent done as each stage ends; the column batches share the span between.
_DECODED: Final = 10.0
_PARSED: Final = 20.0
_PROFILED: Final = 85.0
_CORRELATED: Final = 95.0


def profile_dataset(
    data: bytes,
    *,
    filename: str,
    content_type: str | None,
    options: AnalysisOptions,
    max_columns: int = DEFAULT_MAX_COLUMNS,
    progress: Callable[[float, str], None] | None = None,
) -> dict[str, Any]:
    """Read an uploaded dataset and return its profile, as described above.

    Args:
        data: The bytes of the upload.
        filename: Its name; the extension helps detect the format.
        content_type: Its media type, if the client gave one.
        options: How to read and profile it.
        max_columns: Most columns the file may have; a wider file fails before
            it is profiled.
        progress: Called with (percent, message) at each stage, a few dozen times
            at most, so it may cross a process boundary.

    Raises:
        PermanentJobError: the data cannot be read; ``error_type`` is ``encoding``,
            ``empty_file``, ``no_rows``, ``no_header``, ``malformed``,
            ``unsupported_format`` or ``too_wide``, and the message says what to
            change.
    """
    report = progress or _ignore_progress
    source = decode_dataset(data, filename=filename, content_type=content_type, options=options)
    report(_DECODED, "dataset decoded")
    table = parse_source(source, options=options, max_columns=max_columns)
    report(_PARSED, f"parsed {table.frame.height} rows and {table.frame.width} columns")

    columns = profile_columns(table.frame, options=options, progress=report)
    correlations = None
    if options.correlations:
        correlations = correlate_columns(table.frame, columns, options=options)
        report(_CORRELATED, "correlations computed")
    return {**_describe_reading(table), "columns": columns, "correlations": correlations}


def profile_columns(
    frame: pl.DataFrame, *, options: AnalysisOptions, progress: Callable[[float, str], None]
) -> list[dict[str, Any]]:
    """Return the profile of every column, reporting progress after each batch."""
    names = frame.columns
    size = max(_MIN_BATCH_COLUMNS, math.ceil(len(names) / _MAX_BATCHES))
    profiles: list[dict[str, Any]] = []
    for start in range(0, len(names), size):
        profiles += _profile_batch(frame.select(names[start : start + size]), options)
        done = len(profiles) / len(names)
        progress(_PARSED + (_PROFILED - _PARSED) * done, f"profiled {len(profiles)} columns")
    return profiles


def correlate_columns(
    frame: pl.DataFrame, columns: list[dict[str, Any]], *, options: AnalysisOptions
) -> dict[str, Any] | None:
    """Return Pearson correlations of the first numeric columns, or None below two.

    Only the first ``options.max_correlation_columns`` numeric columns take part;
    ``columns`` of the result names those that do, in matrix order.
    """
    names = [column["name"] for column in columns if column["kind"] == "numeric"]
    names = names[: options.max_correlation_columns]
    if len(names) < 2:
        return None
    values = frame.select(pl.col(names).cast(pl.Float64)).to_numpy()
    matrix = pearson_matrix(np.asarray(values, dtype=np.float64))
    rows = [[_finite(value) for value in row] for row in matrix.tolist()]
    return {"method": "pearson", "columns": names, "matrix": rows}


def pearson_matrix(values: NDArray[np.float64]) -> NDArray[np.float64]:
    """Return the Pearson correlation of every pair of columns of ``values``.

    Non-finite entries are missing, and each pair uses the rows where both of its
    columns have a value (pairwise-complete, as pandas' ``DataFrame.corr``). All
    pairs come from four matrix products over the centred values and the
    presence mask, instead of one pass per pair. A pair with fewer than two such
    rows, or a column that is constant, gives NaN; the diagonal is 1 otherwise.
    """
    present = np.isfinite(values)
    mask = present.astype(np.float64)
    counts = mask.sum(axis=0)
    means = np.where(present, values, 0.0).sum(axis=0) / np.maximum(counts, 1.0)
    centred = np.where(present, values - means, 0.0)

    pairs = mask.T @ mask
    sums = centred.T @ mask  # [i, j]: the sum of column i over rows where j is present too
    squares = (centred * centred).T @ mask
    products = centred.T @ centred
    with np.errstate(divide="ignore", invalid="ignore"):
        spread = squares - sums * sums / pairs
        matrix = (products - sums * sums.T / pairs) / np.sqrt(spread * spread.T)

    low = np.where(present, values, np.inf).min(axis=0)
    high = np.where(present, values, -np.inf).max(axis=0)
    constant = ~(high > low)
    matrix = np.clip(matrix, -1.0, 1.0)
    matrix[(pairs < 2) | (spread <= 0) | (spread.T <= 0)] = np.nan
    matrix[constant, :] = np.nan
    matrix[:, constant] = np.nan
    np.fill_diagonal(matrix, np.where(constant, np.nan, 1.0))
    return matrix


def _profile_batch(batch: pl.DataFrame, options: AnalysisOptions) -> list[dict[str, Any]]:
    counts = batch.select(
        *(pl.col(name).null_count().alias(f"missing {name}") for name in batch.columns),
        *(pl.col(name).drop_nulls().n_unique().alias(f"distinct {name}") for name in batch.columns),
    ).row(0, named=True)
    kinds = {name: _kind_of(dtype, batch[name]) for name, dtype in batch.schema.items()}
    numeric = _numeric_stats(
        batch.select(name for name, kind in kinds.items() if kind == "numeric"),
        bins=options.histogram_bins,
    )

    profiles = []
    for name, dtype in batch.schema.items():
        kind = kinds[name]
        top = kind in ("text", "boolean")
        profiles.append({
            "name": name,
            "dtype": str(dtype),
            "kind": kind,
            "missing": counts[f"missing {name}"],
            "distinct": counts[f"distinct {name}"],
            "numeric": numeric.get(name),
            "top_values": _top_values(batch[name], options.top_values) if top else None,
        })  # fmt: skip
    return profiles


def _kind_of(dtype: pl.DataType, series: pl.Series) -> str:
    if series.null_count() == series.len():
        return "empty"
    if dtype == pl.Boolean:
        return "boolean"
    if dtype.is_numeric():
        return "numeric"
    if dtype.is_temporal():
        return "temporal"
    if isinstance(dtype, pl.String | pl.Categorical | pl.Enum):
        return "text"
    return "other"


def _numeric_stats(frame: pl.DataFrame, *, bins: int) -> dict[str, dict[str, Any]]:
    """Return the statistics of each column of an all-numeric, non-empty frame."""
    if frame.width == 0:
        return {}
    values = frame.select(pl.all().cast(pl.Float64))
    row = values.select(_stat_expressions(values.columns)).row(0, named=True)
    stats = {}
    for name in values.columns:
        stats[name] = {
            **{stat: _finite(row[f"{stat} {name}"]) for stat in _SUMMARIES},
            "quantiles": {label: _finite(row[f"{label} {name}"]) for label in _QUANTILES},
            "histogram": _histogram(values[name], bins=bins),
        }
    return stats


def _stat_expressions(names: Iterable[str]) -> list[pl.Expr]:
    expressions = []
    for name in names:
        column = pl.col(name)
        expressions += [
            summarise(column).alias(f"{stat} {name}") for stat, summarise in _SUMMARIES.items()
        ]
        expressions += [
            column.quantile(q, interpolation="linear").alias(f"{label} {name}")
            for label, q in _QUANTILES.items()
        ]
    return expressions


def _histogram(series: pl.Series, *, bins: int) -> dict[str, list[Any]] | None:
    values = series.drop_nulls().to_numpy()
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    counts, edges = np.histogram(values, bins=bins, range=(values.min(), values.max()))
    return {"edges": [float(edge) for edge in edges], "counts": [int(n) for n in counts]}


def _top_values(series: pl.Series, limit: int) -> list[dict[str, Any]]:
    counts = series.drop_nulls().cast(pl.String).rename("value").value_counts(name="count")
    top = counts.sort(["count", "value"], descending=[True, False]).head(limit)
    return [{"value": value, "count": count} for value, count in top.iter_rows()]


def _describe_reading(table: Table) -> dict[str, Any]:
    dialect = table.dialect
    return {
        "format": table.format,
        "encoding": table.encoding,
        "delimiter": dialect.delimiter if dialect else None,
        "has_header": dialect.has_header if dialect else None,
        "decimal_comma": dialect.decimal_comma if dialect else None,
        "row_count": table.frame.height,
        "column_count": table.frame.width,
    }


def _finite(value: Any) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def _ignore_progress(percent: float, message: str) -> None:
    """Stand in for a missing progress callback."""
