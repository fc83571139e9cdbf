"""Tests for llmtune.study.memory and llmtune.study.calibration: exact counts against peft, monotonic behaviour, calibration, and CPU measurements."""

from __future__ import annotations

import json
import os
import weakref

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from llmtune.config.settings import TrialSettings
from llmtune.study.calibration import MemoryCalibration
from llmtune.study.memory import (
    CUDA_CONTEXT_BYTES,
    GIB,
    MemoryEstimate,
    estimate_memory,
)


def small_llama(**kw) -> LlamaConfig:
    args = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=352, vocab_size=1024, max_position_embeddings=4096)
    args.update(kw)
    return LlamaConfig(**args)


@pytest.fixture(scope="module")
def llama8b() -> LlamaConfig:
    return LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       intermediate_size=14336, vocab_size=128256, max_position_embeddings=8192,
                       tie_word_embeddings=False)


def peft_counts(config, r: int, targets) -> tuple[int, int]:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model = get_peft_model(model, LoraConfig(r=r, target_modules=targets))
    return model.get_nb_trainable_parameters()


# ---------------------------------------------------------------- exact counts


@pytest.mark.parametrize("r", [4, 16])
@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear", ["gate_proj", "down_proj", "o_proj"],
                                     r".*\.self_attn\.(q|k)_proj"])
def test_param_counts_match_peft(r, targets):
    config = small_llama()
    trainable, total = peft_counts(config, r, targets)
    est = estimate_memory(config, lora_r=r, lora_target_modules=targets, device="cpu")
    assert est.trainable_params == trainable
    assert est.total_params == total


def test_tied_embeddings_count_once():
    config = Qwen2Config(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=352, vocab_size=1000, tie_word_embeddings=True)
    trainable, total = peft_counts(config, 8, "all-linear")
    est = estimate_memory(config, lora_r=8, device="cpu")
    assert (est.trainable_params, est.total_params) == (trainable, total)
    # 16-bit weights are exactly 2 bytes per (deduplicated) base parameter
    assert est.weights == 2 * (total - trainable)


def test_lora_grads_optimizer_sizes():
    est = estimate_memory(small_llama(), lora_r=8, device="cpu")
    assert est.lora == est.gradients == 4 * est.trainable_params  # fp32 adapters and grads
    assert est.optimizer == 8 * est.trainable_params  # AdamW: exp_avg + exp_avg_sq in fp32


# ---------------------------------------------------------------- the 8B shape (meta device only)


def test_llama8b_weights_by_precision(llama8b):
    base = estimate_memory(llama8b, device="cpu")
    n_base = base.total_params - base.trainable_params
    assert abs(n_base - 8.03e9) < 0.01e9
    assert base.weights == 2 * n_base  # ~16 GB
    as_loaded = estimate_memory(llama8b, quantization="4bit", kbit_upcast=False, device="cpu")
    assert 5 * GIB < as_loaded.weights < 6 * GIB  # embeddings + lm_head (1.05B params) stay 16-bit
    # prepare_model_for_kbit_training upcasts exactly the non-quantized params (embed, head, norms) to fp32
    prepared = estimate_memory(llama8b, quantization="4bit", device="cpu")
    non_quantized = 2 * 128256 * 4096 + (2 * 32 + 1) * 4096
    assert prepared.weights - as_loaded.weights == 2 * non_quantized
    int8 = estimate_memory(llama8b, quantization="8bit", kbit_upcast=False, device="cpu")
    assert as_loaded.weights < int8.weights < base.weights
    fp4 = estimate_memory(llama8b, quantization="4bit", bnb_4bit_quant_type="fp4", kbit_upcast=False, device="cpu")
    no_dq = estimate_memory(llama8b, quantization="4bit", bnb_4bit_use_double_quant=False, kbit_upcast=False,
                            device="cpu")
    assert fp4.weights == as_loaded.weights < no_dq.weights  # double quant saves ~0.37 bit/param
    assert (no_dq.weights - as_loaded.weights) / 6.98e9 == pytest.approx(3 / 64, rel=0.02)


