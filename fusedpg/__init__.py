"""fusedpg: fused Triton kernels for policy-gradient RL training of LLMs."""
from .linear import linear_logprob_entropy
from .logits import logprob_entropy
from .options import LogProbOptions

__version__ = "0.1.0"
__all__ = ["linear_logprob_entropy", "logprob_entropy", "LogProbOptions", "__version__"]
from . import advantages, objective
from .objective import PGLossConfig, pg_loss
__all__ += ["pg_loss", "PGLossConfig", "objective", "advantages"]
from .linear_pg import FusedLinearPGLoss, fused_linear_pg_loss, fused_plan
__all__ += ["fused_linear_pg_loss", "FusedLinearPGLoss", "fused_plan"]
from .linear.sample import sample_logprob_entropy
from .linear_pg.otr import otr_loss, otr_sft_loss
__all__ += ["sample_logprob_entropy", "otr_loss", "otr_sft_loss"]
from .head import FusedLMHead, call_through, install_lm_head, uninstall_lm_head
__all__ += ["FusedLMHead", "install_lm_head", "uninstall_lm_head", "call_through"]

# Shared-prefix (Prefix Grouper) attention; fusedpg.prefix imports neither triton nor transformers at import time.
from . import prefix  # noqa: E402
from .prefix import shared_prefix_attention  # noqa: E402

__all__ += ["prefix", "shared_prefix_attention"]
