"""Load the base model (16/32-bit, 8-bit or 4-bit) and put the trial's LoRA adapter on it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from llmtune import hardware
from llmtune.config.sections import ModelConfig
from llmtune.config.settings import TrialSettings
from llmtune.harness.targets import attention_implementation, check_dropout, resolve_targets

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def pick_dtype(requested: str, device: str, checkpoint: str | None = None) -> torch.dtype:
    """auto: bf16 where the GPU supports it, fp16 on older GPUs; on a CPU, bf16 when the checkpoint is bf16
    and the CPU multiplies bf16 natively (AMX / AVX512-BF16: 1.8x the tokens/s of fp32 on SmolLM2 at eval loss
    within 1%, benchmarks/results/harness_speed_smollm2_cpu_2026-12-03.md), else fp32 (exact, and fast for small models)."""
    if requested != "auto":
        return DTYPES[requested]
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if checkpoint == "bfloat16" and hardware.cpu_has_fast_bf16() else torch.float32


def checkpoint_dtype(cfg: ModelConfig) -> str | None:
    """The dtype the model's weights are stored in (its config), e.g. "bfloat16"; None when it does not say."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolved_model_path(cfg), revision=cfg.revision,
                                        trust_remote_code=cfg.trust_remote_code)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return str(dtype).removeprefix("torch.") if dtype is not None else None


def quantization_config(settings: TrialSettings, dtype: torch.dtype) -> Any:
    from transformers import BitsAndBytesConfig

    q = settings.quantization
    if q == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if q == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=settings.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=settings.bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=torch.uint8,
        )
    return None


def resolved_model_path(cfg: ModelConfig) -> str:
    from llmtune.builtin.names import resolve_model_name

    return resolve_model_name(cfg.name, log=None)


def load_tokenizer(cfg: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolved_model_path(cfg), revision=cfg.revision,
                                        trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # padding is masked out of attention and loss, any id works
    return tok


def load_base(cfg: ModelConfig, settings: TrialSettings, device: str, dtype: torch.dtype) -> Any:
    """The frozen base model on `device`, quantized as the trial asks."""
    from transformers import AutoConfig, AutoModelForCausalLM

    qconfig = quantization_config(settings, dtype)
    if qconfig is not None:
        hardware.bitsandbytes_ready(device)
    path = resolved_model_path(cfg)
    config = AutoConfig.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        revision=cfg.revision,
        trust_remote_code=cfg.trust_remote_code,
        dtype=dtype,
        quantization_config=qconfig,
        attn_implementation=attention_implementation(config, cfg.attn_implementation),
        device_map={"": device} if (qconfig is not None or device == "cuda") else None,
    )
    model.config.use_cache = False  # no KV cache while training; generation turns it back on
    return model


_ABSENT = object()


def apply_liger(model: Any) -> tuple[Callable[[], None], int]:
    """Liger's fused Triton kernels for training (`liger_kernels: true`, CUDA only; preflight checks the device,
    the package and the architecture): RMSNorm, the gated MLP (SwiGLU; GeGLU for Gemma) and RoPE of the base
    model's own layers, patched before the adapter wraps its linear layers (Liger's MLP still calls them, so
    LoRA on the MLP works). The loss is llmtune's own (`harness.train._loss_sum`), so Liger's loss patches of
    the model's forward stay off; its fused output layer + cross-entropy is training's loss instead
    (`fused_loss`). The same arithmetic in other kernels: float rounding, not what is learned
    (tests/test_gpu.py compares the curves).

    Returns ``(undo, patched)``: how many attributes Liger replaced, and a function that puts them back (the
    modules' own forward passes, the modeling module's functions), so that what is measured after training
    (latency, generations, forgetting) runs as a user's plain transformers runs the adapter, the same in
    every execution variant (`study.probes` copies those metrics across variants)."""
    import sys

    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

    modeling = sys.modules[type(model).__module__]
    modules = list(model.modules())
    before = [(dict(vars(m)), dict(m._modules)) for m in modules]
    module_globals = dict(vars(modeling))
    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    changed: list[tuple[dict[str, Any], str, Any]] = []
    for m, (attrs, children) in zip(modules, before, strict=True):
        changed += [(vars(m), k, attrs.get(k, _ABSENT)) for k, v in vars(m).items() if attrs.get(k, _ABSENT) is not v]
        changed += [(m._modules, k, children.get(k, _ABSENT)) for k, v in m._modules.items()
                    if children.get(k, _ABSENT) is not v]
    changed += [(vars(modeling), k, module_globals.get(k, _ABSENT)) for k, v in vars(modeling).items()
                if module_globals.get(k, _ABSENT) is not v]

    def undo() -> None:
        for namespace, key, old in changed:
            if old is _ABSENT:
                namespace.pop(key, None)
            else:
                namespace[key] = old
        changed.clear()

    return undo, len(changed)


def fused_loss(settings: TrialSettings) -> Any:
    """Training's loss as (output weight, hidden states at the labels, targets, output bias) -> summed
    cross-entropy, fused so that the labels' logits are never all held (`liger_kernels`), or None."""
    if not settings.liger_kernels:
        return None
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss(reduction="sum")


def apply_lora(model: Any, settings: TrialSettings) -> Any:
    """Wrap the base with the trial's LoRA adapter; gradient checkpointing as asked."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    checkpointing = settings.gradient_checkpointing
    ckpt_kwargs = {"use_reentrant": False}  # non-reentrant: works with frozen inputs, no input grads hack
    if settings.quantization != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                                gradient_checkpointing_kwargs=ckpt_kwargs)
    elif checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt_kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
    # presets mean this model's own modules (GPT-2's c_attn, Falcon's query_key_value, MoE experts...)
    plan = resolve_targets(model, settings.lora_target_modules)
    lora = LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,  # type: ignore[arg-type]  # alpha = ratio * r may be fractional
        lora_dropout=check_dropout(plan, settings.lora_dropout),
        **plan.lora_kwargs(),
        use_rslora=settings.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def checkpointing_enabled(model: Any) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "is_activation_checkpointing", None) or getattr(base, "is_gradient_checkpointing", False))


def count_params(model: Any) -> tuple[int, int]:
    """(trainable, total) parameters; 4-bit packed weights counted as their logical size."""
    trainable, total = model.get_nb_trainable_parameters()
    return int(trainable), int(total)


def quantized_layer_types(model: Any) -> dict[str, int]:
    """How many layers of each bitsandbytes type the model holds (for reports and tests)."""
    counts: dict[str, int] = {}
    for m in model.modules():
        name = type(m).__name__
        # peft's LoRA wrappers share these class names; count bitsandbytes' own layers only
        if name in ("Linear4bit", "Linear8bitLt") and type(m).__module__.startswith("bitsandbytes"):
            counts[name] = counts.get(name, 0) + 1
    return counts
