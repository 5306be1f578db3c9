"""Run the analysis service: ``python -m trinity_analysis`` or ``trinity-analysis``."""

from __future__ import annotations

import os

from trinity_analysis.handler import provide_handler
from trinity_common.service import run_worker_service


def main() -> None:
    """Consume the analysis queue until SIGTERM."""
    run_worker_service(
        service="analysis", queue_name="analysis", provide_handler=provide_handler, env=os.environ
    )


if __name__ == "__main__":
    main()