def test_llama8b_checkpointing_and_overhead(llama8b):
    kw = dict(quantization="4bit", sequence_len=4096, micro_batch_size=2)
    plain = estimate_memory(llama8b, **kw)
    ckpt = estimate_memory(llama8b, gradient_checkpointing=True, **kw)
    assert ckpt.activations < plain.activations / 8
    assert ckpt.total < plain.total
    cpu = estimate_memory(llama8b, device="cpu", **kw)
    assert cpu.overhead == 0
    assert plain.overhead > CUDA_CONTEXT_BYTES
    # CPU: no CUDA context or workspace, and no fp32 math-attention fallback (PyTorch's CPU kernel takes fp32)
    assert plain.activations > cpu.activations
    assert plain.total - cpu.total == plain.overhead + plain.activations - cpu.activations


# ---------------------------------------------------------------- monotonic behaviour


def test_monotonic_in_batch_and_sequence():
    config = small_llama()
    prev = None
    for b, s in [(1, 128), (2, 128), (2, 512), (4, 512), (4, 2048)]:
        est = estimate_memory(config, micro_batch_size=b, sequence_len=s, device="cpu")
        if prev is not None:
            assert est.activations > prev.activations
            assert est.total > prev.total
        prev = est


def test_monotonic_in_rank_and_targets():
    config = small_llama()
    ests = [estimate_memory(config, lora_r=r, device="cpu") for r in (4, 8, 16, 64)]
    for a, b in zip(ests, ests[1:], strict=False):
        assert b.lora > a.lora and b.optimizer > a.optimizer and b.gradients > a.gradients
        assert b.total > a.total
    few = estimate_memory(config, lora_target_modules=["q_proj", "v_proj"], device="cpu")
    assert few.trainable_params < ests[2].trainable_params
    assert few.activations < ests[2].activations  # fewer LoRA inputs to keep


def test_optimizers():
    config = small_llama(hidden_size=512, intermediate_size=1408)
    kw = dict(lora_r=16, device="cpu")
    adam = estimate_memory(config, optimizer="adamw_torch", **kw)
    adam8 = estimate_memory(config, optimizer="adamw_8bit", **kw)
    paged8 = estimate_memory(config, optimizer="paged_adamw_8bit", **kw)
    sgd = estimate_memory(config, optimizer="sgd", **kw)
    assert adam8.optimizer == paged8.optimizer < adam.optimizer / 3
    assert sgd.optimizer == adam.optimizer // 2  # momentum: one fp32 buffer where AdamW keeps two
    with pytest.raises(ValueError):
        estimate_memory(config, optimizer="nope", **kw)


def test_packing_and_dropout():
    config = small_llama()
    padded = estimate_memory(config, sequence_len=1024, device="cpu")
    packed = estimate_memory(config, sequence_len=1024, sample_packing=True, device="cpu")
    assert packed.activations < padded.activations  # no mask, no repeated K/V
    dropout = estimate_memory(config, sequence_len=1024, lora_dropout=0.05, device="cpu")
    assert dropout.activations > padded.activations


def test_logits_dominate_small_model_big_vocab():
    config = Qwen2Config(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True)
    est = estimate_memory(config, micro_batch_size=4, sequence_len=1024)
    tokens = 4 * 1024
    # held bf16 logits + fp32 log-softmax output + its fp32 grad + bf16 grad of the logits (12 B, measured on an H100)
    assert est.logits == tokens * 151936 * (2 + 4 + 4 + 2)
    assert est.logits > est.weights


def test_bad_arguments():
    with pytest.raises(ValueError):
        estimate_memory(small_llama(), quantization="3bit")
    with pytest.raises(ValueError):
        estimate_memory(small_llama(), dtype="int8")


