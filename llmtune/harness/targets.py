"""LoRA target presets resolved from a model's own module structure; attention and packing choices.

peft's LoraConfig takes `target_modules` (suffixes of nn.Linear/Conv1D names) and, for MoE experts that
transformers 5 stores as fused 3-D parameters, `target_parameters` (adapted by lora.ParamWrapper, which
refuses lora_dropout != 0; peft 0.21 has no per-target dropout).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from llmtune.errors import LlmtuneError

PRESETS = ("qv", "attention", "mlp", "all-linear")

_ATTN_PART = re.compile(r"attn|attention")
_MLP_PART = re.compile(r"mlp|moe|expert|ffn|feed_?forward")
_ROUTER_PART = re.compile(r"^(gate|router|switch)$|_gate$|^router")
_ROLE_PATTERNS = (  # fused first: 'query_key_value' must not read as a query
    ("qkv", re.compile(r"qkv|query_key_value|c_attn|w_pack")),  # not in_proj: Mamba mixers use it
    ("kv", re.compile(r"^(kv|wkv)(_|$)")),
    ("q", re.compile(r"^(q|wq|query|q_lin|to_q)$|^q_.*proj")),
    ("k", re.compile(r"^(k|wk|key|k_lin|to_k)$|^k_.*proj")),
    ("v", re.compile(r"^(v|wv|value|v_lin|to_v)$|^v_.*proj")),
)
_O = re.compile(r"^(o|wo|o_proj|out_proj|dense|c_proj|out_lin|to_out|out|proj)$")
_MLP_LEAF = re.compile(r"^(fc\d|fc_in|fc_out|w\d|c_fc|dense_h_to_4h|dense_4h_to_h|(gate|up|down|gate_up)_proj|wi(_\d)?)$")
_QV_ROLES = {"q", "v", "qkv", "kv"}
_ATTN_ROLES = {"q", "k", "v", "qkv", "kv", "o", "attn"}
_WHY = {"qv": "no query/value projections", "attention": "no attention projections",
        "mlp": "no feed-forward layers", "all-linear": "no linear layers"}


class TargetError(LlmtuneError, ValueError):
    """A LoRA target setting that means nothing for this model."""


class AttentionError(LlmtuneError, ValueError):
    """An attention implementation this model class does not support."""


@dataclass(frozen=True)
class TargetPlan:
    """What to pass to peft's LoraConfig for one preset on one model."""

    target_modules: list[str]
    target_parameters: list[str]
    notes: tuple[str, ...] = ()

    def lora_kwargs(self) -> dict[str, Any]:
        # target_modules stays a list even when empty: None makes peft fall back to its per-model defaults
        return {"target_modules": list(self.target_modules), "target_parameters": list(self.target_parameters) or None}


