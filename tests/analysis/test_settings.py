"""The analysis service's settings, as read from its environment."""

from __future__ import annotations

import pytest

from trinity_analysis.settings import AnalysisSettings
from trinity_common.settings import SettingsError, load_settings


def test_column_limit_defaults_to_ten_thousand() -> None:
    settings = load_settings(AnalysisSettings, {})

    assert settings.analysis_max_columns == 10_000


def test_column_limit_is_read_from_its_variable() -> None:
    settings = load_settings(AnalysisSettings, {"TRINITY_ANALYSIS_MAX_COLUMNS": "250"})

    assert settings.analysis_max_columns == 250


def test_column_limit_below_one_is_refused_naming_the_variable() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(AnalysisSettings, {"TRINITY_ANALYSIS_MAX_COLUMNS": "0"})

    assert caught.value.message == (
        "invalid configuration: Expected `int` >= 1 - in TRINITY_ANALYSIS_MAX_COLUMNS"
    )
