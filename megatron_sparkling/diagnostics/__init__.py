"""Diagnostics of a growth: activation scales, function change and twin symmetry.

On live megatron-core GPTModels with every shard in this process (1 rank):
- `measure(model, batches) -> ModelFigures`: RMS of the residual stream at every layer's input
  and output, of every norm's output, r = RMS(y)/RMS(x) of every linear, the loss, logits RMS;
- `compare(before, after, batches, plan=None) -> GrowthReport`: both models on the same batches,
  the ratios after/before, loss change, max |logit difference|, and with a growth plan the twin
  section; `GrowthReport.to_text()` / `.to_json()`;
- `twin_similarity(model, plan, batches=None)`: cosine of each new unit's weights (and gradient on
  `batches`) with its twin's, summarized per grown axis; `twin_cosines(tensors, plan)` does the
  same on any global tensors by checkpoint key (pure tensor code);
- `first_update.first_update_gaps(grower, small, grown)`: Adam's first update after growth
  (m/sqrt(v) after one step) against the small model's, element for element;
- `verify_checkpoints(before_root, after_root, ...)`: the report of two torch_dist checkpoints
  (what `megatron-sparkling verify` prints).
"""
from megatron_sparkling.diagnostics.activations import (  # noqa: F401
    ActivationProbe,
    ModelFigures,
    SiteFigures,
    measure,
)
from megatron_sparkling.diagnostics.checkpoints import (  # noqa: F401
    RECORD_KEY,
    VerifyError,
    diagnostic_batches,
    plan_from_record,
    verify_checkpoints,
)
from megatron_sparkling.diagnostics.report import GrowthReport, compare  # noqa: F401
from megatron_sparkling.diagnostics.sites import Site  # noqa: F401
from megatron_sparkling.diagnostics.twins import (  # noqa: F401
    TwinFigures,
    model_gradients,
    summarize,
    twin_cosines,
    twin_similarity,
)