def meta_model(config: Any) -> Any:
    """The causal-LM for `config` on the meta device: the full module tree, no memory, no weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _linear_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)  # bitsandbytes' Linear4bit/8bitLt and FalconLinear subclass nn.Linear


def _unwrap(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _model_type(model: Any) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__)


def _classify(parts: list[str]) -> str:
    """Role of a linear from its path inside one block: q k v qkv kv o attn | mlp router | other."""
    containers, leaf = [p.lower() for p in parts[:-1]], parts[-1].lower()
    in_attn = any(_ATTN_PART.search(p) for p in containers)
    in_mlp = any(_MLP_PART.search(p) for p in containers)
    if in_mlp and any(_ROUTER_PART.search(p) for p in containers + [leaf]):
        return "router"
    if in_attn or not in_mlp:
        for role, pattern in _ROLE_PATTERNS:
            if pattern.search(leaf):
                return role
        if in_attn:
            return "o" if _O.match(leaf) else "attn"
    return "mlp" if in_mlp or _MLP_LEAF.match(leaf) else "other"


def _by_position(roles: dict[str, str]) -> None:
    """Unnamed attention linears of one block: the last is the output, the rest q,k,v (or one fused qkv)."""
    unknown = [n for n, r in roles.items() if r == "attn"]
    if unknown and "o" not in roles.values():
        roles[unknown.pop()] = "o"
    guesses = {1: ["qkv"], 3: ["q", "k", "v"]}.get(len(unknown), [])
    if guesses and not _QV_ROLES & set(roles.values()):
        roles.update(zip(unknown, guesses, strict=True))


def _suffixes(chosen: Iterable[str], all_names: list[str], min_parts: int = 1) -> list[str]:
    """Shortest name suffix for each chosen name that matches (by peft's rule) only chosen names."""
    chosen_set, out = set(chosen), set()
    for name in chosen_set:
        parts = name.split(".")
        for i in range(max(len(parts) - min_parts, 0), -1, -1):
            suffix = ".".join(parts[i:])
            if all(n in chosen_set for n in all_names if n == suffix or n.endswith("." + suffix)):
                break
        out.add(suffix)
    return sorted(out)


@dataclass
class _Structure:
    roles: dict[str, str]  # in-block linear name -> role
    experts: list[str]     # in-block fused 3-D expert parameter names
    module_names: list[str]
    param_names: list[str]
    linear_names: list[str]
    head: str | None


def _structure(model: Any) -> _Structure:
    linears: dict[str, Any] = {n: m for n, m in model.named_modules() if isinstance(m, _linear_types())}
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = next((n for n, m in linears.items() if m is out_emb), "lm_head" if "lm_head" in linears else None)
    # the decoder stack: the ModuleList holding the most linears (outermost on ties, so not an experts list)
    lists = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and n]
    counts = {n: sum(1 for lin in linears if lin.startswith(n + ".")) for n in lists}
    prefix = min(counts, key=lambda n: (-counts[n], len(n))) if counts and max(counts.values()) else ""
    per_block: dict[str, dict[str, str]] = {}
    for name in linears:
        if name != head and (not prefix or name.startswith(prefix + ".")):
            rel = name[len(prefix) + 1:].split(".") if prefix else ["", *name.split(".")]
            per_block.setdefault(rel[0], {})[name] = _classify(rel[1:])
    roles: dict[str, str] = {}
    for block_roles in per_block.values():
        _by_position(block_roles)
        roles.update(block_roles)
    # fused experts: 3-D parameters under an mlp/moe/experts path (a Mamba mixer's conv1d weight is 3-D too)
    experts = [f"{mn}.{pn}" for mn, mod in model.named_modules()
               if prefix and mn.startswith(prefix + ".") and not isinstance(mod, _linear_types())
               and any(_MLP_PART.search(part.lower()) for part in mn.split("."))
               for pn, p in mod.named_parameters(recurse=False) if p.dim() == 3]
    return _Structure(roles, experts, [n for n, _ in model.named_modules()],
                      [n for n, _ in model.named_parameters()], list(linears), head)


def _leafs(names: Iterable[str]) -> str:
    return ", ".join(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names))


def _what_it_has(s: _Structure) -> str:
    names = _leafs(n for n in s.linear_names if n != s.head) or "(none)"
    return names + (f"; expert parameters: {', '.join(_suffixes(s.experts, s.param_names, 2))}" if s.experts else "")


def _meaningful(s: _Structure) -> dict[str, bool]:
    present = set(s.roles.values())
    return {"qv": {"q", "v"} <= present or bool(present & {"qkv", "kv"}), "attention": bool(present & _ATTN_ROLES),
            "mlp": "mlp" in present or bool(s.experts), "all-linear": bool(present or s.experts)}