def test_estimate_properties():
    est = estimate_memory(small_llama())
    parts = est.breakdown()
    assert est.total == sum(getattr(est, k) for k in
                            ("weights", "lora", "gradients", "optimizer", "activations", "logits", "overhead"))
    assert est.total_gb == est.total / 2**30 == parts["total"]
    assert sum(v for k, v in parts.items() if k != "total") == pytest.approx(parts["total"])
    assert isinstance(est, MemoryEstimate)


def test_config_from_local_path(tmp_path):
    config = small_llama()
    config.save_pretrained(tmp_path)
    assert estimate_memory(tmp_path) == estimate_memory(config)
    assert estimate_memory(str(tmp_path), lora_r=4) == estimate_memory(config, lora_r=4)


# ---------------------------------------------------------------- calibration


def test_calibration_recovers_linear_relation():
    pairs = [(p, int(1.2 * p + 300e6)) for p in (2e9, 5e9, 9e9, 14e9)]
    cal = MemoryCalibration.fit(pairs)
    assert cal.n == 4
    assert cal.scale == pytest.approx(1.2, rel=1e-6)
    assert cal.offset == pytest.approx(300e6, rel=1e-4)
    errs = [abs(p - m) / m for p, m in pairs]
    assert cal.median_rel_error == pytest.approx((sorted(errs)[1] + sorted(errs)[2]) / 2)
    assert cal.worst_rel_error == pytest.approx(max(errs))
    assert cal.apply(10_000_000_000) == pytest.approx(12.3e9, rel=1e-6)


def test_calibration_fallbacks_and_round_trip():
    identity = MemoryCalibration.fit([])
    assert (identity.scale, identity.offset, identity.n, identity.median_rel_error) == (1.0, 0.0, 0, None)
    assert identity.apply(123) == 123
    ratio = MemoryCalibration.fit([(1000, 1100), (2000, 2200)])
    assert (ratio.scale, ratio.offset, ratio.n) == (pytest.approx(1.1), 0.0, 2)
    assert ratio.median_rel_error == pytest.approx(100 / 1100)
    same_x = MemoryCalibration.fit([(1000, 1100), (1000, 1300), (1000, 1200)])  # no spread: ratio
    assert same_x.scale == pytest.approx(1.2) and same_x.offset == 0.0
    cal = MemoryCalibration.fit([(1e9, 1.5e9), (2e9, 2.4e9), (3e9, 3.7e9)])
    d = json.loads(json.dumps(cal.to_dict()))
    assert MemoryCalibration.from_dict(d) == cal
    assert MemoryCalibration.from_dict({**d, "extra": 1}) == cal


# ---------------------------------------------------------------- measured on CPU


