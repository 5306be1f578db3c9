"""The options a client may set on an analysis job.

`AnalysisOptions` travels inside the `RunAnalysis` command, so it is defined once,
in `trinity_common.commands`: the gateway decodes requests into that struct and
the worker hands the same object to `profile_dataset`. A second definition here
would be a second contract to keep in step, and the handler's options would not
type-check against it. The analysis code imports it from this module all the same,
so its own options have one home inside the package.

Fields, all optional: ``encoding``, ``delimiter``, ``has_header``,
``decimal_comma`` (None means sniff or infer each), ``histogram_bins`` (1-200),
``top_values`` (1-100), ``correlations`` and ``max_correlation_columns`` (2-2000);
each is documented on the struct.
"""

from __future__ import annotations

from trinity_common.commands import AnalysisOptions

__all__ = ["AnalysisOptions"]
