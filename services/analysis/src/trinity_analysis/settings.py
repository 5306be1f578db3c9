"""The analysis service's own settings, read from ``TRINITY_ANALYSIS_*`` variables.

They bound the work one job may cost the service, so they are the operator's to
set, not the client's: a limit a client could raise in `AnalysisOptions` would
protect nothing.
"""

from __future__ import annotations

from typing import Annotated, Final

import msgspec

__all__ = ["DEFAULT_MAX_COLUMNS", "AnalysisSettings"]

# A numeric column costs about 0.6 ms to profile and 500 bytes of result, so 10,000
# columns take some 6 s and 5 MB (plus the correlation matrix, capped by
# max_correlation_columns). A 300,000-column file ran for 120 s and made 102 MB.
DEFAULT_MAX_COLUMNS: Final = 10_000


class AnalysisSettings(msgspec.Struct, kw_only=True, frozen=True):
    """What the analysis service accepts."""

    analysis_max_columns: Annotated[int, msgspec.Meta(ge=1)] = DEFAULT_MAX_COLUMNS
    """Most columns a file may have; a wider file fails before it is profiled."""
