"""Run one trial: load, adapt, train on the planned batches with periodic eval, measure, save.

`run_trial` is what a trial process executes. It talks to its parent only through `on_event`
(phase changes, progress, and each eval, whose answer may be "stop": the pruner's verdict).
"""

from __future__ import annotations

import math
import os
import platform
import time
import traceback
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from llmtune import hardware
from llmtune.config.recipe import Recipe
from llmtune.config.space import global_batch, trial_settings
from llmtune.harness import data as D
from llmtune.harness import model as M
from llmtune.harness.data_sources import load_splits
from llmtune.harness.measure import (
    GiB,
    measure_latency,
    peak_so_far_bytes,
    release_memory,
    sync,
    track_peak_memory,
)
from llmtune.harness.optimizers import make_optimizer
from llmtune.harness.targets import TargetError, packed_attention_mask, packing_mode
from llmtune.harness.token_cache import encode_cached
from llmtune.harness.trackers import Trackers
from llmtune.trial.endings import COMPLETE, CRASHED, DIVERGED, OOM, PRUNED, from_text
from llmtune.trial.result import TrialResult

EventFn = Callable[[dict[str, Any]], Any]

# A trial has diverged when an eval loss rises above base * DIVERGED_FACTOR + DIVERGED_MARGIN (base: the
# untrained adapter's eval loss, at 0). Training that works lowers the loss and one that stalls leaves it
# near base; noise and an early overshoot stay well inside 1.5x + 0.5 nats, while a learning rate that is
# too high (3e-3 for most models) sends it to several times base within a few evals and never brings it
# back: each further step of such a trial costs compute and teaches nothing. The margin keeps a base loss
# near 0 (an easy data set) from making any small rise look like divergence.
DIVERGED_FACTOR, DIVERGED_MARGIN = 1.5, 0.5


def diverged(loss: float, base: float | None) -> str | None:
    """Why an eval loss says its trial diverged, or None (see DIVERGED_FACTOR)."""
    if not math.isfinite(loss):
        return f"eval loss became {loss}; lower learning_rate"
    if base is not None and math.isfinite(base) and loss > base * DIVERGED_FACTOR + DIVERGED_MARGIN:
        return (f"eval loss rose to {loss:.4g}, above {DIVERGED_FACTOR:g} x the untrained {base:.4g} + "
                f"{DIVERGED_MARGIN:g}; lower learning_rate")
    return None


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("llmtune", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "optuna"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def eval_fractions(recipe: Recipe, extra: list[float] | None = None) -> list[float]:
    """0 (the untrained adapter = base model), the recipe's evenly spaced points, and extra ones."""
    n = recipe.train.eval_points
    points = {0.0, *(round(i / n, 6) for i in range(1, n + 1)), *(round(f, 6) for f in (extra or []))}
    return sorted(p for p in points if 0.0 <= p <= 1.0)


def _tensors(batch: D.Batch, device: str, packed_mask: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's inputs. Packed rows carry restarting position ids; models that do not read example
    boundaries from them (``packed_mask``: see `harness.targets.packing_mode`) get a block-diagonal mask."""
    out = {"input_ids": torch.tensor(batch.input_ids, device=device)}
    if batch.attention_mask is not None:
        out["attention_mask"] = torch.tensor(batch.attention_mask, device=device)
    if batch.position_ids is not None:
        out["position_ids"] = torch.tensor(batch.position_ids, device=device)
        if packed_mask is not None:
            out["attention_mask"] = packed_attention_mask(out["position_ids"], packed_mask)
    return out


def _loss_sum(model: Any, batch: D.Batch, device: str, packed_mask: torch.dtype | None = None) -> torch.Tensor:
    """Summed next-token cross-entropy over the batch's label tokens (float32)."""
    shifted = [row[1:] + [D.IGNORE] for row in batch.labels]  # shift the labels: no copy of the logits
    split = _split_head(model)
    if split is None:
        logits = model(**_tensors(batch, device, packed_mask), use_cache=False).logits
        labels = torch.tensor(shifted, device=device)
        return torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), labels.flatten(), ignore_index=D.IGNORE, reduction="sum")
    # The output layer only where a label is: prompts and padding (often most of a batch) need no logits.
    # Positions are found on the host from the plain lists, so there is no device sync.
    decoder, head = split
    flat = [t for row in shifted for t in row]
    keep = [i for i, t in enumerate(flat) if t != D.IGNORE]
    hidden = decoder(**_tensors(batch, device, packed_mask), use_cache=False)[0].flatten(0, 1)
    logits = head(hidden.index_select(0, torch.tensor(keep, device=device)))
    targets = torch.tensor([flat[i] for i in keep], device=device)
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")


