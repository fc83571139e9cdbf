"""LoRA target presets, attention choice and packing exactness across decoder architectures (tiny, offline)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # every config is built in code; nothing may download

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from llmtune.harness.targets import (  # noqa: E402
    PRESETS,
    AttentionError,
    TargetError,
    TargetPlan,
    attention_implementation,
    check_dropout,
    meta_model,
    packed_attention_mask,
    packing_mode,
    resolve_targets,
)

torch.set_num_threads(1)
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

V, H, I = 128, 32, 64  # noqa: E741
IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
COMMON = dict(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, **IDS)
PLAIN = dict(vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=4, **IDS)


def _configs() -> dict[str, object]:
    T = transformers
    return {
        "llama": T.LlamaConfig(**COMMON),
        "qwen2": T.Qwen2Config(**COMMON),
        "qwen3": T.Qwen3Config(**COMMON, head_dim=8),
        "mistral": T.MistralConfig(**COMMON),
        "mixtral": T.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2),
        "qwen2_moe": T.Qwen2MoeConfig(**COMMON, moe_intermediate_size=16, shared_expert_intermediate_size=32,
                                      num_experts=4, num_experts_per_tok=2),
        "gemma2": T.Gemma2Config(**COMMON, head_dim=8),
        "gemma3": T.Gemma3TextConfig(**COMMON, head_dim=8),
        "phi": T.PhiConfig(**PLAIN, intermediate_size=I, max_position_embeddings=64),
        "phi3": T.Phi3Config(**COMMON),
        "gpt2": T.GPT2Config(vocab_size=V, n_embd=H, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                             eos_token_id=2),
        "gpt_neox": T.GPTNeoXConfig(**PLAIN, intermediate_size=I, max_position_embeddings=64),
        "falcon": T.FalconConfig(**PLAIN),
        "bloom": T.BloomConfig(vocab_size=V, hidden_size=H, n_layer=2, n_head=4, **IDS),
        "opt": T.OPTConfig(**PLAIN, ffn_dim=I, word_embed_proj_dim=H, max_position_embeddings=64),
        "olmo2": T.Olmo2Config(**COMMON),
        "granite": T.GraniteConfig(**COMMON),
    }


CONFIGS = _configs()
ARCHS = list(CONFIGS)

# The resolution table: preset -> (target_modules, target_parameters); None would mean "refused".
LLAMA = {"qv": (["q_proj", "v_proj"], []), "attention": (["k_proj", "o_proj", "q_proj", "v_proj"], []),
         "mlp": (["down_proj", "gate_proj", "up_proj"], []),
         "all-linear": (["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"], [])}
EXPERTS = ["experts.down_proj", "experts.gate_up_proj"]
NEOX = {"qv": (["query_key_value"], []), "attention": (["dense", "query_key_value"], []),
        "mlp": (["dense_4h_to_h", "dense_h_to_4h"], []),
        "all-linear": (["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"], [])}
EXPECTED: dict[str, dict[str, tuple[list[str], list[str]] | None]] = {
    **{a: LLAMA for a in ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "olmo2", "granite")},
    "mixtral": {**LLAMA, "mlp": ([], EXPERTS), "all-linear": (LLAMA["attention"][0], EXPERTS)},
    # shared_expert_gate is a router (1 output): frozen by 'mlp', adapted by 'all-linear' like every linear
    "qwen2_moe": {**LLAMA, "mlp": (["down_proj", "gate_proj", "up_proj"], EXPERTS),
                  "all-linear": (sorted(LLAMA["all-linear"][0] + ["shared_expert_gate"]), EXPERTS)},
    "phi": {"qv": (["q_proj", "v_proj"], []), "attention": (["dense", "k_proj", "q_proj", "v_proj"], []),
            "mlp": (["fc1", "fc2"], []), "all-linear": (["dense", "fc1", "fc2", "k_proj", "q_proj", "v_proj"], [])},
    "phi3": {"qv": (["qkv_proj"], []), "attention": (["o_proj", "qkv_proj"], []),
             "mlp": (["down_proj", "gate_up_proj"], []),
             "all-linear": (["down_proj", "gate_up_proj", "o_proj", "qkv_proj"], [])},
    "gpt2": {"qv": (["c_attn"], []), "attention": (["attn.c_proj", "c_attn"], []),
             "mlp": (["c_fc", "mlp.c_proj"], []), "all-linear": (["c_attn", "c_fc", "c_proj"], [])},
    "gpt_neox": NEOX, "falcon": NEOX, "bloom": NEOX,
    "opt": {"qv": (["q_proj", "v_proj"], []), "attention": (["k_proj", "out_proj", "q_proj", "v_proj"], []),
            "mlp": (["fc1", "fc2"], []), "all-linear": (["fc1", "fc2", "k_proj", "out_proj", "q_proj", "v_proj"], [])},
}
NO_SDPA = {"gemma2", "bloom"}  # transformers 5: Gemma2 (logit softcapping) and BLOOM (ALiBi) are eager-only
# How packed rows stay apart (transformers 5.x): the rest detect restarts in position_ids. OPT and BLOOM call
# create_causal_mask without position_ids; BLOOM's ALiBi also needs a 2-D mask, so it cannot take a 4-D one.
PACKING = {"opt": "mask", "bloom": "none"}


def build(arch: str, attn: str | None = None):
    from transformers import AutoModelForCausalLM

    cfg = CONFIGS[arch]
    torch.manual_seed(0)
    impl = attention_implementation(cfg, None) if attn is None else attn
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=impl, dtype=torch.float32)
    model.config.use_cache = False  # with a cache, transformers skips packed-sequence detection
    return model


def matches(name: str, suffixes: list[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def adapted(peft_model) -> tuple[set[str], set[str]]:
    """(module names, parameter names) that carry LoRA weights, in the base model's naming."""
    from peft.tuners.lora import LoraLayer

    modules, params = set(), set()
    for name, mod in peft_model.base_model.model.named_modules():
        if isinstance(mod, LoraLayer) and len(mod.lora_A):
            base = name.replace(".base_layer", "")
            if type(mod).__name__ == "ParamWrapper":
                params.add(f"{base}.{mod.parameter_name}")
            else:
                modules.add(base)
    return modules, params


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("arch", ARCHS)
def test_preset_resolves_and_trains(arch: str, preset: str) -> None:
    from peft import LoraConfig, get_peft_model

    model = build(arch)
    expected = EXPECTED[arch][preset]
    try:
        plan = resolve_targets(model, preset)
    except TargetError as e:
        assert expected is None and repr(preset) in str(e)
        return
    assert (plan.target_modules, plan.target_parameters) == expected
    assert plan == resolve_targets(meta_model(CONFIGS[arch]), preset)  # the meta structure is enough
    head = model.get_output_embeddings()
    want_modules = {n for n, m in model.named_modules() if matches(n, plan.target_modules)}
    want_params = {n for n, _ in model.named_parameters() if matches(n, plan.target_parameters)}
    assert all(m is not head for n, m in model.named_modules() if n in want_modules)

    dropout = check_dropout(plan, 0.05, coerce=True)
    assert dropout == (0.0 if plan.target_parameters else 0.05)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, bias="none", task_type="CAUSAL_LM",
                      **plan.lora_kwargs())
    peft_model = get_peft_model(model, lora)
    assert adapted(peft_model) == (want_modules, want_params)
    assert len(want_modules) + len(want_params) >= 2  # at least one per layer

    ids = torch.randint(3, V, (2, 16), generator=torch.Generator().manual_seed(1))
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(4):
        loss = peft_model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("arch", ARCHS)
