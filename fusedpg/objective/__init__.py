"""Per-token policy-gradient losses (docs/losses.md): variants, aggregation, KL, entropy, rollout IS, OPSM.

Public API:
    pg_loss(logp, advantages, mask, *, entropy, old_logp, ref_logp, loss_type, config, **options) -> (loss, metrics)
    PGLossConfig                      one frozen dataclass of options
Engine contract (README.md in this folder):
    prepare(advantages, mask, ...) -> PGBatch           mask-only / precomputed, [N]-flattened, once per batch
    plan_of(config) -> "one_pass" | "sequence" | "two_phase"
    batch_coefficients(batch, logp, entropy, config)    two-phase hook on detached full-batch values
    token_loss(batch.slice(lo, hi), logp, entropy, config) -> (contribution [n], metric sums)
    merge_metrics / finalize_metrics                    combine chunk sums, then means
Distillation: topk_distillation_loss(student_logp [..., K], teacher_logp [..., K]) on the multi-target head.
"""
from .batch import PGBatch, prepare
from .config import PGLossConfig, make_config, plan_of, requirements, resolve
from .distill import on_policy_distillation_advantage, topk_distillation_loss
from .engine import batch_coefficients, epilogue_spec, pg_loss, token_loss
from .inputs import LossInputs
from .metrics import finalize_metrics, merge_metrics, metric_vector
from .registry import EpilogueSpec, Variant, get_variant, variant_names
from .regularizers import AdaptiveEntropyCoef
from .shaping import gtpo_token_weights

__all__ = [
    "pg_loss", "PGLossConfig", "PGBatch", "LossInputs", "EpilogueSpec", "epilogue_spec", "prepare", "token_loss",
    "batch_coefficients", "plan_of", "merge_metrics", "finalize_metrics", "metric_vector", "get_variant",
    "variant_names", "Variant", "make_config", "resolve", "requirements", "AdaptiveEntropyCoef", "gtpo_token_weights",
    "topk_distillation_loss", "on_policy_distillation_advantage",
]
