"""The names under which llmtune writes its data into an Optuna study (visible in optuna-dashboard).

Trial user attributes hold what a trial is and did; study user attributes what the search is. The
search loop writes them; the pruner, the results, the report and the export read them.
"""

# Trial user attributes
STATUS = "llmtune.status"              # a row of llmtune.trial.endings, or "running"
REASON = "llmtune.reason"              # why it ended so, in words
METRICS_KEY = "llmtune.metrics"        # {metric: value}: every objective and what else was measured
CURVE = "llmtune.curve"                # [[fraction of the budget, eval loss], ...]
RUNG_METRICS = "llmtune.rung_metrics"  # [[fraction, {objective: value so far}], ...], read by the pruner
SETTINGS = "llmtune.settings"          # every setting of the trial, searched or fixed
DIR = "llmtune.dir"                    # the trial's folder (result.json, trial.log, adapter/)
INFO = "llmtune.info"                  # timings, token counts, device, versions
CONSTRAINTS = "llmtune.constraints"    # {constraint: value}, <= 0 met; Optuna keeps the list (see study/record.py)
RETRY_OF = "llmtune.retry_of"          # the number of the trial this one retries
LINEAGE = "llmtune.pbt.lineage"        # a PBT segment: {member, segment, parent: {member, segment, trial} | None,
#                                        exploited, schedule: [{until, values}] up to this segment, params, resume,
#                                        state (its saved state's folder), start, stop, final} (study/pbt.py)
VARIANT_OF = "llmtune.variant_of"      # an execution variant's full trial (study/probes.py): counts for no n_trials
PROBES = "llmtune.probes"              # on a full trial: every execution variant's probe (settings, status, metrics)
PRIOR = "llmtune.prior"                # True on a known-good starting point queued first (priors.prior_configs)
PAUSED = "llmtune.paused"              # on a trial the pruner stopped, its state saved: {fraction, state} (study/promotion.py)
RESUME_OF = "llmtune.resume_of"        # a continuation of a paused trial: {trial, first, fraction, state}; counts for no n_trials
# Trial system attributes
OWNER = "llmtune.owner"                # host:pid of the search process running the trial
PROPOSAL = "llmtune.proposal"          # {param: value}: the configuration a trial was given, before it has its params

# Study user attributes
RECIPE = "llmtune.recipe"              # the recipe, storage password masked
VERSION = "llmtune.version"
FINGERPRINT = "llmtune.fingerprint"    # {objectives, space, data_fingerprint, recipe_fingerprint}, written at once
# What FINGERPRINT holds, as separate attributes: how earlier versions wrote it (read for their studies)
OBJECTIVES = "llmtune.objectives"
SPACE = "llmtune.space"
DATA_FINGERPRINT = "llmtune.data_fingerprint"
RECIPE_FINGERPRINT = "llmtune.recipe_fingerprint"
PBT = "llmtune.pbt"                    # population-based training's settings, segment bounds and state folder
BASE_EVAL_PREFIX = "llmtune.base_eval_loss."  # + a digest of what the untrained model's loss depends on
