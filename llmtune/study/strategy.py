"""Strategies: what the one search loop (`llmtune.study.loop.Search`) runs, trial by trial.

A strategy answers the loop's few questions (Optuna's sampler/pruner style: a small interface, optional
hooks) and never claims, records or redraws itself:

- `next_state`: is there a trial to start ("start"), nothing yet ("wait") or nothing left ("done")?
- `claim`: does this process run the trial `ask` just gave (`Claim`)?
- `settings`: the trial's settings (sampled, or queued with it);
- `run`: its job, returning what happened (a `TrialResult`, not yet decided: `trial.endings.decide`);
- `segment_end`, `after`, `figures`: what the ending depends on, what follows a told trial, the
  dashboard figures it draws.

`Strategy` itself is the plain search (the sampler proposes; the memory gate, then a full trial);
`ProbeStrategy` measures execution settings by probes first (`study/probes.py`); `PBTStrategy`
(`study/pbt.py`) runs population-based training's segments. Adding one: a subclass and its line in
`make_strategy`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna

from llmtune.config.pruner_settings import FRACTION_TOL
from llmtune.config.recipe import Recipe
from llmtune.config.space import SearchSpace
from llmtune.study import engine, probes, promotion, record
from llmtune.study.attrs import PRIOR, PROBES
from llmtune.study.priors import recipe_facts, starting_points
from llmtune.study.storage import counted
from llmtune.trial.endings import COMPLETE, ENDINGS, OVER_BUDGET, SegmentEnd, no_layout_fits, not_run
from llmtune.trial.result import TrialResult

if TYPE_CHECKING:  # pragma: no cover
    from llmtune.study.loop import Search


@dataclass
class Claim:
    """A strategy's answer about a trial `ask` gave: run it here, or not and how it is given up."""

    run: bool
    give_up: str = ""      # why not; "" leaves the trial alone (another process runs it)
    surplus: bool = False  # end it as `surplus` even when it was queued (PBT runs only its own queue)


RUN = Claim(True)


@dataclass
class Job:
    """One claimed trial on its way through a strategy."""

    trial: optuna.Trial
    values: dict[str, Any]
    trial_dir: Path
    env: dict[str, str]
    state: dict[str, Any] = field(default_factory=dict)  # what a strategy keeps between run and after
    resume: promotion.Resume | None = None  # a paused trial's continuation (study/promotion.py)

    @property
    def configuration(self) -> int:
        """The number of the configuration's first trial (the paused one's, for a continuation)."""
        return self.resume.first if self.resume is not None else self.trial.number


class Strategy:
    """The plain search: the sampler proposes each configuration, the memory gate may refuse it, a full
    trial trains it and the pruner may stop it; `n_trials` counted from the storage."""

    probing = False

    def __init__(self, recipe: Recipe):
        self.recipe = recipe

    def sample_space(self, space: SearchSpace) -> SearchSpace:
        """The space the sampler proposes from."""
        return space

    def planned_trials(self) -> int | None:
        """The trial count this strategy fixes itself (None: the recipe's or the caller's n_trials)."""
        return None

    def created(self, search: Search) -> None:
        """The study was created by this process: queue known-good starting points first (`starting_points`:
        from the model's width and size, the budget and the objectives), with `sampler: auto` (not the grid);
        a resumed or joined study gets none."""
        if self.recipe.study.sampler != "auto" or isinstance(search.sampler, optuna.samplers.GridSampler):
            return
        facts = recipe_facts(self.recipe, search.space)
        search.log("first trials: " + (f"the learning rate for width {facts.hidden_size}, ~{facts.parameters / 1e9:.2g}B "
                                       f"parameters{f', {facts.steps} steps' if facts.steps else ''}" if facts else
                                       "the model's config could not be read: priors for a 7B-class model")
                   + " (study/priors.py)")
        for config in starting_points(search.sample_space, facts, set(self.recipe.objectives), search.n_trials):
            search.study.enqueue_trial(config, user_attrs={PRIOR: True}, skip_if_exists=True)

    def prepare(self, search: Search) -> None:
        """The study is open (created, joined or resumed)."""

    def describe(self, search: Search) -> list[str]:
        """Lines for the search's log, after the study line."""
        return []

    def next_state(self, search: Search) -> str:
        """"start" while finished + running trials are fewer than n_trials or a paused trial's continuation
        waits (paused trials the pruner would now let go on are promoted first: `promotion.promote`), "wait"
        while every slot is taken but a running trial may still be lost (and need a retry), else "done".
        Counted from the storage, so all processes on the study share n_trials."""
        if search.pruner.pause:
            promotion.promote(search.study, search.pruner.should_prune, search.log)
        if search.n_trials is None:
            return "start"
        done, running = counted(search.study)
        if done + running < search.n_trials or promotion.waiting(search.study):
            return "start"
        return "wait" if done < search.n_trials else "done"

    def claim(self, search: Search, trial: optuna.Trial) -> Claim:
        """Several processes may ask at once for the last slot. Each checks again after `ask`, when its own
        trial is in the storage: if finished + running trials now exceed n_trials it gives the trial up
        (a queued retry goes back to WAITING; a fresh one, not sampled yet, ends `surplus`), so n_trials
        is never exceeded; if both give up, the loop's random backoff breaks the tie. Storage reads see
        every committed trial (Optuna creates trials under a lock on the study row)."""
        frozen = engine.frozen(search.study, trial)
        if promotion.resume_of(frozen) is not None:  # a continuation: counts for no n_trials; one per paused trial
            if promotion.twin(frozen, search.study.get_trials(deepcopy=False)):
                return Claim(False, "another worker continues this paused trial", surplus=True)
            return RUN
        if search.n_trials is None:
            return RUN
        done, running = counted(search.study)
        return RUN if done + running <= search.n_trials else Claim(False, "another worker took the last of n_trials")

    def settings(self, search: Search, trial: optuna.Trial) -> dict[str, Any]:
        return search.sample_space.suggest(trial)

    def run(self, search: Search, job: Job) -> TrialResult:
        if job.resume is not None:
            return self.continue_paused(search, job, job.resume)
        return self.gated(search, job, lambda: search.train(job))

    @staticmethod
    def continue_paused(search: Search, job: Job, resume: promotion.Resume) -> TrialResult:
        """A promoted trial goes on from the state it was paused with, to the end (or its next pause): its
        curve so far is kept, no step is trained twice. A state this machine cannot read is trained again
        from the start."""
        if resume.state is None:
            search.log(f"trial {job.trial.number}: the state of paused trial {resume.trial} cannot be read here "
                       f"({resume.folder}); training it again from the start")
            return search.train(job)
        segment = {"schedule": [{"until": 1.0, "values": {}}], "start": resume.fraction, "stop": 1.0,
                   "resume": resume.state, "save": None}
        fractions = [f for f in search.eval_fractions() if f > resume.fraction + FRACTION_TOL]
        result = search.train(job, fractions=fractions, segment=segment, history=(resume.curve, resume.rung_metrics))
        result.curve = [*resume.curve, *result.curve]
        result.info["resumed_from"] = {"trial": resume.trial, "fraction": resume.fraction}
        return result

    @staticmethod
    def gated(search: Search, job: Job, train: Callable[[], TrialResult]) -> TrialResult:
        """`train()` unless the memory gate refuses the job's settings (then `over_budget`, not run); the
        gate's prediction is kept with the result either way."""
        reason, predicted = search.gate.check(search.study, job.values)
        if reason:
            return not_run(OVER_BUDGET, reason, job.values, predicted)
        result = train()
        if predicted is not None:
            result.metrics["predicted_memory_gb"] = predicted
        return result

    def segment_end(self, search: Search, job: Job) -> SegmentEnd | None:
        return None

    def after(self, search: Search, job: Job, result: TrialResult) -> None:
        """The trial has been told (`result` is its decided ending): a continuation that will not be retried
        frees the paused state it went on from."""
        if job.resume is not None and job.resume.state is not None and not ENDINGS[result.status].retried:
            promotion.release(job.resume)

    def figures(self, search: Search) -> dict[str, str]:
        """This strategy's optuna-dashboard custom plots: {plot id: plotly figure JSON}."""
        return {}