class _LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Tracks bytes of live tensor storages created inside the mode and their peak."""

    def __init__(self, ignore: set[int]):
        super().__init__()
        self.seen, self.live, self.peak = set(ignore), 0, 0

    def _free(self, key: int, n: int) -> None:
        self.live -= n
        self.seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = st.data_ptr()
                if key and key not in self.seen:
                    self.seen.add(key)
                    self.live += st.nbytes()
                    weakref.finalize(st, self._free, key, st.nbytes())
                    self.peak = max(self.peak, self.live)
        return out


@pytest.mark.parametrize("kw", [dict(), dict(vocab_size=16000), dict(gradient_checkpointing=True),
                                dict(num_hidden_layers=4, seq=256), dict(targets=["q_proj", "v_proj"]),
                                dict(autocast=False), dict(autocast=False, gradient_checkpointing=True),
                                dict(autocast=False, targets=["q_proj", "v_proj"], vocab_size=16000)])
def test_activations_match_cpu_measurement(kw):
    """bf16 LoRA step on CPU, under autocast (the HF Trainer's way) or as llmtune's harness runs it (bf16 base,
    fp32 LoRA, no autocast): measured peak of non-parameter memory vs activations + logits."""
    kw = dict(kw)
    autocast = kw.pop("autocast", True)
    gc = kw.pop("gradient_checkpointing", False)
    seq = kw.pop("seq", 96)
    targets = kw.pop("targets", "all-linear")
    config = small_llama(**{"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 2, **kw})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=16, target_modules=targets))
    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    ids = torch.randint(0, config.vocab_size, (2, seq))
    tracker = _LiveBytes({p.untyped_storage().data_ptr() for p in model.parameters()})
    with tracker:
        if autocast:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
        else:  # the harness's loss: summed cross entropy of the fp32-cast logits
            from llmtune.harness.data import Batch
            from llmtune.harness.train import _loss_sum

            rows = ids.tolist()
            batch = Batch(rows, rows, [list(range(seq))] * 2, None, 2 * seq, 2 * (seq - 1), 2)
            loss = _loss_sum(model, batch, "cpu")
        loss.backward()
    est = estimate_memory(config, lora_r=16, lora_target_modules=targets, micro_batch_size=2, sequence_len=seq,
                          sample_packing=True, gradient_checkpointing=gc, device="cpu", autocast=autocast)
    predicted = est.activations + est.logits
    # LoRA grads allocated by the time of the peak are somewhere between none and all of them
    assert tracker.peak * 0.9 <= predicted + est.gradients
    assert predicted <= tracker.peak * 1.1


def test_4bit_weights_match_bitsandbytes(tmp_path):
    """Bytes of a real bnb nf4 double-quant model after prepare_model_for_kbit_training (CPU backend)."""
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    config = small_llama(hidden_size=256, intermediate_size=704, num_hidden_layers=2)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(tmp_path)
    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.bfloat16)
    try:
        model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=qc, dtype=torch.bfloat16,
                                                     device_map="cpu")
    except Exception as exc:  # bnb without a usable CPU backend
        pytest.skip(f"bitsandbytes 4-bit unavailable on CPU: {exc}")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    actual = sum(p.numel() * p.element_size() for p in model.parameters())
    for mod in model.modules():
        state = getattr(getattr(mod, "weight", None), "quant_state", None)
        if state is not None:
            actual += state.absmax.nbytes + state.code.nbytes
            if state.nested:
                actual += state.state2.absmax.nbytes + state.state2.code.nbytes + state.offset.nbytes
    est = estimate_memory(config, quantization="4bit", device="cpu")
    assert est.weights == actual


@pytest.mark.parametrize(("quantization", "checkpointing"), [("4bit", True), ("8bit", True)])
def test_harness_step_matches_estimate_on_cpu(tiny_model_path, quantization, checkpointing):
    """One training step exactly as a trial runs it (harness loading, real bitsandbytes layers, peft's
    kbit preparation, the harness loss): live non-parameter bytes at the peak vs the estimate, within 10%."""
    from llmtune.config.sections import ModelConfig
    from llmtune.harness import model as M
    from llmtune.harness.data import Batch
    from llmtune.harness.train import _loss_sum

    settings = TrialSettings.of(dict(quantization=quantization, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                    gradient_checkpointing=checkpointing, lora_r=16, lora_alpha=16, lora_dropout=0.0,
                    lora_target_modules="all-linear", use_rslora=False))
    model = M.apply_lora(M.load_base(ModelConfig(name=str(tiny_model_path)), settings, "cpu", torch.bfloat16), settings)
    model.train()
    batch_size, seq = 4, 128
    torch.manual_seed(0)
    rows = torch.randint(5, 500, (batch_size, seq)).tolist()
    batch = Batch(rows, rows, [list(range(seq))] * batch_size, None, batch_size * seq, batch_size * (seq - 1), batch_size)
    tracker = _LiveBytes({p.untyped_storage().data_ptr() for p in model.parameters()})
    with tracker:
        _loss_sum(model, batch, "cpu").backward()
    est = estimate_memory(str(tiny_model_path), quantization=quantization, dtype="bfloat16", lora_r=16,
                          micro_batch_size=batch_size, sequence_len=seq, sample_packing=True,
                          gradient_checkpointing=checkpointing, device="cpu")
    predicted = est.activations + est.logits
    assert tracker.peak * 0.9 <= predicted + est.gradients
    assert predicted <= tracker.peak * 1.1
