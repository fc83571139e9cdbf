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
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmtune import hardware
from llmtune.config.objectives import needs_generations
from llmtune.config.recipe import Recipe
from llmtune.config.settings import TrialSettings
from llmtune.errors import DataError
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


def _loss_sum(model: Any, batch: D.Batch, device: str, packed_mask: torch.dtype | None = None,
              fused: Any = None) -> torch.Tensor:
    """Summed next-token cross-entropy over the batch's label tokens (float32).

    ``fused``: a loss that takes the output layer's weight and the hidden states at the label positions
    (Liger's fused linear cross-entropy, `harness.model.fused_loss`), so the label positions' logits are
    never held at once; training's loss only (evaluations compute the plain loss, on the forward pass the
    model has: under `liger_kernels`, Liger's)."""
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
    at_labels = hidden.index_select(0, torch.tensor(keep, device=device))
    targets = torch.tensor([flat[i] for i in keep], device=device)
    if fused is not None and keep and type(head) is torch.nn.Linear:  # not an adapted output layer: its weight is all
        fused_sum: torch.Tensor = fused(head.weight, at_labels, targets, head.bias)
        return fused_sum.float()
    return torch.nn.functional.cross_entropy(head(at_labels).float(), targets, reduction="sum")


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
    if not count:  # never a loss over no tokens: it would read 0 and win (`D.eval_batches` refuses such a set)
        raise DataError("the eval set has no answer token to score; raise data.eval_max_length",
                          field="data.eval_max_length")
    return total / count


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
              segment: dict[str, Any] | None = None, pause: str | None = None) -> TrialResult:
    """Run one trial and return its result (also written to out_dir/result.json).

    ``probe_steps``: a short probe of the trial's execution settings instead of the whole trial: its
    first steps and its largest step (the most padded tokens: the plan's peak memory), no evaluation,
    latency or adapter; the metrics are the peak memory, the throughput of the steps after the first,
    and the training seconds projected to the whole plan (`llmtune.study.probes`).

    ``segment``: train only part of the plan, resuming and saving state, with settings per segment
    (`llmtune.harness.resume.SegmentSpec`: population-based training, ``train --schedule`` and a paused
    trial continued). ``pause``: where to save the training state when the pruner stops the trial, so that
    it can be continued later where it stopped (`llmtune.study.promotion`).

    ``base_eval``: ``{"loss", "context"}``, the untrained adapter's eval loss as an earlier trial on the
    same base model, quantization and eval set measured it (`llmtune.study.loop.base_eval_key`): not evaluated
    again if this trial's context (device, GPU, dtype, attention, versions) is the same.
    Out-of-memory becomes status "oom"; any other error "crashed" with the traceback tail.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = TrialSettings.of(values)
    emit = on_event or (lambda event: None)
    result = TrialResult(status=COMPLETE, settings=settings.as_dict())
    started = time.perf_counter()
    try:
        with ExitStack() as cleanup:
            _run(_Job(recipe, settings, out, [] if probe_steps else fractions or eval_fractions(recipe), emit, result,
                      trial_number, save_adapter and not probe_steps, base_eval, probe_steps, segment, pause), cleanup)
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


@dataclass
class _Job:
    """What `run_trial` hands the training: the recipe, the trial's settings and what kind of job it is."""

    recipe: Recipe
    settings: TrialSettings
    out: Path
    fractions: list[float]
    emit: EventFn
    result: TrialResult
    trial_number: int | None
    save_adapter: bool
    base_eval: dict[str, Any] | None = None
    probe_steps: int | None = None  # a probe: these steps only, no evaluation (study/probes.py)
    segment: dict[str, Any] | None = None  # a segment: part of the plan, from and to a saved state (PBT)
    pause: str | None = None  # where the state goes when the pruner stops the trial (study/promotion.py)


@dataclass
class _Setup:
    """Data, model and optimizer, ready to train (torchtune's recipe `setup`)."""

    device: str
    dtype: torch.dtype
    tokenizer: Any
    splits: Any
    plan: D.Plan
    eval_set: list[D.Batch]
    model: Any
    packed_mask: torch.dtype | None
    trainable: int
    params: list[torch.nn.Parameter]
    optimizer: Any
    scheduler: Any
    warmup: int
    seg: Any  # harness.resume.SegmentRun, for a segment
    fused_loss: Any = None  # liger_kernels: the output layer fused with the loss (`_loss_sum`)
    undo_liger: Any = None  # liger_kernels: puts the model's own kernels back (`model.apply_liger`)


