"""The PEFT harness on the tiny model: each search dimension changes what it should."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_recipe_dict

from llmtune.config.recipe import recipe_from_dict
from llmtune.config.settings import TrialSettings
from llmtune.harness import data as D
from llmtune.harness import model as M
from llmtune.harness.data_sources import load_splits
from llmtune.harness.train import _loss_sum, evaluate, run_trial


def make_recipe(tmp_path, **sections):
    return recipe_from_dict(tiny_recipe_dict(Path(tmp_path), **sections))


def settings_of(recipe, **values):
    return TrialSettings.of(recipe.space.complete(values))


def build(recipe, **values):
    s = settings_of(recipe, **values)
    model = M.apply_lora(M.load_base(recipe.model, s, "cpu", torch.float32), s)
    return model, s


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_model_path, tiny_data_path):
    return make_recipe(tmp_path_factory.mktemp("harness"))


@pytest.fixture(scope="module")
def tokenizer(recipe):
    return M.load_tokenizer(recipe.model)


@pytest.fixture(scope="module")
def splits(recipe):
    return load_splits(recipe.data)


def test_rank_sets_trainable_params_exactly(recipe):
    base = M.load_base(recipe.model, settings_of(recipe), "cpu", torch.float32)
    shapes = [(m.in_features, m.out_features) for n, m in base.named_modules()
              if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in ("q_proj", "v_proj")]
    counts = {}
    for rank in (4, 16):
        model, _ = build(recipe, lora_r=rank, lora_target_modules="qv")
        counts[rank] = M.count_params(model)[0]
        assert counts[rank] == rank * sum(i + o for i, o in shapes)
    assert counts[16] == 4 * counts[4]
    all_linear, _ = build(recipe, lora_r=4, lora_target_modules="all-linear")
    assert M.count_params(all_linear)[0] > counts[4]


@pytest.mark.parametrize("quantization, layer", [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_quantization_uses_bitsandbytes_layers(recipe, quantization, layer):
    model, s = build(recipe, quantization=quantization)
    layers = M.quantized_layer_types(model)
    n_linear = 7 * model.get_base_model().config.num_hidden_layers  # q k v o gate up down per layer
    assert layers == {layer: n_linear}
    if quantization == "4bit":
        import bitsandbytes as bnb

        w = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)).weight
        assert w.quant_state.quant_type == s.bnb_4bit_quant_type == "nf4"


def test_gradient_checkpointing_is_enabled_on_the_model(recipe):
    on, _ = build(recipe, gradient_checkpointing=True)
    off, _ = build(recipe, gradient_checkpointing=False)
    assert M.checkpointing_enabled(on) and not M.checkpointing_enabled(off)


def test_sequence_len_truncates(recipe, tokenizer, splits):
    long, _ = D.encode_all(splits.train, recipe.data, tokenizer, 4096)
    short, dropped = D.encode_all(splits.train, recipe.data, tokenizer, 48)
    assert max(len(e) for e in long) > 48
    assert max(len(e) for e in short) == 48
    assert sum(e.truncated for e in short) > 0 and not any(e.truncated for e in long)
    assert len(short) + dropped == len(long)  # dropped ones lost every answer token to truncation


def test_completions_only_masks_the_prompt(recipe, tokenizer, splits):
    row = splits.train[0]
    ex = D.encode(row, recipe.data, tokenizer, 4096)
    trained = tokenizer.decode([t for t in ex.labels if t != D.IGNORE])
    assert trained.startswith(row["output"]) and "### Instruction" not in trained
    all_tokens = recipe_from_dict({**tiny_recipe_dict(Path(recipe.output_dir)), "data": {"source": "llmtune/tiny-tasks", "train_on": "all"}})
    ex_all = D.encode(row, all_tokens.data, tokenizer, 4096)
    assert ex_all.labels[1:] == ex_all.input_ids[1:]


def test_packing_cuts_padding_but_keeps_each_steps_examples(recipe, tokenizer, splits):
    examples, _ = D.encode_all(splits.train, recipe.data, tokenizer, 256)
    plans = {p: D.plan_batches(examples, budget=recipe.train.budget, batch_size=8, micro_batch_size=4,
                               sequence_len=256, packing=p, pad_id=tokenizer.pad_token_id, seed=0) for p in (False, True)}
    unpacked, packed = plans[False].totals(), plans[True].totals()
    # The budget (examples) and the global batch are the same, so both take the same steps...
    assert unpacked["examples"] == packed["examples"] == recipe.train.budget.examples
    assert unpacked["steps"] == packed["steps"] == -(-recipe.train.budget.examples // 8)
    assert unpacked["real_tokens"] == packed["real_tokens"] and unpacked["label_tokens"] == packed["label_tokens"]
    for a, b in zip(plans[False].steps, plans[True].steps, strict=True):  # ...over the same examples each
        assert sum(x.examples for x in a) == sum(x.examples for x in b)
        assert sum(x.label_tokens for x in a) == sum(x.label_tokens for x in b)
    # ...but packing lays them out in fewer rows, wasting fewer slots.
    assert packed["micro_batches"] < unpacked["micro_batches"]
    assert D.padding_share(plans[True]) < D.padding_share(plans[False])
    assert plans[False].progress == plans[True].progress


def test_budget_does_not_depend_on_batch_size(recipe, tokenizer, splits):
    examples, _ = D.encode_all(splits.train, recipe.data, tokenizer, 128)
    for budget, key in (({"examples": 50}, "examples"), ({"tokens": 3000}, "real_tokens")):
        r = make_recipe(recipe.output_dir, train={"budget": budget})
        seen = set()
        for mbs, batch in ((1, 2), (3, 6), (8, 16)):
            plan = D.plan_batches(examples, budget=r.train.budget, batch_size=batch, micro_batch_size=mbs,
                                  sequence_len=128, packing=False, pad_id=0, seed=0)
            total = plan.totals()[key]
            assert total >= r.train.budget.amount
            seen.add(total if key == "examples" else total >= 3000)
            assert plan.progress[-1] == 1.0
        assert len(seen) == 1


def test_packed_loss_equals_loss_of_the_examples_one_by_one(recipe, tokenizer, splits):
    """No cross-contamination: attention and loss stay inside each packed example."""
    model, _ = build(recipe)
    model.eval()
    examples, _ = D.encode_all(splits.train[:6], recipe.data, tokenizer, 256)
    packed = D._packed_batch([examples[:3], examples[3:]], tokenizer.pad_token_id)
    with torch.no_grad():
        together = float(_loss_sum(model, packed, "cpu"))
        alone = sum(float(_loss_sum(model, D._pad_batch([e], tokenizer.pad_token_id), "cpu")) for e in examples)
    assert packed.label_tokens == sum(D._pad_batch([e], 0).label_tokens for e in examples)
    assert together == pytest.approx(alone, rel=1e-4)


def test_eval_is_identical_across_context_len_packing_and_batch(recipe, tmp_path):
    """Without training, trials that differ in how they train score exactly the same eval loss."""
    losses = []
    for values in ({"sequence_len": 64, "sample_packing": False, "micro_batch_size": 2},
                   {"sequence_len": 256, "sample_packing": True, "micro_batch_size": 8}):
        res = run_trial(recipe, recipe.space.complete(values), tmp_path / str(len(losses)), fractions=[0.0],
                        save_adapter=False)
        assert res.status == "complete", res.reason
        losses.append(res.base_eval_loss)
    assert losses[0] == losses[1]


def test_untrained_adapter_loss_does_not_depend_on_lora_settings_so_a_search_reuses_it(recipe, tmp_path):
    """LoRA starts as the identity: rank, targets, scaling and learning rate leave the loss at 0 unchanged
    (bit for bit), which is what lets a search measure it once (`study.base_eval_key`)."""
    losses = []
    for values in ({"lora_r": 4, "lora_target_modules": "qv", "learning_rate": 1e-4, "use_rslora": False},
                   {"lora_r": 16, "lora_target_modules": "all-linear", "learning_rate": 1e-2, "use_rslora": True}):
        res = run_trial(recipe, recipe.space.complete(values), tmp_path / str(len(losses)), fractions=[0.0],
                        save_adapter=False)
        assert res.status == "complete" and res.info["base_eval_loss_reused"] is False
        losses.append(res.base_eval_loss)
    assert losses[0] == losses[1]
    context = res.info["base_eval_context"]
    assert context["device"] == "cpu" and context["versions"]["torch"]
    reused = run_trial(recipe, recipe.space.complete({}), tmp_path / "reused", fractions=[0.0, 1.0],
                       save_adapter=False, base_eval={"loss": losses[0], "context": context})
    assert reused.status == "complete" and reused.info["base_eval_loss_reused"] is True
    assert reused.curve[0] == [0.0, losses[0]] and reused.curve[1][1] < losses[0]  # trained from there
    # measured elsewhere (another GPU, other library versions): this trial measures it itself
    elsewhere = run_trial(recipe, recipe.space.complete({}), tmp_path / "elsewhere", fractions=[0.0], save_adapter=False,
                          base_eval={"loss": 99.0, "context": {**context, "gpu": "NVIDIA H100 80GB HBM3"}})
    assert elsewhere.info["base_eval_loss_reused"] is False and elsewhere.curve == [[0.0, losses[0]]]


def test_training_lowers_eval_loss_and_writes_result(tmp_path, tiny_model_path, tiny_data_path):
    r = make_recipe(tmp_path, train={"budget": {"examples": 256}, "eval_points": 2})
    res = run_trial(r, r.space.complete({"learning_rate": 3e-3}), tmp_path / "t")
    assert res.status == "complete", res.reason
    assert res.metrics["eval_loss"] < res.base_eval_loss - 0.3, res.curve
    assert [f for f, _ in res.curve] == [0.0, 0.5, 1.0]
    saved = json.loads((tmp_path / "t" / "result.json").read_text())
    for metric in ("eval_loss", "peak_memory_gb", "train_throughput", "latency_ms", "ttft_ms",
                   "generation_memory_gb", "trainable_params", "train_time_s"):
        assert saved["metrics"][metric] > 0, metric
    info = saved["info"]
    assert info["data_fingerprint"] and info["versions"]["transformers"] and info["device"] == "cpu"
    assert info["trained_examples"] == 256 and info["trained_tokens"] > 0
    # Loop timings behind the benchmark's throughput: planning, and the loop (steps + bookkeeping, no evals).
    assert 0 < info["plan_s"] < info["load_s"]
    assert info["train_loop_s"] >= saved["metrics"]["train_time_s"] > 0 and info["train_cpu_s"] > 0
    assert info["label_only_logits"] is True
    assert (tmp_path / "t" / "adapter" / "adapter_config.json").exists()


def test_oom_and_crash_become_statuses(recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMTUNE_FAULT", "oom")
    res = run_trial(recipe, recipe.space.complete({}), tmp_path / "oom", fractions=[1.0])
    assert res.status == "oom" and "out of memory" in res.reason
    monkeypatch.setenv("LLMTUNE_FAULT", "crash")
    res = run_trial(recipe, recipe.space.complete({}), tmp_path / "crash", fractions=[1.0])
    assert res.status == "crashed" and "injected crash" in res.reason and "Traceback" in res.info["traceback"]


def test_unknown_target_module_is_a_clear_error(recipe, tmp_path):
    res = run_trial(recipe, recipe.space.complete({"lora_target_modules": "c_attn"}), tmp_path / "x", fractions=[1.0])
    assert res.status == "crashed"
    assert "lora_target_modules" in res.reason and "q_proj" in res.reason


def test_chat_format_trains_on_assistant_turns_only(recipe, tokenizer, tmp_path):
    cfg = recipe_from_dict({**tiny_recipe_dict(tmp_path), "data": {"source": "x.jsonl", "format": "chat"}}).data
    row = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."},
                        {"role": "assistant", "content": "hi"}, {"role": "user", "content": "Again."},
                        {"role": "assistant", "content": "hello"}]}
    ex = D.encode(row, cfg, tokenizer, 4096)
    trained = tokenizer.decode([t for t in ex.labels if t != D.IGNORE])
    assert "hi" in trained and "hello" in trained
    assert "Say hi" not in trained and "Be brief" not in trained
    full = tokenizer.apply_chat_template(row["messages"], tokenize=False)
    assert tokenizer.decode(ex.input_ids) == full


def test_eval_loss_is_token_weighted_and_batch_independent(recipe, tokenizer, splits):
    model, _ = build(recipe)
    examples, _ = D.encode_all(splits.eval, recipe.data, tokenizer, 192)
    a = evaluate(model, D.eval_batches(examples, 3, tokenizer.pad_token_id), "cpu")
    b = evaluate(model, D.eval_batches(examples, 16, tokenizer.pad_token_id), "cpu")
    assert a == pytest.approx(b, rel=1e-5)


def test_batched_encoding_gives_the_ids_of_one_call_per_piece(recipe, tokenizer, splits):
    rows = splits.train[:40]
    fast = D.encode_all(rows, recipe.data, tokenizer, 96)[0]
    slow = []
    for row in rows:  # the plain way: one tokenizer call per prompt/answer piece
        ids, labels = [tokenizer.bos_token_id], [D.IGNORE]
        for text, is_completion in D.segments(row, recipe.data, tokenizer):
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            labels += piece if is_completion else [D.IGNORE] * len(piece)
        slow.append(D.Example(ids[:96], labels[:96], len(ids) > 96))
    assert fast == [e for e in slow if any(t != D.IGNORE for t in e.labels[1:])]


def test_eval_batches_group_by_length_and_keep_every_token(recipe, tokenizer, splits):
    examples, _ = D.encode_all(splits.eval, recipe.data, tokenizer, 192)
    grouped = D.eval_batches(examples, 8, tokenizer.pad_token_id)
    in_order = [D._pad_batch(examples[i: i + 8], tokenizer.pad_token_id) for i in range(0, len(examples), 8)]
    assert sum(b.real_tokens for b in grouped) == sum(b.real_tokens for b in in_order)
    assert sum(b.label_tokens for b in grouped) == sum(b.label_tokens for b in in_order)
    assert sum(b.slots for b in grouped) < 0.8 * sum(b.slots for b in in_order)  # far less padding
    model, _ = build(recipe)
    assert evaluate(model, grouped, "cpu") == pytest.approx(evaluate(model, in_order, "cpu"), rel=1e-5)


def _full_logits_loss(model, batch):
    logits = model(**{k: torch.tensor(v) for k, v in (("input_ids", batch.input_ids), ("attention_mask", batch.attention_mask),
                                                       ("position_ids", batch.position_ids)) if v is not None}).logits
    labels = torch.tensor(batch.labels)
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                             ignore_index=D.IGNORE, reduction="sum")


def test_loss_computes_logits_only_at_label_tokens_and_keeps_the_value(recipe, tokenizer, splits, monkeypatch):
    model, _ = build(recipe)
    model.eval()
    examples, _ = D.encode_all(splits.train[:8], recipe.data, tokenizer, 128)
    for batch in (D._pad_batch(examples, tokenizer.pad_token_id), D._packed_batch([examples[:4], examples[4:]], 0)):
        with torch.no_grad():
            assert float(_loss_sum(model, batch, "cpu")) == pytest.approx(float(_full_logits_loss(model, batch)), rel=1e-5)
    assert model._llmtune_split_head  # the tiny Llama takes the label-only path
    # A model that changes its logits after the output layer keeps the plain path, and its own logits.
    other, _ = build(recipe)
    other.eval()
    base = other.get_base_model()
    forward = base.forward

    def scaled(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = out.logits * 2.0
        return out

    monkeypatch.setattr(base, "forward", scaled)
    batch = D._pad_batch(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        assert float(_loss_sum(other, batch, "cpu")) == pytest.approx(float(_full_logits_loss(other, batch)), rel=1e-5)
    assert other._llmtune_split_head is False
