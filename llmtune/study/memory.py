"""Predict the peak GPU memory of one LoRA / QLoRA training step from the model config alone.

The architecture is instantiated on the meta device (no weights, no GPU) to get exact parameter counts and every
Linear's shape; the rest is arithmetic on what PyTorch autograd, peft and bitsandbytes keep alive at the peak.
All sizes are bytes; ``*_gb`` values are GiB (2**30 bytes), which is what llmtune calls ``peak_memory_gb``.

Assumed training recipe (llmtune's harness; ``autocast=True`` models the HF Trainer's mixed precision instead):

* The base model runs in ``dtype`` without autocast. LoRA A/B are fp32 (peft's ``autocast_adapter_dtype=True``
  upcasts 16-bit adapters), so are their grads; peft casts each LoRA layer's input to fp32, and every such
  copy is saved for backward (under autocast each layer saves a 16-bit copy instead).
* ``quantization`` != "none" loads with bitsandbytes and calls ``peft.prepare_model_for_kbit_training``, which
  upcasts every non-quantized parameter (embeddings, lm_head, norms, biases) to fp32 (``kbit_upcast=True``).
  A side effect: the residual stream and MLP intermediates then run in fp32 (bnb layers return the input dtype).
* Attention is SDPA (no s*s matrix saved). Packed batches carry no padding mask; unpacked batches are padded to
  ``sequence_len`` (worst case) and have a mask, so SDPA uses the mem-efficient kernel with a per-layer
  additive bias and transformers materialises repeated K/V for GQA.
* ``outputs.logits`` stays referenced through backward (a plain ``out = model(**b); out.loss.backward()`` loop).
  At the start of backward each logit holds its 16-bit value, the fp32 log-softmax output, its fp32 grad and
  the 16-bit grad of the logits: 12 bytes in bf16, measured on an H100 over four shapes (benchmarks/
  memory_accuracy.py), where vocabularies of 128k-152k make this the largest single term.
* bitsandbytes' 8-bit matmul keeps its input on ``ctx`` rather than through ``save_for_backward``, so
  gradient checkpointing cannot drop it: 8-bit layers hold their inputs for every layer either way. On CUDA
  it also keeps the outlier columns of each input (``subA``, |x| > 6); how many there are depends on the data,
  not the config, so 8-bit + checkpointing is under-predicted there (-25% in the one such config measured);
  the study's calibration fit absorbs what it sees.
* The CUDA caching allocator runs with ``expandable_segments`` (llmtune sets it for trials), so reserved memory
  stays close to the allocated peak.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmtune.config.problems import one_of
from llmtune.harness.optimizers import OPTIMIZERS

if TYPE_CHECKING:
    from transformers import PretrainedConfig

GIB = 2**30
# CUDA context of a PyTorch process (driver state + kernel images), outside torch's allocator, so only NVML sees
# it: NVML minus torch's reserved peak was 0.74 GiB in every trial on an H100 (torch 2.11, CUDA 13, driver 580).
CUDA_CONTEXT_BYTES = 760 * 2**20
# cuBLAS workspace per stream on sm90 (CUBLAS_WORKSPACE_CONFIG default ":4096:8" = 8 x 4 MiB), via torch's allocator.
CUBLAS_WORKSPACE_BYTES = 32 * 2**20
# Caching-allocator slack: blocks are rounded (512 B small / 2 MiB large segments) and freed blocks fragment, so
# reserved exceeds allocated by a few percent of the churning (activation + logits) memory.
ALLOCATOR_SLACK_FRACTION = 0.02
BNB_4BIT_BLOCKSIZE = 64  # bitsandbytes quantize_4bit default: one absmax per 64 weights
BNB_NESTED_BLOCKSIZE = 256  # double quant: absmax itself blockwise-quantized to uint8, one fp32 scale per 256
BNB_OPTIM_BLOCKSIZE = 256  # 8-bit optimizers: one fp32 absmax per 256 state values
BNB_OPTIM_MIN_8BIT_SIZE = 4096  # smaller tensors keep 32-bit optimizer state (bnb min_8bit_size default)
# Cross entropy at its peak (start of backward), per logit, beyond the held logits: the fp32 log_softmax output,
# its fp32 grad, and the grad of the logits in their own dtype (see the module docstring).
LOSS_FP32_BUFFERS = 2

_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak memory of one training step, split by what holds it (bytes).

    ``activations`` and ``logits`` are what is alive at the peak moment: usually the start of backward (all saved
    tensors + fp32 loss buffers); with checkpointing and a small vocabulary it can be a layer's recomputation,
    when only the 16-bit logits are left. ``gradients`` counts all LoRA grads (they persist across accumulation).
    """

    weights: int
    lora: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    overhead: int
    trainable_params: int
    total_params: int

    @property
    def total(self) -> int:
        """Predicted peak in bytes."""
        return (self.weights + self.lora + self.gradients + self.optimizer + self.activations
                + self.logits + self.overhead)

    @property
    def total_gb(self) -> float:
        """Predicted peak in GiB (2**30 bytes), llmtune's ``peak_memory_gb`` unit."""
        return self.total / GIB

    def breakdown(self) -> dict[str, float]:
        """GiB per part plus ``total``, for printing."""
        parts = ("weights", "lora", "gradients", "optimizer", "activations", "logits", "overhead")
        out = {p: getattr(self, p) / GIB for p in parts}
        out["total"] = self.total_gb
        return out


