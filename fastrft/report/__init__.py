"""Metrics on disk and what is made of them.

- ``records``: the append-only metrics.jsonl (MetricsLog, read_metrics), atomic JSON writes and the
  lock the shared caches are written under;
- ``tables``: the before/after table of a run, the ladder's comparison and dynamics tables;
- ``figures``: a run's curves, the ladder's figure, several runs overlaid.
"""

from fastrft.report.figures import curves_figure, delta_xlim, ladder_figure, plot_curves, plot_ladder, plot_overlay
from fastrft.report.records import MetricsLog, eval_records, locked, plural, read_metrics, write_json
from fastrft.report.tables import (MIN_EFFECT, baseline, before_after_table, compare, dynamics_row, dynamics_table,
                                   ladder_row, ladder_table)

__all__ = ["MIN_EFFECT", "MetricsLog", "baseline", "before_after_table", "compare", "curves_figure", "delta_xlim",
           "dynamics_row", "dynamics_table", "eval_records", "ladder_figure", "ladder_row", "ladder_table", "locked",
           "plot_curves", "plot_ladder", "plot_overlay", "plural", "read_metrics", "write_json"]