class ProbeStrategy(Strategy):
    """`study.execution: probe`: the sampler sees the learning settings; each learning configuration
    probes every execution variant, trains once in the fastest that fits, and records the other variants
    as trials of their own after it is told (`study/probes.py`)."""

    probing = True

    def sample_space(self, space: SearchSpace) -> SearchSpace:
        return probes.learning_space(space)

    def describe(self, search: Search) -> list[str]:
        names = ", ".join(probes.probed_settings(search.space))
        return [f"execution settings ({names}): {len(probes.variants(search.space))} variants probed per learning "
                "configuration, which trains once, in the fastest that fits"]

    def run(self, search: Search, job: Job) -> TrialResult:
        if job.resume is not None:  # a continuation trains on in the variant its paused trial was given
            self._record_variant(search, job)
            paused = search.study.get_trials(deepcopy=False)[job.resume.trial]
            prober = probes.Probes.restored(self.recipe, paused.user_attrs.get(PROBES))
            job.state.update(prober=prober, chosen=prober.variant(job.values))
            return self.continue_paused(search, job, job.resume)
        prober = probes.Probes(self.recipe, lambda settings, folder: search.probe(job, settings, folder, probes.PROBE_STEPS),
                               lambda settings: search.gate.check(search.study, settings))
        chosen = prober.probe(search.study, job.trial, job.values, job.trial_dir)
        job.state.update(prober=prober, chosen=chosen)
        if chosen is None:
            return no_layout_fits([p.result for p in prober.found], prober.summary(), job.values)
        job.values = chosen.settings
        record.store_settings(search.study, job.trial, job.values)
        self._record_variant(search, job)
        result = search.train(job)
        predicted = chosen.result.metrics.get("predicted_memory_gb")
        if predicted is not None:
            result.metrics["predicted_memory_gb"] = predicted
        return result

    @staticmethod
    def _record_variant(search: Search, job: Job) -> None:
        """The execution variant the trial trains in, as its Optuna params (the sampler saw the learning ones)."""
        storage, tid = engine.storage(search.study), engine.trial_id(job.trial)
        for name, dist in probes.distributions(search.space).items():
            storage.set_trial_param(tid, name, dist.to_internal_repr(job.values[name]), dist)

    def after(self, search: Search, job: Job, result: TrialResult) -> None:
        super().after(search, job, result)
        chosen = job.state.get("chosen")
        if chosen is None or result.status != COMPLETE:
            return  # pruned, diverged or failed: its variants learned the same and would end the same
        added = job.state["prober"].record(search.study, job.trial, chosen, result)
        if added:
            search.log(f"trial {job.trial.number}: execution variants recorded as trial(s) {', '.join(map(str, added))}")


def make_strategy(recipe: Recipe) -> Strategy:
    """The recipe's strategy: `study.strategy: pbt`, else probes where execution settings are searched
    under `study.execution: probe`, else the plain search."""
    if recipe.study.strategy == "pbt":
        from llmtune.study.pbt import PBTStrategy

        return PBTStrategy(recipe)
    return ProbeStrategy(recipe) if probes.enabled(recipe) else Strategy(recipe)