def _split_head(model: Any) -> tuple[Any, Any] | None:
    """(decoder, output layer) when running them apart gives the model's own logits, else None.

    Checked once per model on a short input, so a model that changes its logits after the output
    layer (soft-capping, scaling) keeps the plain path.
    """
    cached = getattr(model, "_llmtune_split_head", None)
    if cached is not None:
        return cached or None
    split = None
    try:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        decoder, head = base.get_decoder(), base.get_output_embeddings()
        if decoder is not None and head is not None and _same_logits(model, decoder, head):
            split = (decoder, head)
    except Exception:  # an architecture without these hooks keeps the plain path
        split = None
    model._llmtune_split_head = split or False
    return split


@torch.no_grad()
def _same_logits(model: Any, decoder: Any, head: Any) -> bool:
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        vocab = int(getattr(head, "out_features", 0) or head.weight.shape[0])
        ids = (torch.arange(1, 13, device=device) * 7 % vocab).unsqueeze(0)
        full = model(input_ids=ids, use_cache=False).logits
        apart = head(decoder(input_ids=ids, use_cache=False)[0])
        return full.shape == apart.shape and torch.allclose(full.float(), apart.float(), rtol=1e-4, atol=1e-4)
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate(model: Any, batches: list[D.Batch], device: str) -> float:
    """Token-weighted mean loss over the fixed eval set (independent of batch size)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for b in batches:
        total += float(_loss_sum(model, b, device))
        count += b.label_tokens
    model.train(was_training)
    return total / max(1, count)


def probe_indices(plan: D.Plan, n: int) -> list[int]:
    """The steps a probe runs, in order: the first ``max(n, 2)`` and the one with the most slots (padded
    tokens), which sets the plan's peak memory. The first is a warm-up that the probe's timing leaves out."""
    first = list(range(min(max(n, 2), len(plan.steps))))
    largest = max(range(len(plan.steps)), key=lambda i: sum(b.slots for b in plan.steps[i]))
    return first + ([largest] if largest not in first else [])


def _inject_fault(trial_number: int | None) -> None:
    """Test hook: LLMTUNE_FAULT='oom', 'crash' or 'hang', optionally '@1,3' for given trial numbers."""
    fault = os.environ.get("LLMTUNE_FAULT", "")
    if not fault:
        return
    kind, _, which = fault.partition("@")
    if which and str(trial_number) not in which.split(","):
        return
    if kind == "oom":
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected by LLMTUNE_FAULT)")
    if kind == "crash":
        raise RuntimeError("injected crash (LLMTUNE_FAULT)")
    if kind == "hang":
        time.sleep(10**6)


def run_trial(recipe: Recipe, values: dict[str, Any], out_dir: str | Path, *, fractions: list[float] | None = None,
              on_event: EventFn | None = None, trial_number: int | None = None, save_adapter: bool = True,
              base_eval: dict[str, Any] | None = None, probe_steps: int | None = None,
              segment: dict[str, Any] | None = None) -> TrialResult:
    """Run one trial and return its result (also written to out_dir/result.json).

    ``probe_steps``: a short probe of the trial's execution settings instead of the whole trial: its
    first steps and its largest step (the most padded tokens: the plan's peak memory), no evaluation,
    latency or adapter; the metrics are the peak memory, the throughput of the steps after the first,
    and the training seconds projected to the whole plan (`llmtune.study.probes`).

    ``segment``: train only part of the plan, resuming and saving state, with settings per segment
    (`llmtune.harness.resume.SegmentSpec`: population-based training and ``train --schedule``).

    ``base_eval``: ``{"loss", "context"}``, the untrained adapter's eval loss as an earlier trial on the
    same base model, quantization and eval set measured it (`llmtune.study.loop.base_eval_key`): not evaluated
    again if this trial's context (device, GPU, dtype, attention, versions) is the same.
    Out-of-memory becomes status "oom"; any other error "crashed" with the traceback tail.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = trial_settings(values)
    emit = on_event or (lambda event: None)
    result = TrialResult(status=COMPLETE, settings=settings)
    started = time.perf_counter()
    try:
        with ExitStack() as cleanup:
            _run(recipe, settings, out, [] if probe_steps else fractions or eval_fractions(recipe), emit, result,
                 trial_number, save_adapter and not probe_steps, cleanup, base_eval, probe_steps, segment)
    except torch.OutOfMemoryError as e:
        result.status, result.reason = OOM, f"out of memory: {str(e).splitlines()[0][:300]}"
    except MemoryError:
        result.status, result.reason = OOM, "out of host memory (MemoryError)"
    except Exception as e:
        # Some failures say what they are only in words: the CPU allocator's out of memory (a RuntimeError),
        # a full disk or a dropped connection (an OSError's "[Errno 28] ...", torch's or safetensors' own words).
        named = from_text(f"{type(e).__name__}: {e}")
        result.status, result.reason = named or (CRASHED, f"{type(e).__name__}: {e}"[:2000])
        result.info["traceback"] = traceback.format_exc()[-4000:]
    result.info["wall_time_s"] = time.perf_counter() - started
    result.save(out / "result.json")
    return result


def _run(recipe: Recipe, settings: dict[str, Any], out: Path, fractions: list[float], emit: EventFn,
         result: TrialResult, trial_number: int | None, save_adapter: bool, cleanup: ExitStack,
         base_eval: dict[str, Any] | None = None, probe_steps: int | None = None,
         segment: dict[str, Any] | None = None) -> None:
    info = result.info
    info.update(versions=_versions(), trial_number=trial_number, output_dir=str(out))
    threads = hardware.trial_threads(1, recipe.train.threads)  # the search hands each trial its share
    torch.set_num_threads(threads)
    info["threads"] = threads
    torch.manual_seed(recipe.train.seed)

    emit({"event": "phase", "phase": "loading"})
    t0 = time.perf_counter()
    device = hardware.resolve_device(recipe.train.device)
    dtype = M.pick_dtype(recipe.model.dtype, device, M.checkpoint_dtype(recipe.model))
    info.update(device=device, dtype=str(dtype).removeprefix("torch."))
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    tokenizer = M.load_tokenizer(recipe.model)
    splits = load_splits(recipe.data)
    info["data_fingerprint"] = splits.fingerprint
    seq_len = int(settings["sequence_len"])
    cache = Path(recipe.output_dir) / ".cache" / "tokens"  # shared by the search's trials (token_cache.py)
    train_examples, dropped = encode_cached(splits.train, recipe.data, tokenizer, seq_len, cache_dir=cache,
                                            data_fingerprint=splits.fingerprint, split="train")
    eval_examples, _ = encode_cached(splits.eval, recipe.data, tokenizer, recipe.data.eval_max_length, cache_dir=cache,
                                     data_fingerprint=splits.fingerprint, split="eval")
    t_plan = time.perf_counter()
    batch_size = global_batch(settings, recipe.train.gradient_accumulation_steps)
    plan = D.plan_batches(train_examples, budget=recipe.train.budget, batch_size=batch_size,
                          micro_batch_size=int(settings["micro_batch_size"]), sequence_len=seq_len,
                          packing=bool(settings["sample_packing"]), pad_id=tokenizer.pad_token_id, seed=recipe.train.seed)
    eval_set = D.eval_batches(eval_examples, recipe.train.eval_batch_size, tokenizer.pad_token_id)
    info["plan_s"] = time.perf_counter() - t_plan  # batching and padding: what a collator costs elsewhere
    totals = plan.totals()
    info.update(plan=totals, batch_size=batch_size, padding_share=D.padding_share(plan), dropped_examples=dropped,
                truncated_examples=sum(e.truncated for e in train_examples),
                eval_examples=len(eval_examples), eval_tokens=sum(b.label_tokens for b in eval_set))

    base = M.load_base(recipe.model, settings, device, dtype)
    packed_mask = None
    if settings["sample_packing"]:  # can this model keep packed examples apart, and how?
        info["packing_mode"] = mode = packing_mode(base)
        if mode == "none":
            raise TargetError(f"search.sample_packing: {base.config.model_type} cannot keep packed examples apart "
                              "(it ignores position ids and takes no block mask); set sample_packing: false")
        packed_mask = dtype if mode == "mask" else None
    model = M.apply_lora(base, settings)
    trainable, total = M.count_params(model)
    result.metrics["trainable_params"] = float(trainable)
    info.update(total_params=total, quantized_layers=M.quantized_layer_types(model),
                gradient_checkpointing=M.checkpointing_enabled(model))
    info["load_s"] = time.perf_counter() - t0

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(recipe.train.optimizer, params, float(settings["learning_rate"]), recipe.train.weight_decay)
    n_steps = len(plan.steps)
    warmup = settings.get("warmup_steps")
    warmup = int(warmup) if warmup is not None else int(math.ceil(float(settings["warmup_ratio"]) * n_steps))
    from transformers import get_scheduler

    scheduler = get_scheduler(recipe.train.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=n_steps)
    seg = None
    if segment is not None:  # a part of the plan, from a saved state, with the learning rate set per step
        from llmtune.harness.resume import SegmentRun, SegmentSpec

        seg = SegmentRun(SegmentSpec.from_dict(segment), plan, settings, recipe.train.lr_scheduler, model, optimizer,
                         device)
    first, last = (seg.start_step, seg.stop_step) if seg else (0, n_steps)
    done_before = plan.progress[first - 1] if first else 0.0
    trackers = cleanup.enter_context(Trackers(recipe.train.report_to, out, f"trial-{trial_number}", settings))

    eval_after = {plan.step_at(f): f for f in sorted(fractions) if f > 0}
    eval_s = 0.0

    def run_eval(fraction: float, step: int, measured: dict[str, float] | None = None, known: float | None = None,
                 context: dict[str, Any] | None = None) -> bool:
        """Evaluate; ``measured``: the other objectives as known so far, which the pruner may rank on;
        ``known``: the loss, already measured by another trial (the untrained adapter's); ``context``:
        what the loss was measured on, sent with it."""
        nonlocal eval_s
        emit({"event": "phase", "phase": "eval"})
        t = time.perf_counter()
        loss = evaluate(model, eval_set, device) if known is None else known
        eval_s += time.perf_counter() - t
        result.curve.append([fraction, loss])
        trackers.log({"eval/loss": loss}, step)
        why = diverged(loss, result.base_eval_loss) if fraction > 0 else None
        if why:  # decided here, not by the pruner: a diverged trial ends `diverged`, never `pruned`
            result.status, result.reason = DIVERGED, f"{why} (at {fraction:.3g} of the budget)"
            return True
        stop = emit({"event": "eval", "fraction": fraction, "eval_loss": loss, "step": step,
                     "metrics": measured or {}, **({"context": context} if context else {})})
        emit({"event": "phase", "phase": "train"})
        return bool(stop)

    if 0.0 in fractions and first == 0:
        # LoRA starts as the identity (B = 0), so at 0 every trial that shares the base model, its
        # quantization and the eval set has the same loss: the search passes it on once it is known,
        # with what it was measured on; other hardware or library versions measure it again.
        context = {"device": device, "gpu": info.get("gpu"), "dtype": info["dtype"], "versions": info["versions"],
                   "attn": getattr(getattr(model, "config", None), "_attn_implementation", None)}
        known = base_eval.get("loss") if base_eval and base_eval.get("context") == context else None
        run_eval(0.0, 0, known=known, context=context)
        info.update(base_eval_loss_reused=known is not None, base_eval_context=context)
    release_memory(device)  # what the evaluation left cached must not count towards training's peak
    eval_before_loop = eval_s
    model.train()
    train_s = cpu_s = 0.0
    real_tokens = examples_seen = 0
    last_progress = loop_start = time.perf_counter()
    stopped = False
    probe = probe_indices(plan, probe_steps) if probe_steps else None
    with track_peak_memory(device) as train_peak:
        for i in probe if probe is not None else range(first, last):
            step = plan.steps[i]
            if seg is not None:
                seg.before_step(i)
            if probe is not None and len(probe) > 1 and i == probe[1]:  # the probe's first step warmed up: time the rest
                train_s = cpu_s = 0.0
                real_tokens = 0
            if i == first:
                _inject_fault(trial_number)
            sync(device)
            t, c = time.perf_counter(), time.process_time()
            n_labels = max(1, sum(b.label_tokens for b in step))
            loss_sum = torch.zeros((), device=device)
            for batch in step:
                loss = _loss_sum(model, batch, device, packed_mask) / n_labels
                loss.backward()
                loss_sum += loss.detach()  # stays on the device: no host sync per micro batch
            if recipe.train.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, recipe.train.max_grad_norm)
            optimizer.step()
            if seg is None:  # a segment sets each step's learning rate itself (seg.before_step)
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            sync(device)
            train_s += time.perf_counter() - t
            cpu_s += time.process_time() - c  # CPU seconds: a figure that other jobs on the machine blur less
            real_tokens += sum(b.real_tokens for b in step)
            examples_seen += sum(b.examples for b in step)
            # One host read per step (the step already synced): a diverged run stops at once.
            step_loss = float(loss_sum)
            if seg is not None:
                seg.step_losses.append(step_loss)
            if not math.isfinite(step_loss):
                result.status = DIVERGED
                result.reason = f"training loss became {step_loss} at step {i + 1}; lower learning_rate"
                stopped = True
                break
            if time.perf_counter() - last_progress > 1.0 or i == last - 1:
                trackers.log({"train/loss": step_loss, "train/lr": optimizer.param_groups[0]["lr"]}, i + 1)
                emit({"event": "progress", "fraction": plan.progress[i], "step": i + 1, "steps": n_steps, "loss": step_loss})
                last_progress = time.perf_counter()
            if i in eval_after and run_eval(eval_after[i], i + 1, {
                    "train_throughput": real_tokens / train_s if train_s else 0.0,
                    "train_time_s": train_s / (plan.progress[i] - done_before),  # projected to the whole budget
                    "trainable_params": float(trainable),
                    "peak_memory_gb": peak_so_far_bytes(device) / GiB}):
                if result.status != DIVERGED:
                    result.status, result.reason = PRUNED, f"pruned at {eval_after[i]:.3g} of the budget"
                stopped = True
                break

    if probe is not None:
        throughput = real_tokens / train_s if train_s else 0.0
        result.metrics.update(peak_memory_gb=train_peak.gb, train_throughput=throughput, trainable_params=float(trainable),
                              train_time_s=totals["real_tokens"] / throughput if throughput else float("inf"))
        info.update(probe_steps=probe, peak_memory=vars(train_peak), train_cpu_s=cpu_s)
        return
    result.metrics.update(
        eval_loss=result.curve[-1][1] if result.curve else float("nan"),
        peak_memory_gb=train_peak.gb,
        train_throughput=real_tokens / train_s if train_s else 0.0,
        train_time_s=train_s if seg is None else train_s / (plan.progress[i] - done_before),  # a segment's: projected
    )
    # The loop's wall time without its evals: steps plus the loop's own bookkeeping (progress, logs).
    info["train_loop_s"] = time.perf_counter() - loop_start - (eval_s - eval_before_loop)
    info["train_cpu_s"] = cpu_s
    info["label_only_logits"] = bool(getattr(model, "_llmtune_split_head", False))  # which loss path ran
    info.update(peak_memory=vars(train_peak), trained_tokens=real_tokens, trained_examples=examples_seen,
                steps_done=i + 1 if plan.steps else 0, eval_s=eval_s, warmup_steps=warmup)
    if seg is not None:
        info.update(segment={"start_step": first, "stop_step": last, "steps": n_steps}, step_losses=seg.step_losses)
    if stopped:
        return
    if seg is not None:
        seg.save(i + 1)  # before latency, which may draw random numbers: the state is the training's own
    if recipe.measure.latency:
        emit({"event": "phase", "phase": "latency"})
        t = time.perf_counter()
        n = recipe.measure.latency_prompts
        prompts = [D.prompt_ids(r, recipe.data, tokenizer, recipe.data.eval_max_length) for r in splits.eval[:n]]
        lat = measure_latency(model, prompts, recipe.measure.max_new_tokens, device)
        result.metrics.update(ttft_ms=lat.ttft_ms, latency_ms=lat.ms_per_token, generation_memory_gb=lat.memory.bytes / GiB)
        info["latency_s"] = time.perf_counter() - t
    if save_adapter and (seg is None or last == n_steps):
        emit({"event": "phase", "phase": "saving"})
        model.save_pretrained(str(out / "adapter"))
        info["adapter_dir"] = str(out / "adapter")
