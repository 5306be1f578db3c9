"""Profiles of real files, checked against independent computations.

Expected values come from the standard library, pandas or numpy reading the same
file, never from constants copied out of a previous run.
"""

from __future__ import annotations

import csv
import io
import json
import pickle
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import palmerpenguins
import pandas as pd
import pytest

from trinity_analysis.options import AnalysisOptions
from trinity_analysis.profile import pearson_matrix, profile_dataset
from trinity_common.errors import PermanentJobError

PENGUINS = Path(palmerpenguins.__file__).parent / "data" / "penguins.csv"
WIDE_COLUMNS = 400
WIDE_ROWS = 2_500


def profile(
    data: bytes, *, filename: str = "data.csv", progress: Any = None, **options: Any
) -> dict[str, Any]:
    return profile_dataset(
        data,
        filename=filename,
        content_type="text/csv",
        options=AnalysisOptions(**options),
        progress=progress,
    )


def column(result: dict[str, Any], name: str) -> dict[str, Any]:
    return next(column for column in result["columns"] if column["name"] == name)


def numeric_summary(result: dict[str, Any], name: str) -> dict[str, float]:
    found = column(result, name)
    stats = found["numeric"]
    return {
        "min": stats["min"],
        "max": stats["max"],
        "mean": stats["mean"],
        "std": stats["std"],
        "missing": found["missing"],
        "distinct": found["distinct"],
    }


def pandas_summary(series: pd.Series) -> dict[str, float]:
    return {
        "min": series.min(),
        "max": series.max(),
        "mean": series.mean(),
        "std": series.std(ddof=1),
        "missing": int(series.isna().sum()),
        "distinct": series.nunique(),
    }


@pytest.fixture(scope="module")
def wide_csv() -> bytes:
    """400 numeric columns by 2,500 rows, shaped like ``wide-numeric-head.csv``."""
    values = np.random.default_rng(seed=3).normal(size=(WIDE_ROWS, WIDE_COLUMNS))
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(f"c{index}" for index in range(WIDE_COLUMNS))
    writer.writerows([f"{value:.4f}" for value in row] for row in values)
    return text.getvalue().encode()


@pytest.fixture(scope="module")
def penguins() -> dict[str, Any]:
    """The profile of the Palmer penguins, an R export with ``NA`` for missing values."""
    return profile(PENGUINS.read_bytes(), filename="penguins.csv")


class TestRegionsWithBomAndCrlf:
    """Case C1: a UTF-8 byte-order mark and CRLF line endings."""

    def test_profile_names_columns_without_bom_or_carriage_return(self, cases_dir: Path) -> None:
        result = profile((cases_dir / "regions-bom-crlf.csv").read_bytes())

        assert [column["name"] for column in result["columns"]] == ["region", "month", "revenue"]

    def test_profile_counts_rows_and_sums_revenue(self, cases_dir: Path) -> None:
        path = cases_dir / "regions-bom-crlf.csv"
        with path.open(encoding="utf-8-sig", newline="") as file:
            expected = sum(float(row["revenue"]) for row in csv.DictReader(file))

        result = profile(path.read_bytes())

        assert expected == pytest.approx(8757.00)
        assert result["row_count"] == 8
        assert column(result, "revenue")["numeric"]["sum"] == pytest.approx(expected)

    def test_profile_sums_north_revenue_of_north_rows_alone(self, cases_dir: Path) -> None:
        with (cases_dir / "regions-bom-crlf.csv").open(encoding="utf-8-sig", newline="") as file:
            rows = list(csv.reader(file))
        north = [row for row in rows[1:] if row[0] == "north"]
        text = io.StringIO()
        csv.writer(text, lineterminator="\r\n").writerows([rows[0], *north])

        result = profile(b"\xef\xbb\xbf" + text.getvalue().encode())

        assert sum(float(row[2]) for row in north) == pytest.approx(2450.75)
        assert column(result, "revenue")["numeric"]["sum"] == pytest.approx(2450.75)

    def test_profile_is_the_same_without_the_bom(self, cases_dir: Path) -> None:
        data = (cases_dir / "regions-bom-crlf.csv").read_bytes()

        without_bom = profile(data.removeprefix(b"\xef\xbb\xbf"))

        assert data.startswith(b"\xef\xbb\xbf")
        assert without_bom == profile(data)


class TestSharedCases:
    @pytest.mark.parametrize(
        "name", ["sales-small.csv", "orders-head.csv", "wide-numeric-head.csv"]
    )
    def test_numeric_columns_match_pandas(self, cases_dir: Path, name: str) -> None:
        path = cases_dir / name
        frame = pd.read_csv(path)
        numeric = list(frame.select_dtypes("number").columns)

        result = profile(path.read_bytes())

        kinds = {column["name"]: column["kind"] for column in result["columns"]}
        assert [name for name, kind in kinds.items() if kind == "numeric"] == numeric
        for name in numeric:
            assert numeric_summary(result, name) == pytest.approx(pandas_summary(frame[name]))

    def test_top_values_rank_by_count_then_value(self, cases_dir: Path) -> None:
        path = cases_dir / "sales-small.csv"
        with path.open(newline="") as file:
            counts = Counter(row["product"] for row in csv.DictReader(file))
        expected = sorted(counts.items(), key=lambda item: (-item[1], item[0]))

        result = profile(path.read_bytes(), top_values=2)

        assert column(result, "product")["top_values"] == [
            {"value": value, "count": count} for value, count in expected[:2]
        ]

    def test_histogram_matches_numpy_bins(self, cases_dir: Path) -> None:
        path = cases_dir / "sales-small.csv"
        counts, edges = np.histogram(pd.read_csv(path)["price"], bins=4)

        result = profile(path.read_bytes(), histogram_bins=4)

        histogram = column(result, "price")["numeric"]["histogram"]
        assert histogram == {"edges": pytest.approx(edges.tolist()), "counts": counts.tolist()}


