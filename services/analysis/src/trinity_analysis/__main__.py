"""Run the analysis service: ``python -m trinity_analysis`` or ``trinity-analysis``."""

from __future__ import annotations

import functools
import os
import sys

from trinity_analysis.handler import provide_handler
from trinity_analysis.settings import AnalysisSettings
from trinity_common.service import run_worker_service
from trinity_common.settings import SettingsError, load_settings


def main() -> None:
    """Consume the analysis queue until SIGTERM."""
    try:
        settings = load_settings(AnalysisSettings, os.environ)
    except SettingsError as err:
        # As run_worker_service does for the settings every worker shares.
        print(f"trinity-analysis: {err}", file=sys.stderr)  # noqa: T201 - logging is not set up yet
        sys.exit(2)
    run_worker_service(
        service="analysis",
        queue_name="analysis",
        provide_handler=functools.partial(provide_handler, settings=settings),
        env=os.environ,
    )


if __name__ == "__main__":
    main()
