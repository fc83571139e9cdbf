"""The optimizers `train.optimizer` can name: one registry, read by the recipe (its choices), the
harness (to build one) and the memory estimator (the state each keeps per trainable parameter).

Importing this module imports no torch; each builder does when it runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def _adamw(params: list[Any], lr: float, weight_decay: float) -> Any:
    import torch

    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=params[0].is_cuda)


def _sgd(params: list[Any], lr: float, weight_decay: float) -> Any:
    import torch

    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)


def _bnb(paged: bool) -> Callable[[list[Any], float, float], Any]:
    def build(params: list[Any], lr: float, weight_decay: float) -> Any:
        import bitsandbytes as bnb

        cls = getattr(bnb.optim, "PagedAdamW8bit" if paged else "AdamW8bit")  # not in bnb.optim's __all__
        return cls(params, lr=lr, weight_decay=weight_decay)

    return build


@dataclass(frozen=True)
class OptimizerKind:
    name: str
    help: str
    build: Callable[[list[Any], float, float], Any]
    state_bytes: int     # optimizer state per trainable fp32 parameter (32-bit state; see eight_bit)
    eight_bit: bool = False  # bitsandbytes blockwise 8-bit state (needs its CUDA build)


OPTIMIZERS: dict[str, OptimizerKind] = {k.name: k for k in [
    OptimizerKind("adamw_torch", "AdamW (fused on CUDA)", _adamw, state_bytes=8),
    OptimizerKind("adamw_8bit", "bitsandbytes 8-bit AdamW", _bnb(paged=False), state_bytes=8, eight_bit=True),
    OptimizerKind("paged_adamw_8bit", "bitsandbytes paged 8-bit AdamW", _bnb(paged=True), state_bytes=8, eight_bit=True),
    OptimizerKind("sgd", "SGD with momentum 0.9", _sgd, state_bytes=4),
]}


def make_optimizer(name: str, params: list[Any], lr: float, weight_decay: float) -> Any:
    return OPTIMIZERS[name].build(params, lr, weight_decay)
