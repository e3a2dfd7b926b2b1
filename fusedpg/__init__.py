"""fusedpg: fused Triton kernels for policy-gradient RL training of LLMs."""
from .linear import linear_logprob_entropy
from .logits import logprob_entropy
from .options import LogProbOptions

__version__ = "0.1.0"
__all__ = ["linear_logprob_entropy", "logprob_entropy", "LogProbOptions", "__version__"]