@dataclass(frozen=True)
class _Linear:
    name: str
    in_features: int
    out_features: int
    quantized: bool  # bitsandbytes replaces it (every Linear but the output head / tied / last module)
    head: bool  # the output embedding, which peft's "all-linear" skips
    in_layer: bool  # inside a repeated decoder block


@dataclass(frozen=True)
class _Shape:
    """What the estimate needs from the architecture."""

    total_params: int
    linears: tuple[_Linear, ...]
    layer_norm_elems: int  # per token, summed over norm modules inside the blocks
    layer_norms: int
    outer_norm_elems: int  # final norm(s)
    outer_norms: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    gated: bool  # SwiGLU/GeGLU MLP (saves gate out, act(gate), up); plain MLP saves the activation input only
    vocab: int


_SHAPE_CACHE: dict[str, _Shape] = {}
_LAYER_RE = re.compile(r"\.\d+\.")


def _check_arguments(**given: Any) -> None:
    """Every bad argument of `estimate_memory` at once, as a user error (RecipeError, a ValueError too)."""
    from llmtune.errors import Problem, RecipeError

    choices = {"dtype": sorted(_DTYPE_BYTES), "quantization": ["none", "8bit", "4bit"],
               "bnb_4bit_quant_type": ["nf4", "fp4"], "optimizer": list(OPTIMIZERS)}
    problems = [Problem(name, one_of(given[name], options)) for name, options in choices.items()
                if given[name] not in options]
    if given["quantization"] in ("nf4", "fp4"):
        problems[-1:] = [Problem("quantization", f"{given['quantization']!r} is a 4-bit type, not a quantization: use "
                                 f"quantization='4bit', bnb_4bit_quant_type={given['quantization']!r}")]
    if not str(given["device"]).startswith(("cuda", "cpu")):
        problems.append(Problem("device", f"{given['device']!r} is not cpu or cuda (cuda:N names one GPU)"))
    for name in ("lora_r", "micro_batch_size", "sequence_len"):
        value = given[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(Problem(name, f"{value!r} is not a whole number >= 1"))
    if problems:
        raise RecipeError(problems, source="estimate_memory")


def _load_config(model: Any) -> PretrainedConfig:
    if isinstance(model, (str, os.PathLike)):
        from transformers import AutoConfig

        from llmtune.builtin.names import resolve_model_name
        from llmtune.errors import Problem, RecipeError

        name = resolve_model_name(os.fspath(model), log=lambda _: None)  # a built-in name: its local folder
        try:
            config: PretrainedConfig = AutoConfig.from_pretrained(name)
            return config
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RecipeError([Problem("model", f"{os.fspath(model)!r}: its config could not be read ({first[:300]}); "
                                                "give a local model folder, a Hub name (online or cached) or a "
                                                "transformers config")], source="estimate_memory") from None
    if not hasattr(model, "to_json_string"):
        from llmtune.errors import Problem, RecipeError

        raise RecipeError([Problem("model", f"{type(model).__name__} {model!r:.80}: give a local model folder, a Hub "
                                            "name or a transformers config")], source="estimate_memory")
    return model  # type: ignore[no-any-return]  # a config by duck type (to_json_string)


def _model_shape(config: PretrainedConfig) -> _Shape:
    """Instantiate on the meta device (cached per config) and read counts and Linear shapes."""
    key = config.to_json_string()
    if key in _SHAPE_CACHE:
        return _SHAPE_CACHE[key]
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    params = list(model.named_parameters())  # deduplicated: tied embeddings count once
    last_module = params[-1][0].rsplit(".", 1)[0]
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = text.hidden_size
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    linears, norm = [], {True: [0, 0], False: [0, 0]}
    for name, mod in model.named_modules():
        in_layer = bool(_LAYER_RE.search(f".{name}."))
        if isinstance(mod, (torch.nn.Linear, Conv1D)):
            w = mod.weight  # Conv1D stores (in, out), Linear (out, in)
            in_f, out_f = (w.shape[0], w.shape[1]) if isinstance(mod, Conv1D) else (w.shape[1], w.shape[0])
            quantizable = mod is not head and name != last_module
            linears.append(_Linear(name, int(in_f), int(out_f), quantizable, mod is head, in_layer))
        elif type(mod).__name__.endswith("Norm") or isinstance(mod, torch.nn.LayerNorm):
            nw = getattr(mod, "weight", None)
            dim = int(nw.shape[-1]) if nw is not None else hidden
            # q_norm / k_norm normalise each head separately: dim == head_dim, applied heads times per token
            mult = (heads if "q" in name.rsplit(".", 1)[-1] else kv_heads) if dim == head_dim != hidden else 1
            norm[in_layer][0] += dim * mult
            norm[in_layer][1] += 1
    layers = text.num_hidden_layers
    inter = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden
    layer0 = [lin for lin in linears if re.search(r"\.0\.", f".{lin.name}.")]
    n_up = sum(lin.out_features == inter for lin in layer0)
    fused_gate_up = any(lin.out_features == 2 * inter for lin in layer0)
    shape = _Shape(
        total_params=sum(p.numel() for _, p in params), linears=tuple(linears),
        layer_norm_elems=norm[True][0], layer_norms=norm[True][1],
        outer_norm_elems=norm[False][0], outer_norms=norm[False][1],
        hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        intermediate=inter, gated=n_up >= 2 or fused_gate_up, vocab=text.vocab_size,
    )
    _SHAPE_CACHE[key] = shape
    return shape


def _targeted(lin: _Linear, targets: list[str] | str) -> bool:
    """peft's matching: "all-linear" = every Linear but the output head; list = exact name or ``.suffix``;
    other str = regex fullmatch."""
    if isinstance(targets, str):
        if targets.lower() == "all-linear":
            return not lin.head
        return re.fullmatch(targets, lin.name) is not None
    return any(lin.name == t or lin.name.endswith(f".{t}") for t in targets)


def _weight_bytes(shape: _Shape, quantization: str, double_quant: bool, dtype_bytes: int, kbit_upcast: bool) -> int:
    """Base weights as held during training, including bnb quantization state (nf4 and fp4 store the same)."""
    if quantization == "none":
        return shape.total_params * dtype_bytes
    qlins = [lin for lin in shape.linears if lin.quantized]
    other = shape.total_params - sum(lin.in_features * lin.out_features for lin in qlins)
    # non-quantized params (embeddings, head, norms, biases) stay 16-bit; prepare_model_for_kbit_training -> fp32
    total = other * (4 if kbit_upcast else dtype_bytes)
    for lin in qlins:
        n = lin.in_features * lin.out_features
        if quantization == "8bit":
            total += n + 4 * lin.out_features  # int8 CB + fp32 per-row scale SCB
        else:  # 4bit
            blocks = math.ceil(n / BNB_4BIT_BLOCKSIZE)
            total += math.ceil(n / 2) + 16 * 4  # two 4-bit codes per byte + the nf4/fp4 code table
            if double_quant:  # uint8 absmax + fp32 absmax-of-absmax per 256 + offset + 256-entry code
                total += blocks + 4 * math.ceil(blocks / BNB_NESTED_BLOCKSIZE) + 4 + 256 * 4
            else:
                total += 4 * blocks
    return total


def _optimizer_bytes(optimizer: str, lora_tensors: list[int]) -> int:
    """Optimizer state for the LoRA tensors (fp32 params)."""
    kind = OPTIMIZERS.get(optimizer)
    if kind is None:
        raise ValueError(f"optimizer: {one_of(optimizer, list(OPTIMIZERS))}")
    if kind.eight_bit:
        total = 0
        for n in lora_tensors:  # bnb: exp_avg + exp_avg_sq as uint8 with fp32 absmax per 256; small ones fp32
            total += 2 * (n + 4 * math.ceil(n / BNB_OPTIM_BLOCKSIZE)) if n >= BNB_OPTIM_MIN_8BIT_SIZE else 8 * n
        return total
    return kind.state_bytes * sum(lora_tensors)


_OUTPUT_PROJ = ("o_proj", "out_proj", "down_proj", "dense", "c_proj", "fc2", "wo", "w2", "dense_4h_to_h")


@dataclass(frozen=True)
class _Activations:
    """Bytes of activations for one micro-batch."""

    layer: int  # one decoder layer's saved tensors (layers are alike)
    kept: int  # one layer's tensors that checkpointing cannot drop (bitsandbytes 8-bit inputs)
    outer: int  # final norm, rotary tables, masks, autocast copies of LoRA weights
    checkpoint: int  # one layer's input, all that a checkpointed layer keeps
    temp: int  # transient buffers while one layer runs (grads in flight, casts, bnb dequantized weight)


def _lora_input_bytes(lins: list[_Linear], c: int, s: int, autocast: bool) -> int:
    """Per token: the input each lora_A saves. Under autocast every LoRA layer casts its own 16-bit copy. Without
    it peft casts the input to the fp32 adapter: a 16-bit input gives every layer its own fp32 copy, while fp32
    inputs (fp32 models, the kbit-upcast stream) are not copied and layers fed by one tensor (q/k/v, gate/up)
    share it."""
    if autocast:
        return sum(c * lin.in_features for lin in lins)
    if s != 4:
        return sum(4 * lin.in_features for lin in lins)
    distinct = {(lin.name.rsplit(".", 2)[0], lin.in_features, lin.name.endswith(_OUTPUT_PROJ)) for lin in lins}
    return sum(4 * in_f for _, in_f, _ in distinct)


def _activation_bytes(shape: _Shape, targeted: list[_Linear], *, r: int, batch: int, seq: int, c: int, s: int,
                      packed: bool, dropout: float, quantization: str, autocast: bool, lora_params: int,
                      cuda: bool) -> _Activations:
    """c = compute dtype bytes (matmul/attention), s = stream bytes (residual, MLP; fp32 after kbit upcast)."""
    tokens, L = batch * seq, max(shape.layers, 1)
    q_dim, kv_dim = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    # padded batches: transformers repeats K/V (no GQA fast path with a mask) before SDPA
    kv_saved = kv_dim if packed else q_dim
    # SDPA (flash / mem-efficient) saves q, k, v, out in the compute dtype and a fp32 logsumexp per head
    per_token = c * (2 * q_dim + 2 * kv_saved) + 4 * shape.heads
    # every norm saves a fp32 copy of its input and a fp32 statistic per row (RMSNorm/LayerNorm upcast)
    per_token += (4 * shape.layer_norm_elems + 8 * shape.layer_norms) // L
    # gated MLP saves gate out, act(gate), up; plain MLP saves the activation input (frozen linears save nothing)
    per_token += s * (3 if shape.gated else 1) * shape.intermediate
    # LoRA: lora_A saves its input, lora_B saves lora_A's output; dropout adds a 1-byte mask per input
    inner = [lin for lin in targeted if lin.in_layer]
    lora_c = c if autocast else 4  # lora_A's output (lora_B's saved input) is in the adapter's compute dtype
    lora_tok = _lora_input_bytes(inner, c, s, autocast) + sum(lora_c * r + (lin.in_features if dropout > 0 else 0)
                                                              for lin in inner)
    per_token += lora_tok // L
    kept = 0
    if quantization == "8bit":  # MatMul8bitLt keeps its input alive: 2 norm outputs, o_proj's, down_proj's
        kept = tokens * (s * 2 * shape.hidden + c * q_dim + s * shape.intermediate)
    layer = tokens * per_token
    outer_lins = [lin for lin in targeted if not lin.in_layer]
    outer_tok = 4 * shape.outer_norm_elems + 8 * shape.outer_norms + 2 * shape.head_dim * s  # + cos/sin
    outer_tok += _lora_input_bytes(outer_lins, c, s, autocast) + lora_c * r * len(outer_lins)
    outer = tokens * outer_tok + (lora_params * c if autocast else 0)  # autocast caches 16-bit LoRA weights
    if not packed:  # the bool mask once; SDPA converts it to an additive bias per call, which backward keeps
        outer += batch * seq * seq
        layer += batch * seq * seq * c
    if cuda and s == 4 and c != 4:
        # kbit upcast on CUDA: q/k/v arrive in fp32 and SDPA falls back to its math kernel, which saves the fp32
        # attention probabilities (measured on an H100: ~seq^2 * heads * 4 bytes per layer, packed or not;
        # PyTorch's CPU flash kernel takes fp32, so CPU trials do not pay it)
        layer += batch * shape.heads * seq * seq * 4
    # in flight inside one layer: grads of the residual and MLP tensors in backward, or in (re)computation
    # peft's fp32 cast of a LoRA input before autocast casts it back down
    grads = tokens * s * (2 * shape.hidden + 2 * shape.intermediate)
    cast = tokens * 4 * max((lin.in_features for lin in inner), default=0) if autocast and s != 4 else 0
    dequant = 0
    if quantization != "none":  # bnb dequantizes one weight to 16-bit (8-bit: to the input dtype) per matmul
        biggest = max((lin.in_features * lin.out_features for lin in shape.linears if lin.quantized), default=0)
        dequant = biggest * (c if quantization == "4bit" else s)
    return _Activations(layer, kept, outer, tokens * shape.hidden * s, max(grads, cast) + dequant)


def estimate_memory(
    model: PretrainedConfig | str | os.PathLike[str],
    *,
    quantization: str = "none",
    bnb_4bit_quant_type: str = "nf4",
    bnb_4bit_use_double_quant: bool = True,
    dtype: str = "bfloat16",
    lora_r: int = 16,
    lora_target_modules: list[str] | str = "all-linear",
    micro_batch_size: int = 1,
    sequence_len: int = 512,
    sample_packing: bool = False,
    gradient_checkpointing: bool = False,
    optimizer: str = "adamw_torch",
    device: str = "cuda",
    lora_dropout: float = 0.0,
    kbit_upcast: bool = True,
    autocast: bool = False,
) -> MemoryEstimate:
    """Predict the peak memory of one LoRA training step (see the module docstring for the assumed recipe).

    ``model`` is a config, or a local directory / hub name loaded with ``AutoConfig`` (offline-safe for paths).
    Unpacked batches are assumed padded to ``sequence_len``; packed ones are full rows of ``sequence_len``.
    ``kbit_upcast`` mirrors ``prepare_model_for_kbit_training`` (fp32 non-quantized params) for quantized models.
    ``autocast=True`` models 16-bit autocast mixed precision (the HF Trainer's ``bf16=True``) instead of llmtune's
    harness, which runs the base in ``dtype`` without autocast.
    """
    _check_arguments(dtype=dtype, quantization=quantization, bnb_4bit_quant_type=bnb_4bit_quant_type,
                     optimizer=optimizer, lora_r=lora_r, micro_batch_size=micro_batch_size, sequence_len=sequence_len,
                     device=device)
    config = _load_config(model)
    shape = _model_shape(config)
    c = _DTYPE_BYTES[dtype]
    autocast = autocast and c == 2
    upcast = quantization != "none" and kbit_upcast
    s = 4 if upcast else c
    targeted = [lin for lin in shape.linears if _targeted(lin, lora_target_modules)]
    if not targeted:
        from llmtune.errors import Problem, RecipeError

        names = sorted({lin.name.rsplit(".", 1)[-1] for lin in shape.linears if not lin.head})
        raise RecipeError([Problem("lora_target_modules", f"{lora_target_modules!r} matches no Linear module of this "
                                   f"model; give 'all-linear' or names among {', '.join(names)}")],
                          source="estimate_memory")
    lora_tensors = [n for lin in targeted for n in (lora_r * lin.in_features, lora_r * lin.out_features)]
    lora_params = sum(lora_tensors)

    weights = _weight_bytes(shape, quantization, bnb_4bit_use_double_quant, c, upcast)
    act = _activation_bytes(shape, targeted, r=lora_r, batch=micro_batch_size, seq=sequence_len, c=c, s=s,
                            packed=sample_packing, dropout=lora_dropout, quantization=quantization,
                            autocast=autocast, lora_params=lora_params, cuda=device.startswith("cuda"))
    tokens = micro_batch_size * sequence_len
    held_logits = tokens * shape.vocab * c  # outputs.logits, referenced until backward is done
    # cross entropy upcasts to fp32: log_softmax output + its grad + grad of its input at the start of backward;
    # a fp32 head (kbit upcast) under autocast also keeps its 16-bit weight copy for the backward matmul
    loss_buffers = tokens * shape.vocab * (4 * LOSS_FP32_BUFFERS + c)
    if upcast and autocast:
        loss_buffers += shape.vocab * shape.hidden * c
    # peak A: start of backward, everything saved + loss buffers; peak B: one layer's backward (recomputed first
    # when checkpointing), after the loss buffers are freed
    if gradient_checkpointing:
        saved = shape.layers * (act.checkpoint + act.kept) + act.outer
        in_layer = act.layer + act.temp
    else:
        saved = shape.layers * (act.layer + act.kept) + act.outer
        in_layer = act.temp
    if loss_buffers >= in_layer:
        activations, logits = saved, held_logits + loss_buffers
    else:
        activations, logits = saved + in_layer, held_logits

    overhead = 0
    if device.startswith("cuda"):
        overhead = CUDA_CONTEXT_BYTES + CUBLAS_WORKSPACE_BYTES
        overhead += int(ALLOCATOR_SLACK_FRACTION * (activations + logits))
    return MemoryEstimate(
        weights=weights, lora=4 * lora_params, gradients=4 * lora_params,
        optimizer=_optimizer_bytes(optimizer, lora_tensors), activations=activations,
        logits=logits, overhead=overhead, trainable_params=lora_params,
        total_params=shape.total_params + lora_params,
    )
