"""Task metrics on generations: the built-in ones (pure functions of predictions and references) and a
user's own function, loaded from ``module:function``.

Each built-in returns a value in [0, 1]. rouge-score and sacrebleu are not dependencies, so ROUGE-L, chrF
and BLEU are written here from their published definitions (each function says which); they agree with
those libraries' common settings up to their tokenizers' details, and are scaled to [0, 1] (sacrebleu
reports 0-100). Imports no torch: the preflight loads this module to check a user's metric.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import math
import re
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

TRAILING = ".,;:!?"


class MetricError(Exception):
    """A metric on generations could not be computed: the user's function raised or returned a bad value."""


def normalize(text: str) -> str:
    """What exact_match and contains compare: stripped, lower-cased (casefold), runs of whitespace as one space,
    trailing ``. , ; : ! ?`` dropped."""
    return " ".join(str(text).casefold().split()).rstrip(TRAILING).rstrip()


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    return _mean([float(normalize(p) == normalize(r)) for p, r in zip(predictions, references, strict=True)])


def contains(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions in which the reference appears (both normalised)."""
    return _mean([float(normalize(r) in normalize(p)) for p, r in zip(predictions, references, strict=True)])


def _words(text: str) -> list[str]:
    """rouge-score's default tokenizer: lower-case, anything but a-z and 0-9 separates words."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 (Lin 2004, beta 1, as rouge-score's ``fmeasure``): LCS of the word lists over each length."""
    scores = []
    for p, r in zip(predictions, references, strict=True):
        pw, rw = _words(p), _words(r)
        lcs = _lcs(pw, rw) if pw and rw else 0
        scores.append(0.0 if lcs == 0 else 2 * lcs / (len(pw) + len(rw)))
    return _mean(scores)


def _ngrams(tokens: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def chrf(predictions: Sequence[str], references: Sequence[str], order: int = 6, beta: float = 2.0) -> float:
    """chrF (Popovic 2015), corpus-level: character n-grams (n = 1..6) of each text without whitespace, matches
    summed over the corpus; precision and recall averaged over the orders that have n-grams, then F-beta (2)."""
    hyp, ref, match = [0] * order, [0] * order, [0] * order
    for p, r in zip(predictions, references, strict=True):
        pc, rc = list("".join(p.split())), list("".join(r.split()))
        for n in range(1, order + 1):
            pn, rn = _ngrams(pc, n), _ngrams(rc, n)
            hyp[n - 1] += sum(pn.values())
            ref[n - 1] += sum(rn.values())
            match[n - 1] += sum((pn & rn).values())
    orders = [i for i in range(order) if hyp[i] and ref[i]]
    if not orders:
        return 0.0
    precision = _mean([match[i] / hyp[i] for i in orders])
    recall = _mean([match[i] / ref[i] for i in orders])
    if precision + recall == 0:
        return 0.0
    b2 = beta * beta
    return (1 + b2) * precision * recall / (b2 * precision + recall)


def _bleu_tokens(text: str) -> list[str]:
    """Words and single punctuation marks (close to sacrebleu's 13a tokenizer on plain text)."""
    return re.findall(r"\w+|[^\w\s]", text)


def bleu(predictions: Sequence[str], references: Sequence[str], order: int = 4) -> float:
    """Corpus BLEU-4 (Papineni et al. 2002), one reference each: clipped n-gram precisions summed over the
    corpus, their geometric mean times the brevity penalty. An order with no match counts as 1 / (2^k x its
    n-grams), k = 1, 2, ... for each such order (sacrebleu's default 'exp' smoothing)."""
    matches, totals = [0] * order, [0] * order
    hyp_len = ref_len = 0
    for p, r in zip(predictions, references, strict=True):
        pt, rt = _bleu_tokens(p), _bleu_tokens(r)
        hyp_len, ref_len = hyp_len + len(pt), ref_len + len(rt)
        for n in range(1, order + 1):
            pn, rn = _ngrams(pt, n), _ngrams(rt, n)
            totals[n - 1] += sum(pn.values())
            matches[n - 1] += sum((pn & rn).values())
    if hyp_len == 0:
        return 0.0
    log_sum, k = 0.0, 1
    for m, t in zip(matches, totals, strict=True):
        if m == 0:
            k *= 2
            log_sum += math.log(1 / (k * max(t, 1)))
        else:
            log_sum += math.log(m / t)
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return brevity * math.exp(log_sum / order)


def json_valid(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions that parse as JSON, the whole answer (stripped); references are not read."""
    def parses(text: str) -> bool:
        try:
            json.loads(text.strip())
        except ValueError:
            return False
        return True

    return _mean([float(parses(p)) for p in predictions])


def length_ok(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions that are not empty and at most max(2 x, 10 more than) the reference's characters
    (stripped): the answer keeps to the reference's length, neither silent nor rambling."""
    return _mean([float(0 < len(p.strip()) <= max(2 * len(r.strip()), len(r.strip()) + 10))
                  for p, r in zip(predictions, references, strict=True)])


# The built-in task metrics, by the names in `llmtune.config.objectives.TASK_METRICS`.
BUILTIN: dict[str, Callable[[Sequence[str], Sequence[str]], float]] = {
    "exact_match": exact_match, "contains": contains, "rouge_l": rouge_l, "chrf": chrf, "bleu": bleu,
    "json_valid": json_valid, "length_ok": length_ok,
}


# ------------------------------------------------------------------------------------------ user metrics


def load_metric(spec: str) -> Callable[..., Any]:
    """The function ``spec`` names: ``'package.module:function'`` (imported; the working folder is tried too)
    or ``'path/to/file.py:function'``. Raises ImportError or AttributeError with what is wrong."""
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise ImportError(f"{spec!r} is not 'module:function'")
    if where.endswith(".py"):
        path = Path(where).expanduser()
        if not path.is_file():
            raise ImportError(f"no file {where}")
        module_name = f"llmtune_user_metric_{abs(hash(str(path.resolve())))}"
        module = sys.modules.get(module_name)
        if module is None:
            loaded = importlib.util.spec_from_file_location(module_name, path)
            if loaded is None or loaded.loader is None:
                raise ImportError(f"cannot load {where}")
            module = importlib.util.module_from_spec(loaded)
            sys.modules[module_name] = module
            loaded.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as e:
            if e.name is None or not where.startswith(e.name) or "" in sys.path:
                raise
            sys.path.insert(0, "")  # a module beside the recipe, run from its folder
            module = importlib.import_module(where)
    fn = getattr(module, name, None)
    if fn is None:
        raise AttributeError(f"module {where} has no {name}")
    if not callable(fn):
        raise AttributeError(f"{where}:{name} is not a function")
    return fn  # type: ignore[no-any-return]


def metric_problem(spec: str) -> str | None:
    """Why ``spec`` cannot be used as a metric (it does not import, or does not take predictions, references
    and rows), or None."""
    try:
        fn = load_metric(spec)
    except Exception as e:  # the user's module may raise anything at import
        return f"{spec!r} cannot be loaded: {type(e).__name__}: {e}"
    try:
        inspect.signature(fn).bind([], [], [])
    except TypeError:
        return f"{spec!r} must take (predictions, references, rows); it takes {inspect.signature(fn)}"
    except ValueError:  # no signature to read (a builtin): it is called and judged then
        pass
    return None


def user_metric(name: str, spec: str, predictions: list[str], references: list[str],
                rows: list[dict[str, Any]]) -> dict[str, float]:
    """Call the user's function; its float under ``name``, or its dict's entries (which must hold ``name``).
    Whatever goes wrong is a MetricError that names the metric and the function."""
    where = f"metric {name} ({spec})"
    try:
        value = load_metric(spec)(list(predictions), list(references), list(rows))
    except Exception as e:  # the user's code: any exception becomes the trial's reason
        raise MetricError(f"{where} raised {type(e).__name__}: {e}") from e
    values = value if isinstance(value, dict) else {name: value}
    out: dict[str, float] = {}
    for key, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise MetricError(f"{where} returned {v!r} for {key!r}: it must return a finite number (or a dict of them)")
        out[str(key)] = float(v)
    if name not in out:
        raise MetricError(f"{where} returned a dict without {name!r} (it has {', '.join(map(repr, out)) or 'nothing'}); "
                          "a dict must hold the objective's own name")
    return out