def resolve_targets(model: Any, preset_or_list: str) -> TargetPlan:
    """A preset (qv, attention, mlp, all-linear) or 'a,b,c' -> the TargetPlan for this model (meta is fine)."""
    model = _unwrap(model)
    s, mtype, value = _structure(model), _model_type(model), preset_or_list.strip()
    if value not in PRESETS:
        return _named_targets(s, mtype, [v.strip() for v in value.split(",") if v.strip()])
    meaningful = _meaningful(s)
    if not meaningful[value]:
        instead = "".join(f"{p!r} or " for p, ok in meaningful.items() if ok)
        raise TargetError(f"lora_target_modules: {value!r} has no meaning for {mtype}: {_WHY[value]} in its "
                          f"blocks; use {instead}name modules: {_what_it_has(s)}")
    roles, experts, notes = s.roles, list(s.experts), []
    present = set(roles.values())
    if value == "qv":
        wanted, experts = ({"q", "v"} if {"q", "v"} <= present else _QV_ROLES), []
        if wanted == _QV_ROLES:
            fused = _leafs(n for n, r in roles.items() if r in ("qkv", "kv"))
            notes.append(f"'qv' on {mtype}: query and value live in the fused {fused}, so its key part is adapted too")
    elif value == "attention":
        wanted, experts = _ATTN_ROLES, []
    elif value == "mlp":
        wanted = {"mlp"}
        if "router" in present:
            notes.append(f"MoE routers left frozen: {_leafs(n for n, r in roles.items() if r == 'router')}")
    else:
        wanted = present
    if experts:
        notes.append(f"MoE experts of {mtype} are fused 3-D parameters ({_leafs(experts)}): adapted through "
                     "peft target_parameters (lora.ParamWrapper), which needs lora_dropout=0")
    return TargetPlan(_suffixes([n for n, r in roles.items() if r in wanted], s.module_names),
                      _suffixes(experts, s.param_names, 2), tuple(notes))


def _named_targets(s: _Structure, mtype: str, names: list[str]) -> TargetPlan:
    modules, params, missing = [], [], []
    linear_set = set(s.linear_names)
    for want in names:
        mods = [n for n in s.module_names if n == want or n.endswith("." + want)]
        if s.head is not None and s.head in mods:
            raise TargetError(f"lora_target_modules: {want!r} is the output head of {mtype}; "
                              "LoRA on the output embedding is not supported")
        if mods and all(m in linear_set for m in mods):
            modules.append(want)
        elif not mods and any(p == want or p.endswith("." + want) for p in s.experts):
            params.append(want)
        else:
            missing.append(want)
    if missing or not names:
        raise TargetError(f"lora_target_modules: {', '.join(missing) or '(empty)'} match no linear module of "
                          f"{mtype}; its linear modules are: {_what_it_has(s)}")
    return TargetPlan(modules, params, ("named expert parameters need lora_dropout=0",) if params else ())


def check_dropout(plan: TargetPlan, lora_dropout: float, *, coerce: bool = False) -> float:
    """The lora_dropout peft accepts for `plan`: parameter targets (MoE experts) need 0.

    peft has one dropout per LoraConfig, so coerce=True turns a nonzero dropout into 0.0 for the whole
    adapter; otherwise a TargetError says what to change.
    """
    if not plan.target_parameters or not lora_dropout:
        return float(lora_dropout)
    if coerce:
        return 0.0
    raise TargetError(f"lora_dropout={lora_dropout} cannot be used with these targets: the MoE expert parameters "
                      f"({', '.join(plan.target_parameters)}) are adapted by peft's lora.ParamWrapper, which only "
                      "supports lora_dropout=0; set lora_dropout: 0, or choose 'attention' or 'qv'")


def _model_class(model_or_config: Any) -> type:
    from transformers import PretrainedConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if isinstance(model_or_config, type):
        return model_or_config
    if isinstance(model_or_config, PretrainedConfig):
        try:
            cls: type = MODEL_FOR_CAUSAL_LM_MAPPING[type(model_or_config)]  # type: ignore[assignment]
            return cls
        except KeyError:
            raise AttentionError(f"no causal-LM class known for {model_or_config.model_type}; "
                                 "pass the model (or its class) instead") from None
    return type(_unwrap(model_or_config))


def supported_attention(model_or_config: Any) -> list[str]:
    """Attention implementations the model class declares (transformers' _supports_* class flags)."""
    cls = _model_class(model_or_config)
    out = ["eager"] + (["sdpa"] if getattr(cls, "_supports_sdpa", False) else [])
    if getattr(cls, "_supports_flash_attn", False) or getattr(cls, "_supports_flash_attn_2", False):
        out += ["flash_attention_2", "flash_attention_3"]
    return out + (["flex_attention"] if getattr(cls, "_supports_flex_attn", False) else [])


def attention_implementation(model_or_config: Any, requested: str | None) -> str:
    """requested None/'auto' -> 'sdpa' where supported, else 'eager'; an unsupported request -> AttentionError."""
    supported = supported_attention(model_or_config)
    if requested in (None, "", "auto"):
        return "sdpa" if "sdpa" in supported else "eager"
    if requested in supported:
        return str(requested)
    raise AttentionError(f"model.attn_implementation: {requested!r} is not supported by "
                         f"{_model_class(model_or_config).__name__}; it supports {', '.join(supported)} "
                         "(or 'auto': sdpa where supported, else eager)")