def test_packing_exactness(arch: str) -> None:
    torch.manual_seed(0)
    a, b = torch.randint(3, V, (1, 5)), torch.randint(3, V, (1, 7))
    ids = torch.cat([a, b], 1)
    pos = torch.cat([torch.arange(5), torch.arange(7)])[None]
    for attn in ("eager", "sdpa"):
        if attn == "sdpa" and arch in NO_SDPA:
            continue
        model = build(arch, attn).eval()
        with torch.no_grad():
            alone = model(input_ids=b, position_ids=torch.arange(7)[None]).logits[0]
            packed = model(input_ids=ids, position_ids=pos).logits[0, 5:]
        by_position = torch.allclose(packed, alone, atol=1e-4)
        mode = packing_mode(model)
        assert mode == PACKING.get(arch, "position_ids"), (attn, mode)
        assert by_position == (mode == "position_ids"), (attn, (packed - alone).abs().max())
        if mode != "none":  # the explicit 4-D mask is exact wherever the model accepts one
            with torch.no_grad():
                masked = model(input_ids=ids, position_ids=pos,
                               attention_mask=packed_attention_mask(pos, torch.float32)).logits[0, 5:]
            torch.testing.assert_close(masked, alone, atol=1e-4, rtol=0)


def test_packed_attention_mask_is_causal_block_diagonal() -> None:
    mask = packed_attention_mask(torch.tensor([0, 1, 0, 1, 2]), torch.float32)
    allowed = (mask[0, 0] == 0).int().tolist()
    assert mask.shape == (1, 1, 5, 5)
    assert allowed == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_implementation(arch: str) -> None:
    cfg = CONFIGS[arch]
    want = "eager" if arch in NO_SDPA else "sdpa"
    assert attention_implementation(cfg, None) == attention_implementation(meta_model(cfg), "auto") == want
    assert attention_implementation(cfg, "eager") == "eager"
    if arch in NO_SDPA:
        with pytest.raises(AttentionError, match=r"'sdpa' is not supported by \w+ForCausalLM; it supports eager"):
            attention_implementation(cfg, "sdpa")
    with pytest.raises(AttentionError, match="'bogus'"):
        attention_implementation(cfg, "bogus")


