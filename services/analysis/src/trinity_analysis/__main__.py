"""Run the analysis service: ``python -m trinity_analysis`` or ``trinity-analysis``."""

from __future__ import annotations

import functools
import os

from trinity_analysis.handler import provide_handler
from trinity_analysis.settings import AnalysisSettings
from trinity_common.service import run_worker_service
from trinity_common.settings import load_settings, settings_or_exit


def main() -> None:
    """Consume the analysis queue until SIGTERM."""
    settings = settings_or_exit(
        "trinity-analysis", lambda: load_settings(AnalysisSettings, os.environ)
    )
    run_worker_service(
        service="analysis",
        queue_name="analysis",
        provide_handler=functools.partial(provide_handler, settings=settings),
        env=os.environ,
    )


if __name__ == "__main__":
    main()