@dataclass
class _Steps:
    """What the step loop did."""

    train_s: float = 0.0
    cpu_s: float = 0.0
    real_tokens: int = 0
    examples: int = 0
    last: int = -1          # index of the last step run
    stopped: bool = False   # diverged or pruned
    loop_s: float = 0.0     # the loop's wall time without its evals


def _run(job: _Job, cleanup: ExitStack) -> None:
    """One trial: set up, run the steps this job runs (a probe's, a segment's or all), finish its kind of job."""
    recipe, info = job.recipe, job.result.info
    info.update(versions=_versions(), trial_number=job.trial_number, output_dir=str(job.out))
    threads = hardware.trial_threads(1, recipe.train.threads)  # the search hands each trial its share
    torch.set_num_threads(threads)
    info["threads"] = threads
    torch.manual_seed(recipe.train.seed)
    job.emit({"event": "phase", "phase": "loading"})
    t0 = time.perf_counter()
    s = _setup(job)
    info["load_s"] = time.perf_counter() - t0
    trackers = cleanup.enter_context(Trackers(recipe.train.report_to, job.out, f"trial-{job.trial_number}",
                                                  job.settings.as_dict()))
    evaluator = _Evaluator(job, s, trackers)
    first, last = (s.seg.start_step, s.seg.stop_step) if s.seg else (0, len(s.plan.steps))
    if 0.0 in job.fractions and first == 0:
        evaluator.untrained()
    release_memory(s.device)  # what the evaluation left cached must not count towards training's peak
    probe = probe_indices(s.plan, job.probe_steps) if job.probe_steps else None
    with track_peak_memory(s.device) as peak:
        steps = _train_steps(job, s, evaluator, probe if probe is not None else range(first, last), first, last, probe)
    if probe is not None:
        _finish_probe(job, s, steps, peak, probe)
    else:
        _finish(job, s, steps, peak, evaluator, first, last)


