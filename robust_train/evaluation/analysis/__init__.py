"""Layer-wise analysis of a trained model: `robust-eval checkpoint=... analysis=[...]` (issue 5, item 4).

- `clustering` (clustering.py): clustering-effect accuracy per layer (SAT Def. 1 / Eq. 2, SLIM Table 5),
  computed by robust_train.metrics (shared with SAT's metric).
- `hessian_trace` (hessian.py): Hutchinson estimate of each module's CE Hessian-block trace.
- `layer_shift` (shift.py): relative feature shift and cosine between clean and adversarial features.
- `robust_overfitting` (overfitting.py): the suite on the sibling checkpoint (best <-> last) and the
  best-minus-last gap.

options.py validates `analysis_options` and picks layers, inputs.py crafts the shared adversarial
inputs, runner.py runs the requested analyses, report.py turns results into tables and W&B values.
Everything runs in eval mode and restores the model's modes and `requires_grad` flags.
"""

from robust_train.evaluation.analysis.clustering import (
    CentroidAccumulator,
    clustering_accuracy_layers,
    layer_centroids,
)
from robust_train.evaluation.analysis.hessian import hessian_modules, hutchinson_traces
from robust_train.evaluation.analysis.inputs import craft_adversarial
from robust_train.evaluation.analysis.options import (
    ANALYSES,
    ANALYSIS_SEED_OFFSET,
    CENTROID_SETS,
    DEFAULTS,
    LAYER_SETS,
    analysis_layers,
    validate_analysis,
)
from robust_train.evaluation.analysis.overfitting import (
    evaluate_sibling,
    format_gap,
    sibling_checkpoint,
    suite_gap,
)
from robust_train.evaluation.analysis.report import (
    analysis_rows,
    analysis_summary,
    format_analysis,
    log_analysis,
)
from robust_train.evaluation.analysis.runner import run_analysis
from robust_train.evaluation.analysis.shift import layer_shift

__all__ = [
    "ANALYSES",
    "ANALYSIS_SEED_OFFSET",
    "CENTROID_SETS",
    "DEFAULTS",
    "LAYER_SETS",
    "CentroidAccumulator",
    "analysis_layers",
    "analysis_rows",
    "analysis_summary",
    "clustering_accuracy_layers",
    "craft_adversarial",
    "evaluate_sibling",
    "format_analysis",
    "format_gap",
    "hessian_modules",
    "hutchinson_traces",
    "layer_centroids",
    "layer_shift",
    "log_analysis",
    "run_analysis",
    "sibling_checkpoint",
    "suite_gap",
    "validate_analysis",
]