class TestPenguins:
    def test_missing_counts_match_pandas(self, penguins: dict[str, Any]) -> None:
        expected = pd.read_csv(PENGUINS).isna().sum().to_dict()

        assert {column["name"]: column["missing"] for column in penguins["columns"]} == expected

    def test_means_and_std_match_pandas(self, penguins: dict[str, Any]) -> None:
        frame = pd.read_csv(PENGUINS).select_dtypes("number")

        stats = {name: column(penguins, name)["numeric"] for name in frame.columns}

        assert {name: found["mean"] for name, found in stats.items()} == pytest.approx(
            frame.mean().to_dict()
        )
        assert {name: found["std"] for name, found in stats.items()} == pytest.approx(
            frame.std(ddof=1).to_dict()
        )

    def test_quantiles_match_pandas_linear_interpolation(self, penguins: dict[str, Any]) -> None:
        series = pd.read_csv(PENGUINS)["body_mass_g"]
        expected = {
            f"p{round(q * 100):02d}": series.quantile(q) for q in (0.05, 0.25, 0.5, 0.75, 0.95)
        }

        assert column(penguins, "body_mass_g")["numeric"]["quantiles"] == pytest.approx(expected)

    def test_bill_length_and_flipper_correlation_matches_pandas(
        self, penguins: dict[str, Any]
    ) -> None:
        frame = pd.read_csv(PENGUINS)
        expected = frame["bill_length_mm"].corr(frame["flipper_length_mm"])

        correlations = penguins["correlations"]
        names = correlations["columns"]
        found = correlations["matrix"][names.index("bill_length_mm")][
            names.index("flipper_length_mm")
        ]
        assert found == pytest.approx(expected)


class TestWideNumericFile:
    """Case C3: 400 numeric columns by 2,500 rows."""

    def test_profile_has_full_correlation_matrix_with_unit_diagonal(self, wide_csv: bytes) -> None:
        result = profile(wide_csv)

        matrix = result["correlations"]["matrix"]
        assert (result["row_count"], result["column_count"]) == (WIDE_ROWS, WIDE_COLUMNS)
        assert [len(row) for row in matrix] == [WIDE_COLUMNS] * WIDE_COLUMNS
        assert [matrix[index][index] for index in range(WIDE_COLUMNS)] == [1.0] * WIDE_COLUMNS

    def test_correlation_matrix_matches_pandas(self, wide_csv: bytes) -> None:
        expected = pd.read_csv(io.BytesIO(wide_csv)).corr().to_numpy()

        result = profile(wide_csv)

        assert np.array(result["correlations"]["matrix"]) == pytest.approx(expected, abs=1e-12)

    def test_progress_rises_in_a_few_dozen_steps(self, wide_csv: bytes) -> None:
        reports: list[tuple[float, str]] = []

        profile(wide_csv, progress=lambda percent, message: reports.append((percent, message)))

        percents = [percent for percent, _ in reports]
        assert 4 <= len(percents) <= 40
        assert percents == sorted(percents)
        assert percents[0] >= 0
        assert percents[-1] <= 100

    def test_correlations_stop_at_max_correlation_columns(self, wide_csv: bytes) -> None:
        result = profile(wide_csv, max_correlation_columns=10)

        assert result["correlations"]["columns"] == [f"c{index}" for index in range(10)]


class TestEdgeValues:
    def test_pairwise_complete_correlation_matches_pandas(self) -> None:
        values = np.random.default_rng(seed=5).normal(size=(300, 8))
        values[np.random.default_rng(seed=6).random(values.shape) < 0.25] = np.nan

        matrix = pearson_matrix(values)

        assert matrix == pytest.approx(pd.DataFrame(values).corr().to_numpy(), abs=1e-12)

    def test_constant_column_has_null_correlations(self) -> None:
        result = profile(b"flat,x,y\n2,1,2\n2,2,4\n2,3,7\n")

        assert result["correlations"]["matrix"] == [
            [None, None, None],
            [None, 1.0, pytest.approx(statistics.correlation([1, 2, 3], [2, 4, 7]))],
            [None, pytest.approx(statistics.correlation([2, 4, 7], [1, 2, 3])), 1.0],
        ]

    def test_non_finite_values_encode_as_strict_json(self) -> None:
        result = profile(b"a,b\n1,inf\n2,-inf\n3,NaN\n")

        encoded = json.dumps(result, allow_nan=False)

        assert json.loads(encoded)["columns"][1]["numeric"]["max"] is None

    def test_correlations_are_none_when_disabled(self) -> None:
        result = profile(b"x,y\n1,2\n2,4\n3,7\n", correlations=False)

        assert result["correlations"] is None

    def test_kinds_cover_boolean_temporal_text_and_empty(self) -> None:
        result = profile(b"ok,day,note,blank\ntrue,2024-01-05,a,\nfalse,2024-02-05,b,\n")

        assert [column["kind"] for column in result["columns"]] == [
            "boolean",
            "temporal",
            "text",
            "empty",
        ]

    def test_profile_and_error_survive_pickling(self) -> None:
        """Both cross the process boundary of the service's worker pool."""
        result = profile(b"x,y\n1,a\n2,b\n")
        with pytest.raises(PermanentJobError) as caught:
            profile(b"")

        error = pickle.loads(pickle.dumps(caught.value))  # noqa: S301 - our own bytes

        assert pickle.loads(pickle.dumps(result)) == result  # noqa: S301 - our own bytes
        assert (error.error_type, error.message) == (caught.value.error_type, caught.value.message)