def _setup(job: _Job) -> _Setup:
    """Load the data and plan the batches, load the model with its adapter, build optimizer and scheduler."""
    recipe, settings, info = job.recipe, job.settings, job.result.info
    device = hardware.resolve_device(recipe.train.device)
    dtype = M.pick_dtype(recipe.model.dtype, device, M.checkpoint_dtype(recipe.model))
    info.update(device=device, dtype=str(dtype).removeprefix("torch."))
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    tokenizer = M.load_tokenizer(recipe.model)
    splits = load_splits(recipe.data)
    info["data_fingerprint"] = splits.fingerprint
    seq_len = settings.sequence_len
    cache = Path(recipe.output_dir) / ".cache" / "tokens"  # shared by the search's trials (token_cache.py)
    train_examples, dropped = encode_cached(splits.train, recipe.data, tokenizer, seq_len, cache_dir=cache,
                                            data_fingerprint=splits.fingerprint, split="train")
    eval_examples, _ = encode_cached(splits.eval, recipe.data, tokenizer, recipe.data.eval_max_length, cache_dir=cache,
                                     data_fingerprint=splits.fingerprint, split="eval")
    t_plan = time.perf_counter()
    batch_size = settings.global_batch(recipe.train.gradient_accumulation_steps)
    plan = D.plan_batches(train_examples, budget=recipe.train.budget, batch_size=batch_size,
                          micro_batch_size=settings.micro_batch_size, sequence_len=seq_len,
                          packing=settings.sample_packing, pad_id=tokenizer.pad_token_id, seed=recipe.train.seed)
    eval_set = D.eval_batches(eval_examples, recipe.train.eval_batch_size, tokenizer.pad_token_id)
    info["plan_s"] = time.perf_counter() - t_plan  # batching and padding: what a collator costs elsewhere
    info.update(plan=plan.totals(), batch_size=batch_size, padding_share=D.padding_share(plan), dropped_examples=dropped,
                truncated_examples=sum(e.truncated for e in train_examples),
                eval_examples=len(eval_examples), eval_tokens=sum(b.label_tokens for b in eval_set))
    model, packed_mask, trainable, undo_liger = _setup_model(job, device, dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(recipe.train.optimizer, params, settings.learning_rate, recipe.train.weight_decay)
    n_steps = len(plan.steps)
    warmup = settings.warmup(n_steps)
    from transformers import get_scheduler

    scheduler = get_scheduler(recipe.train.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=n_steps)
    seg = None
    if job.segment is not None:  # a part of the plan, from a saved state, with the learning rate set per step
        from llmtune.harness.resume import SegmentRun, SegmentSpec

        seg = SegmentRun(SegmentSpec.from_dict(job.segment), plan, settings, recipe.train.lr_scheduler, model, optimizer,
                         device)
    return _Setup(device, dtype, tokenizer, splits, plan, eval_set, model, packed_mask, trainable, params, optimizer,
                  scheduler, warmup, seg, M.fused_loss(settings), undo_liger)


def _setup_model(job: _Job, device: str, dtype: torch.dtype) -> tuple[Any, torch.dtype | None, int, Any]:
    """The base model with its LoRA adapter, how packed rows keep their examples apart, the trainable count,
    and under `liger_kernels` the function that takes Liger's kernels out again (else None)."""
    info = job.result.info
    base = M.load_base(job.recipe.model, job.settings, device, dtype)
    undo_liger = None
    if job.settings.liger_kernels:
        undo_liger, info["liger_patched"] = M.apply_liger(base)
    packed_mask = None
    if job.settings.sample_packing:  # can this model keep packed examples apart, and how?
        info["packing_mode"] = mode = packing_mode(base)
        if mode == "none":
            raise TargetError(f"search.sample_packing: {base.config.model_type} cannot keep packed examples apart "
                              "(it ignores position ids and takes no block mask); set sample_packing: false")
        packed_mask = dtype if mode == "mask" else None
    model = M.apply_lora(base, job.settings)
    trainable, total = M.count_params(model)
    job.result.metrics["trainable_params"] = float(trainable)
    info.update(total_params=total, quantized_layers=M.quantized_layer_types(model),
                gradient_checkpointing=M.checkpointing_enabled(model))
    return model, packed_mask, trainable, undo_liger


class _Evaluator:
    """Evaluations during training: each is stored in the curve, logged, checked for divergence and sent to
    the search, whose pruner may answer "stop"."""

    def __init__(self, job: _Job, s: _Setup, trackers: Trackers):
        self.job, self.s, self.trackers = job, s, trackers
        self.seconds = 0.0
        plan = s.plan
        self.after = {plan.step_at(f): f for f in sorted(job.fractions) if f > 0}  # step index -> fraction

    def __call__(self, fraction: float, step: int, measured: dict[str, float] | None = None, known: float | None = None,
                 context: dict[str, Any] | None = None) -> bool:
        """Evaluate; ``measured``: the other objectives as known so far, which the pruner may rank on;
        ``known``: the loss, already measured by another trial (the untrained adapter's); ``context``:
        what the loss was measured on, sent with it. Returns whether the trial stops here."""
        job, result = self.job, self.job.result
        job.emit({"event": "phase", "phase": "eval"})
        t = time.perf_counter()
        loss = evaluate(self.s.model, self.s.eval_set, self.s.device) if known is None else known
        self.seconds += time.perf_counter() - t
        result.curve.append([fraction, loss])
        self.trackers.log({"eval/loss": loss}, step)
        why = diverged(loss, result.base_eval_loss) if fraction > 0 else None
        if why:  # decided here, not by the pruner: a diverged trial ends `diverged`, never `pruned`
            result.status, result.reason = DIVERGED, f"{why} (at {fraction:.3g} of the budget)"
            return True
        stop = job.emit({"event": "eval", "fraction": fraction, "eval_loss": loss, "step": step,
                         "metrics": measured or {}, **({"context": context} if context else {})})
        job.emit({"event": "phase", "phase": "train"})
        return bool(stop)

    def untrained(self) -> None:
        """The loss at 0. LoRA starts as the identity (B = 0), so every trial that shares the base model, its
        quantization and the eval set has the same loss there: the search passes it on once it is known, with
        what it was measured on; other hardware or library versions measure it again."""
        info, base_eval = self.job.result.info, self.job.base_eval
        context = {"device": self.s.device, "gpu": info.get("gpu"), "dtype": info["dtype"], "versions": info["versions"],
                   "attn": getattr(getattr(self.s.model, "config", None), "_attn_implementation", None)}
        known = base_eval.get("loss") if base_eval and base_eval.get("context") == context else None
        self(0.0, 0, known=known, context=context)
        info.update(base_eval_loss_reused=known is not None, base_eval_context=context)


def _train_steps(job: _Job, s: _Setup, evaluator: _Evaluator, indices: Iterable[int], first: int, last: int,
                 probe: list[int] | None) -> _Steps:
    """The one step loop, over the steps this job runs: a probe's, a segment's or all."""
    plan, result, device = s.plan, job.result, s.device
    done_before = plan.progress[first - 1] if first else 0.0
    n_steps, eval_before = len(plan.steps), evaluator.seconds
    out = _Steps()
    s.model.train()
    last_progress = loop_start = time.perf_counter()
    for i in indices:
        out.last = i
        step = plan.steps[i]
        if s.seg is not None:
            s.seg.before_step(i)
        if probe is not None and len(probe) > 1 and i == probe[1]:  # the probe's first step warmed up: time the rest
            out.train_s = out.cpu_s = 0.0
            out.real_tokens = 0
        if i == first:
            _inject_fault(job.trial_number)
        step_loss = _one_step(job, s, step, out)
        if s.seg is not None:
            s.seg.step_losses.append(step_loss)
        if not math.isfinite(step_loss):
            result.status = DIVERGED
            result.reason = f"training loss became {step_loss} at step {i + 1}; lower learning_rate"
            out.stopped = True
            break
        if time.perf_counter() - last_progress > 1.0 or i == last - 1:
            evaluator.trackers.log({"train/loss": step_loss, "train/lr": s.optimizer.param_groups[0]["lr"]}, i + 1)
            job.emit({"event": "progress", "fraction": plan.progress[i], "step": i + 1, "steps": n_steps, "loss": step_loss})
            last_progress = time.perf_counter()
        if i in evaluator.after and evaluator(evaluator.after[i], i + 1, {
                "train_throughput": out.real_tokens / out.train_s if out.train_s else 0.0,
                "train_time_s": out.train_s / (plan.progress[i] - done_before),  # projected to the whole budget
                "trainable_params": float(s.trainable),
                "peak_memory_gb": peak_so_far_bytes(device) / GiB}):
            if result.status != DIVERGED:
                result.status, result.reason = PRUNED, f"pruned at {evaluator.after[i]:.3g} of the budget"
                if job.pause:  # paused, not killed: the search may continue it here later
                    _pause(job, s, i + 1, evaluator.after[i])
            out.stopped = True
            break
    out.loop_s = time.perf_counter() - loop_start - (evaluator.seconds - eval_before)
    return out


def _pause(job: _Job, s: _Setup, steps_done: int, fraction: float) -> None:
    """Save the state a stopped trial would go on from (`harness.resume.save_state`); say so in the result."""
    from llmtune.harness.resume import save_state

    assert job.pause is not None
    try:
        save_state(Path(job.pause), s.model, s.optimizer, s.device, steps_done, len(s.plan.steps), job.settings,
                   s.seg.spec.schedule if s.seg is not None else None)
    except OSError as e:  # a full disk: the trial is stopped as before (killed), not failed
        job.result.info["pause_failed"] = f"{type(e).__name__}: {e}"[:300]
        return
    job.result.info["paused"] = {"state": job.pause, "steps_done": steps_done, "fraction": fraction}


def _one_step(job: _Job, s: _Setup, step: list[D.Batch], out: _Steps) -> float:
    """One optimizer step over its micro batches; returns its loss (one host read: the step already synced)."""
    device = s.device
    sync(device)
    t, c = time.perf_counter(), time.process_time()
    n_labels = max(1, sum(b.label_tokens for b in step))
    loss_sum = torch.zeros((), device=device)
    for batch in step:
        loss = _loss_sum(s.model, batch, device, s.packed_mask, s.fused_loss) / n_labels
        loss.backward()
        loss_sum += loss.detach()  # stays on the device: no host sync per micro batch
    if job.recipe.train.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(s.params, job.recipe.train.max_grad_norm)
    s.optimizer.step()
    if s.seg is None:  # a segment sets each step's learning rate itself (seg.before_step)
        s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    sync(device)
    out.train_s += time.perf_counter() - t
    out.cpu_s += time.process_time() - c  # CPU seconds: a figure that other jobs on the machine blur less
    out.real_tokens += sum(b.real_tokens for b in step)
    out.examples += sum(b.examples for b in step)
    return float(loss_sum)


def _finish_probe(job: _Job, s: _Setup, steps: _Steps, peak: Any, probe: list[int]) -> None:
    """A probe's metrics: peak memory, throughput after the first step, seconds projected to the whole plan."""
    throughput = steps.real_tokens / steps.train_s if steps.train_s else 0.0
    job.result.metrics.update(peak_memory_gb=peak.gb, train_throughput=throughput, trainable_params=float(s.trainable),
                              train_time_s=s.plan.totals()["real_tokens"] / throughput if throughput else float("inf"))
    job.result.info.update(probe_steps=probe, peak_memory=vars(peak), train_cpu_s=steps.cpu_s)


def _quality(job: _Job, s: _Setup) -> None:
    """The metrics on the adapter's answers to eval rows and on the base (forgetting): `harness/generate.py`."""
    from llmtune.harness.generate import measure_quality

    job.emit({"event": "phase", "phase": "generate"})
    metrics, details = measure_quality(s.model, s.tokenizer, job.recipe, s.splits.eval, s.device, job.out)
    job.result.metrics.update(metrics)
    job.result.info.update(details)


def _finish(job: _Job, s: _Setup, steps: _Steps, peak: Any, evaluator: _Evaluator, first: int, last: int) -> None:
    """A full run's or a segment's metrics; then, unless it stopped: its state saved (a segment), latency
    measured, the metrics on generations and forgetting measured (when the recipe names them), the adapter saved."""
    result, info, plan, recipe = job.result, job.result.info, s.plan, job.recipe
    i = steps.last
    done_before = plan.progress[first - 1] if first else 0.0
    result.metrics.update(
        eval_loss=result.curve[-1][1] if result.curve else float("nan"),
        peak_memory_gb=peak.gb,
        train_throughput=steps.real_tokens / steps.train_s if steps.train_s else 0.0,
        train_time_s=steps.train_s if s.seg is None else steps.train_s / (plan.progress[i] - done_before),  # projected
    )
    info["train_loop_s"] = steps.loop_s  # steps plus the loop's own bookkeeping (progress, logs), without evals
    info["train_cpu_s"] = steps.cpu_s
    info["label_only_logits"] = bool(getattr(s.model, "_llmtune_split_head", False))  # which loss path ran
    info.update(peak_memory=vars(peak), trained_tokens=steps.real_tokens, trained_examples=steps.examples,
                steps_done=i + 1 if plan.steps else 0, eval_s=evaluator.seconds, warmup_steps=s.warmup)
    if s.seg is not None:
        info.update(segment={"start_step": first, "stop_step": last, "steps": len(plan.steps)},
                    step_losses=s.seg.step_losses)
    if steps.stopped:
        return
    if s.seg is not None:
        s.seg.save(i + 1)  # before latency, which may draw random numbers: the state is the training's own
    if s.undo_liger is not None:  # measured as the adapter is used: with the model's own kernels
        s.undo_liger()
    if recipe.measure.latency:
        job.emit({"event": "phase", "phase": "latency"})
        t = time.perf_counter()
        n = recipe.measure.latency_prompts
        prompts = [D.prompt_ids(r, recipe.data, s.tokenizer, recipe.data.eval_max_length) for r in s.splits.eval[:n]]
        lat = measure_latency(s.model, prompts, recipe.measure.max_new_tokens, s.device)
        result.metrics.update(ttft_ms=lat.ttft_ms, latency_ms=lat.ms_per_token, generation_memory_gb=lat.memory.bytes / GiB)
        info["latency_s"] = time.perf_counter() - t
    if needs_generations(recipe) or "forgetting" in recipe.objectives or "forgetting" in recipe.constraints:
        _quality(job, s)
    if job.save_adapter and (s.seg is None or last == len(plan.steps)):
        job.emit({"event": "phase", "phase": "saving"})
        s.model.save_pretrained(str(job.out / "adapter"))
        info["adapter_dir"] = str(job.out / "adapter")