def test_meta_model_has_no_weights() -> None:
    model = meta_model(CONFIGS["mixtral"])
    assert all(p.device.type == "meta" for p in model.parameters())


def test_expert_parameters_need_zero_dropout() -> None:
    from peft import LoraConfig, get_peft_model

    plan = resolve_targets(meta_model(CONFIGS["mixtral"]), "mlp")
    assert plan.target_parameters and any("lora_dropout=0" in n for n in plan.notes)
    with pytest.raises(TargetError, match=r"lora_dropout=0.05 .*experts.gate_up_proj.*set lora_dropout: 0"):
        check_dropout(plan, 0.05)
    assert check_dropout(plan, 0.0) == 0.0
    assert check_dropout(resolve_targets(meta_model(CONFIGS["mixtral"]), "attention"), 0.05) == 0.05
    # peft itself: one dropout per adapter, and ParamWrapper refuses any (if this starts passing, revisit)
    with pytest.raises(ValueError, match="lora_dropout != 0"):
        get_peft_model(build("mixtral"), LoraConfig(r=4, lora_dropout=0.05, **plan.lora_kwargs()))


def test_named_modules() -> None:
    gpt2 = meta_model(CONFIGS["gpt2"])
    assert resolve_targets(gpt2, "c_attn, c_proj") == TargetPlan(["c_attn", "c_proj"], [])
    with pytest.raises(TargetError, match=r"q_proj, v_proj match no linear module of gpt2; .*: c_attn, c_proj, c_fc$"):
        resolve_targets(gpt2, "q_proj,v_proj")
    with pytest.raises(TargetError, match="output head"):
        resolve_targets(gpt2, "lm_head")
    with pytest.raises(TargetError, match="match no linear module"):
        resolve_targets(gpt2, "attn")  # a container, not a linear
    mixtral = meta_model(CONFIGS["mixtral"])
    plan = resolve_targets(mixtral, "q_proj,experts.gate_up_proj")
    assert (plan.target_modules, plan.target_parameters) == (["q_proj"], ["experts.gate_up_proj"])
    with pytest.raises(TargetError, match=r"expert parameters: experts.down_proj, experts.gate_up_proj"):
        resolve_targets(mixtral, "w1")


class _Block(nn.Module):
    def __init__(self, attention: bool) -> None:
        super().__init__()
        if attention:  # names no pattern knows: roles come from position (q, k, v, then output)
            self.attn = nn.ModuleDict({n: nn.Linear(8, 8) for n in ("a", "b", "c", "d")})
        self.mlp = nn.ModuleDict({"up": nn.Linear(8, 16), "down": nn.Linear(16, 8)})


class _Toy(nn.Module):
    def __init__(self, attention: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Block(attention) for _ in range(2)])
        self.lm_head = nn.Linear(8, 32)


def test_structure_driven_resolution_and_refusal() -> None:
    toy = _Toy(attention=True)
    assert resolve_targets(toy, "qv").target_modules == ["a", "c"]
    assert resolve_targets(toy, "attention").target_modules == ["a", "b", "c", "d"]
    assert resolve_targets(toy, "mlp").target_modules == ["down", "up"]
    assert "lm_head" not in resolve_targets(toy, "all-linear").target_modules

    mlp_only = _Toy(attention=False)
    for preset in ("qv", "attention"):
        with pytest.raises(TargetError, match=rf"'{preset}' has no meaning for _Toy: .*use 'mlp' or 'all-linear' "
                                              r"or name modules: up, down"):
            resolve_targets(mlp_only, preset)
    assert resolve_targets(mlp_only, "all-linear").target_modules == ["down", "up"]
