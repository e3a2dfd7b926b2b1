"""``FusedLMHead``: the LM head as an ``nn.Linear`` whose own forward runs the fused ops, so that the wrappers of
distributed training (DDP, FSDP2, DeepSpeed ZeRO-3) see the head's weight used inside a module forward.

Every fused LM-head loss that reads ``lm_head.weight`` outside a forward breaks under some wrapper: ZeRO-3 hands out
an empty partition, FSDP2 a DTensor shard whose ``full_tensor()`` gradient never reaches the reduce-scatter, and a
bypassed DDP forward never all-reduces. Inside ``FusedLMHead.forward`` the weight is whatever the wrapper put there
for a forward (unsharded, gathered, cast to the mixed-precision dtype), and the gradient goes back through the
wrapper's own hooks. ``call_through`` runs a whole-model step through the outermost wrapper's forward for the same
reason. Recipes per wrapper: README.md ("More than one GPU").
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .linear import linear_logprob_entropy
from .linear_pg import fused_linear_pg_loss
from .objective import PGLossConfig

__all__ = ["FusedLMHead", "install_lm_head", "uninstall_lm_head", "call_through", "UNSUPPORTED_HEAD_CONFIG"]

#: config fields of heads that are not a plain linear map (logit soft-capping, logit scaling): the fused ops would
#: compute other logits than the model's, so they refuse such heads.
UNSUPPORTED_HEAD_CONFIG = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                           "logits_scaling")


class FusedLMHead(torch.nn.Linear):
    """``nn.Linear(H, V)`` whose forward is also the fused log-prob and policy-gradient loss.

    * ``head(hidden)``: logits ``[..., V]``, exactly ``nn.Linear`` (generation and every other caller unchanged).
    * ``head(hidden, targets)``: ``(logp, entropy)`` of :func:`fusedpg.linear_logprob_entropy` (keywords such as
      ``temperature``, ``impl``, ``chunk_bytes``, ``vocab_parallel_group`` pass through).
    * ``head(hidden, targets, advantages=..., mask=..., old_logp=..., ...)``: ``(loss, metrics)`` of
      :func:`fusedpg.fused_linear_pg_loss`, with ``config`` (the head's, unless given) and the loss keywords.

    Equivalent PyTorch: ``logits = hidden @ weight.T + bias``, then the log-softmax / loss on the logits.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 config: Optional[PGLossConfig] = None, **defaults):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.config, self.defaults = config, dict(defaults)

    @classmethod
    def from_linear(cls, linear: torch.nn.Module, *, config: Optional[PGLossConfig] = None,
                    **defaults) -> "FusedLMHead":
        """A head that shares ``linear``'s Parameters (tied embeddings stay tied); ``defaults`` are keywords added to
        every fused call (``impl``, ``chunk_bytes``, ``temperature`` ...)."""
        _check_linear(linear)
        head = cls.__new__(cls)
        torch.nn.Module.__init__(head)
        head.in_features, head.out_features = linear.in_features, linear.out_features
        head.weight = linear.weight
        head.register_parameter("bias", linear.bias)
        head.config, head.defaults = config, dict(defaults)
        object.__setattr__(head, "replaced", linear)  # not a submodule: its Parameters are the head's own
        return head

    def extra_repr(self) -> str:
        config = "" if self.config is None else f", loss_type={self.config.loss_type!r}"
        defaults = "".join(f", {k}={v!r}" for k, v in self.defaults.items())
        return super().extra_repr() + config + defaults

    def forward(self, hidden: torch.Tensor, targets: Optional[torch.Tensor] = None, **kwargs):
        if targets is None:
            if kwargs:
                raise TypeError(f"FusedLMHead: keywords {sorted(kwargs)} need targets (the sampled token ids)")
            return torch.nn.functional.linear(hidden, self.weight, self.bias)
        kwargs = {**self.defaults, **kwargs}
        if hidden.dtype != self.weight.dtype and hidden.is_floating_point():
            hidden = hidden.to(self.weight.dtype)  # autocast / mixed-precision backbones hand out another dtype
        if "advantages" in kwargs or "mask" in kwargs:
            if "advantages" not in kwargs or "mask" not in kwargs:
                raise TypeError("FusedLMHead: the loss needs both advantages and mask, got only "
                                f"{'advantages' if 'advantages' in kwargs else 'mask'}")
            advantages, mask = kwargs.pop("advantages"), kwargs.pop("mask")
            kwargs.setdefault("config", self.config)
            return fused_linear_pg_loss(hidden, self.weight, targets, advantages, mask, bias=self.bias, **kwargs)
        return linear_logprob_entropy(hidden, self.weight, targets, bias=self.bias, **kwargs)