def packed_attention_mask(position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive 4-D causal block-diagonal mask (batch, 1, q, k) for rows packed with restarting position_ids.

    Additive floats (0 / dtype min), not bools: eager attention adds the mask to the scores.
    """
    pos = position_ids if position_ids.dim() == 2 else position_ids[None]
    seq = (torch.diff(pos, dim=-1, prepend=pos[:, :1] - 1) != 1).cumsum(-1)
    causal = torch.ones(pos.shape[-1], pos.shape[-1], dtype=torch.bool, device=pos.device).tril()
    allowed = causal[None] & (seq[:, :, None] == seq[:, None, :])
    return torch.where(allowed, torch.zeros((), dtype=dtype, device=pos.device), torch.finfo(dtype).min)[:, None]


@torch.no_grad()
def packing_mode(model: Any, atol: float = 1e-3) -> str:
    """How this model keeps packed examples apart: 'position_ids', 'mask' (packed_attention_mask) or 'none'.

    Probes the real model with two short examples; exact means an error within atol or under 5% of the
    error of not separating them at all (bf16 noise on real weights exceeds any fixed atol).
    """
    was_training, device = model.training, next(model.parameters()).device
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    ids = torch.randint(0, model.get_input_embeddings().weight.shape[0], (1, 12),
                        generator=torch.Generator().manual_seed(0)).to(device)
    pos = torch.cat([torch.arange(5), torch.arange(7)])[None].to(device)
    model.eval()
    try:
        alone = model(input_ids=ids[:, 5:], position_ids=pos[:, 5:], use_cache=False).logits[0].float()

        def err(position_ids: torch.Tensor, **kw: Any) -> float:
            out = model(input_ids=ids, position_ids=position_ids, use_cache=False, **kw).logits[0, 5:].float()
            return float((out - alone).abs().max())

        limit = max(atol, 0.05 * err(torch.arange(12, device=device)[None]))
        if err(pos) <= limit:
            return "position_ids"
        try:
            if err(pos, attention_mask=packed_attention_mask(pos, dtype)) <= limit:
                return "mask"
        except (ValueError, RuntimeError, TypeError):
            pass  # BLOOM builds its ALiBi bias from a 2-D mask and cannot take a 4-D one
        return "none"
    finally:
        model.train(was_training)


# Config fields that size a model, by the names architectures use for them, and a tiny value for each.
_SHRINK = {
    ("hidden_size", "n_embd", "d_model"): 32, ("num_hidden_layers", "n_layer", "num_layers"): 1,
    ("num_attention_heads", "n_head"): 4, ("num_key_value_heads", "multi_query_group_num"): 2,
    ("intermediate_size", "ffn_dim", "n_inner", "moe_intermediate_size", "shared_expert_intermediate_size"): 64,
    ("head_dim",): 8, ("vocab_size",): 128, ("num_local_experts", "num_experts"): 2,
}


def packing_probe(config: Any, attn: str | None = None) -> str | None:
    """`packing_mode` of a 1-layer random-weight copy of this architecture (no download, no real weights):
    how its attention keeps packed examples apart. None when such a copy cannot be built."""
    import copy

    from transformers import AutoModelForCausalLM

    try:
        small = copy.deepcopy(config)
        for names, value in _SHRINK.items():
            for name in names:
                current = getattr(small, name, None)
                if isinstance(current, int) and not isinstance(current, bool):
                    try:
                        setattr(small, name, value)
                    except AttributeError:  # derived (a read-only property): follows the others
                        pass
        if isinstance(getattr(small, "layer_types", None), list):
            small.layer_types = small.layer_types[:1]
        if getattr(small, "num_experts_per_tok", None):
            small.num_experts_per_tok = 1
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(small, attn_implementation=attention_implementation(small, attn),
                                                 dtype=torch.float32)
        return packing_mode(model)
    except Exception:  # an architecture whose sizes are named otherwise: the trial's own probe decides
        return None