def _check_linear(linear) -> None:
    if hasattr(linear, "lora_A") or hasattr(linear, "base_layer"):
        raise ValueError("the LM head carries a PEFT adapter (LoRA on lm_head), which the fused head would not "
                         "apply: leave lm_head out of target_modules, or merge the adapter (merge_and_unload) first")
    if not isinstance(linear, torch.nn.Linear):
        raise TypeError(f"the LM head must be a torch.nn.Linear, got {type(linear).__name__}")
    if hasattr(linear, "_get_fsdp_state") or linear._forward_pre_hooks or linear._forward_hooks:
        raise ValueError("install the fused LM head before wrapping the model (fully_shard, deepspeed.initialize): "
                         "the LM head already has forward hooks, which the new module would not run")


def install_lm_head(model: torch.nn.Module, *, config: Optional[PGLossConfig] = None, **defaults) -> FusedLMHead:
    """Swap a transformers model's output embeddings for a :class:`FusedLMHead` sharing its Parameters; return the
    head (the one already installed, if any). Undo with :func:`uninstall_lm_head`. Raises ``ValueError`` for heads
    that are not a plain linear map (logit soft-capping or scaling, a LoRA adapter)."""
    old = model.get_output_embeddings()
    if isinstance(old, FusedLMHead):
        return old
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in UNSUPPORTED_HEAD_CONFIG:
        if getattr(text, name, None) not in (None, 1.0):
            raise ValueError(f"the model's head applies {name}={getattr(text, name)!r} to its logits, which the fused "
                             "ops do not compute; use the model's own logits (fusedpg.logprob_entropy)")
    head = FusedLMHead.from_linear(old, config=config, **defaults)
    model.set_output_embeddings(head)
    return head


def uninstall_lm_head(model: torch.nn.Module) -> None:
    """Put back the module :func:`install_lm_head` replaced (its Parameters were shared, so nothing is copied)."""
    head = model.get_output_embeddings()
    if isinstance(head, FusedLMHead) and getattr(head, "replaced", None) is not None:
        model.set_output_embeddings(head.replaced)


def call_through(wrapper: torch.nn.Module, fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)``, run as the forward of the model inside ``wrapper`` (DDP, DeepSpeed's engine, or a
    module that ``fully_shard`` hooked), so that the wrapper's forward logic runs around it: DDP arms its gradient
    all-reduce, FSDP2 unshards the root's parameters, ZeRO-3 registers its hooks. A wrapper that moves inputs hands
    ``fn`` the moved ones. Without a wrapper it is a plain call of the module with ``fn`` as its forward."""
    inner = wrapper
    while isinstance(getattr(inner, "module", None), torch.nn.Module):
        inner = inner.module
    own = inner.__dict__.get("forward")  # an instance-level forward (e.g. a hidden-state forward) is kept

    def restore():
        if own is None:
            inner.__dict__.pop("forward", None)
        else:
            inner.forward = own

    def once(*a, **k):
        restore()
        return fn(*a, **k)

    inner.forward = once
    try:
        return wrapper(*args, **kwargs)
    finally:
        restore()
