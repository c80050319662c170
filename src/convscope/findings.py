"""Findings: each claim an analysis tests, with the measured contrast, its uncertainty and a computed verdict.

A claim of the paper (or of TorchRay, Adebayo et al., NetDissect) becomes a :class:`Finding`: the claim in words,
where it comes from, the paper's number, this run's, and one signed **contrast** whose sign is the claim's
direction (``measured > 0`` supports the claim), with a 95% interval over the independent units of the
measurement (paired draws, images, units, folds). The verdict is read off the interval, never written by hand:

- ``holds``: the whole interval lies above zero;
- ``reversed``: the whole interval lies below zero (the run shows the opposite);
- ``not shown``: the interval holds zero (the run cannot tell at this sample size).

The intervals are Student's t for a mean (paired differences, per-unit values), Welch's for a difference of two
independent means, Wilson's for a proportion, and a seeded percentile bootstrap for any other statistic.

Over training seeds (:func:`combine`), a claim holds when it holds at every seed, is reversed when it is reversed
at every seed, and is not shown otherwise; the combined entry keeps every seed's contrast and verdict.

``findings.json`` (:func:`write_findings`) holds one entry per claim; each analysis replaces its own entries when
it runs again. The report opens with their table, and ``convscope demo`` ends by printing it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import artifacts
from .errors import ConvscopeError

HOLDS, NOT_SHOWN, REVERSED = "holds", "not shown", "reversed"
VERDICTS = (HOLDS, NOT_SHOWN, REVERSED)
LEVEL = 0.95


@dataclass(frozen=True)
class Contrast:
    """A signed contrast (``> 0`` supports the claim), its 95% interval, the number of independent units behind
    it, and how the interval was computed (``method``, e.g. "t over 10 paired draws; Wilcoxon p = 0.002")."""

    measured: float
    interval: tuple[float, float]
    n: int
    method: str

    @property
    def verdict(self) -> str:
        return verdict(self.interval)


@dataclass(frozen=True)
class Finding:
    """One claim as this run measured it (see the module doc). ``key`` is unique in a run (``table1.fc7.nose``);
    ``analysis`` the key of the analysis that measured it; ``paper`` and ``value`` are the paper's and this run's
    numbers as text; ``contrast`` says what ``measured`` is. ``seeds`` is how many training seeds stand behind the
    verdict, with each one's contrast and verdict in ``per_seed`` and ``seed_verdicts`` when more than one."""

    key: str
    claim: str
    source: str
    analysis: str
    measured: float
    interval: tuple[float, float]
    verdict: str
    contrast: str
    paper: str
    value: str
    n: int
    method: str
    seeds: int = 1
    per_seed: tuple[float, ...] = ()
    seed_verdicts: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["interval"] = [_finite(v) for v in self.interval]
        d["measured"] = _finite(self.measured)
        d["per_seed"], d["seed_verdicts"] = list(self.per_seed), list(self.seed_verdicts)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Finding:
        lo, hi = d["interval"]
        return cls(**{**d, "measured": _float(d["measured"]), "interval": (_float(lo, -math.inf), _float(hi, math.inf)),
                      "per_seed": tuple(_float(v) for v in d.get("per_seed", ())),
                      "seed_verdicts": tuple(d.get("seed_verdicts", ()))})


def finding(key: str, claim: str, source: str, analysis: str, contrast: Contrast, what: str, paper: str,
            value: str) -> Finding:
    """A :class:`Finding` whose verdict is computed from ``contrast``'s interval."""
    return Finding(key=key, claim=claim, source=source, analysis=analysis, measured=float(contrast.measured),
                   interval=(float(contrast.interval[0]), float(contrast.interval[1])), verdict=contrast.verdict,
                   contrast=what, paper=paper, value=value, n=int(contrast.n), method=contrast.method)


def verdict(interval: tuple[float, float]) -> str:
    """``holds`` when the interval lies above zero, ``reversed`` when below, ``not shown`` when it holds zero (or
    is undefined)."""
    lo, hi = interval
    if math.isnan(lo) or math.isnan(hi):
        return NOT_SHOWN
    return HOLDS if lo > 0 else REVERSED if hi < 0 else NOT_SHOWN


# ------------------------------------------------------------------------------------------------ intervals


def _array(values) -> np.ndarray:
    a = np.asarray(values.detach().cpu() if hasattr(values, "detach") else values, dtype=np.float64).ravel()
    if not np.isfinite(a).all():
        raise ConvscopeError("a finding's values must be finite numbers (got NaN or infinity)")
    return a


def mean_contrast(values, null: float = 0.0, unit: str = "values") -> Contrast:
    """``mean(values) - null`` with Student's t interval over the values (``unit`` names them in ``method``)."""
    from scipy import stats

    a = _array(values) - null
    n, m = len(a), float(a.mean()) if len(a) else math.nan
    if n < 2:
        return Contrast(m, (-math.inf, math.inf), n, f"{n} {unit}: no interval")
    sem = float(a.std(ddof=1) / math.sqrt(n))
    lo, hi = (m, m) if sem == 0 else stats.t.interval(LEVEL, n - 1, loc=m, scale=sem)
    return Contrast(m, (float(lo), float(hi)), n, f"t interval over {n} {unit}")


def paired_contrast(a, b, unit: str = "paired draws") -> Contrast:
    """``mean(a - b)`` over pairs, Student's t interval of the paired differences, and Wilcoxon's signed-rank p
    (two-sided) beside it in ``method``."""
    from scipy import stats

    a, b = _array(a), _array(b)
    if a.shape != b.shape:
        raise ConvscopeError(f"paired values differ in number ({len(a)} and {len(b)})")
    c = mean_contrast(a - b, unit=unit)
    d = a - b
    if len(d) >= 2 and np.any(d != 0):
        p = float(stats.wilcoxon(d).pvalue)
        wins = int((d > 0).sum())
        return replace(c, method=f"{c.method}; {wins} of {len(d)} positive, Wilcoxon p = {p:.2g}")
    return c


def difference_contrast(a, b, unit: str = "values") -> Contrast:
    """``mean(a) - mean(b)`` of two independent samples, Welch's t interval."""
    from scipy import stats

    a, b = _array(a), _array(b)
    m = float(a.mean() - b.mean()) if len(a) and len(b) else math.nan
    if len(a) < 2 or len(b) < 2:
        return Contrast(m, (-math.inf, math.inf), min(len(a), len(b)), f"{len(a)} and {len(b)} {unit}: no interval")
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return Contrast(m, (m, m), len(a) + len(b), f"{len(a)} and {len(b)} {unit}, no spread")
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    lo, hi = stats.t.interval(LEVEL, df, loc=m, scale=se)
    return Contrast(m, (float(lo), float(hi)), len(a) + len(b), f"Welch t interval, {len(a)} and {len(b)} {unit}")


def proportion_contrast(hits: int, n: int, null: float, unit: str = "images") -> Contrast:
    """``hits / n - null`` with Wilson's score interval of the proportion."""
    from scipy import stats

    if n < 1:
        return Contrast(math.nan, (-math.inf, math.inf), 0, f"no {unit}")
    ci = stats.binomtest(int(hits), int(n)).proportion_ci(LEVEL, method="wilson")
    return Contrast(hits / n - null, (float(ci.low) - null, float(ci.high) - null), n,
                    f"Wilson interval, {hits} of {n} {unit}")


def bootstrap_contrast(samples: Sequence, statistic: Callable[..., float], unit: str = "values", paired: bool = False,
                       resamples: int = 2000, seed: int = 0) -> Contrast:
    """``statistic(*samples)`` with a seeded percentile bootstrap interval (scipy's), resampling the units of each
    sample (together when ``paired``). ``statistic`` returns the signed contrast."""
    from scipy import stats

    arrays = [_array(s) for s in samples]
    m = float(statistic(*arrays))
    n = min(len(a) for a in arrays)
    if n < 2:
        return Contrast(m, (-math.inf, math.inf), n, f"{n} {unit}: no interval")
    res = stats.bootstrap(arrays, statistic, paired=paired, vectorized=False, n_resamples=resamples,
                          confidence_level=LEVEL, method="percentile", rng=np.random.default_rng(seed))
    lo, hi = res.confidence_interval
    return Contrast(m, (float(lo), float(hi)), n, f"bootstrap interval ({resamples} resamples) over {n} {unit}")


# ------------------------------------------------------------------------------------------------ seeds


def combine(runs: Sequence[Iterable[Finding]]) -> list[Finding]:
    """The findings of several training seeds (one list per seed, in seed order) as one list: per claim measured at
    every seed, the mean contrast, the range over seeds as its interval, each seed's contrast and verdict, and the
    verdict that holds at every seed (``not shown`` where the seeds disagree). Claims missing at a seed are left
    out: a verdict stands on all the seeds or on none."""
    per = [{f.key: f for f in run} for run in runs]
    if not per:
        return []
    out = []
    for key, first in per[0].items():
        if not all(key in p for p in per):
            continue
        fs = [p[key] for p in per]
        measured = [f.measured for f in fs]
        verdicts = [f.verdict for f in fs]
        agreed = verdicts[0] if len(set(verdicts)) == 1 else NOT_SHOWN
        lo, hi = min(measured), max(measured)
        out.append(replace(first, measured=float(np.mean(measured)), interval=(lo, hi), verdict=agreed,
                           value=" | ".join(f.value for f in fs), n=sum(f.n for f in fs),
                           method=f"range over {len(fs)} seeds of: {first.method}", seeds=len(fs),
                           per_seed=tuple(measured), seed_verdicts=tuple(verdicts)))
    return out


# ------------------------------------------------------------------------------------------------ files


def read_findings(path: str | Path) -> list[Finding]:
    """The findings in ``path`` (a run's ``findings.json``); none when it is missing. A damaged file is an error
    that names it: a verdict is never read from half a file."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
        return [Finding.from_dict(d) for d in data["findings"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConvscopeError(f"{path} is damaged ({type(e).__name__}: {e}); run the analyses again to rewrite it, "
                             "or delete it") from None


def write_findings(path: str | Path, findings: Iterable[Finding], replace_analyses: Iterable[str] = ()) -> Path:
    """Merge ``findings`` into ``path``: every earlier entry of an analysis in ``replace_analyses`` (and of the new
    findings' own analyses) is replaced, the others kept. Atomic, like every write of a run."""
    path = Path(path)
    findings = list(findings)
    keys = [f.key for f in findings]
    if len(set(keys)) != len(keys):
        raise ConvscopeError(f"duplicate finding keys: {sorted({k for k in keys if keys.count(k) > 1})}")
    gone = set(replace_analyses) | {f.analysis for f in findings}
    try:
        kept = [f for f in read_findings(path) if f.analysis not in gone]
    except ConvscopeError:
        kept = []  # a damaged file is rewritten whole by the analyses that run next
    merged = kept + findings
    seeds = max((f.seeds for f in merged), default=1)
    return artifacts.write_json(path, {"seeds": seeds, "findings": [f.to_dict() for f in merged]})


# ------------------------------------------------------------------------------------------------ tables


def _num(v: float) -> str:
    if not math.isfinite(v):
        return "-inf" if v < 0 else "inf" if v > 0 else "nan"
    return f"{v:.3g}"


def interval_text(f: Finding) -> str:
    lo, hi = f.interval
    if f.seeds > 1:
        return f"{_num(f.measured)} (seeds {_num(lo)} to {_num(hi)})"
    return f"{_num(f.measured)} [{_num(lo)}, {_num(hi)}]"


def seeds_text(f: Finding) -> str:
    if f.seeds <= 1:
        return "1 seed"
    held = sum(v == f.verdict for v in f.seed_verdicts)
    return f"{f.seeds} seeds ({held} of {f.seeds} {f.verdict})" if f.verdict != NOT_SHOWN else \
        f"{f.seeds} seeds ({', '.join(f.seed_verdicts)})"


def findings_table(findings: Sequence[Finding]) -> str:
    """The findings as a Markdown table: claim, source, paper, this run, contrast with its interval, verdict."""
    lines = ["| claim | source | paper | this run | contrast [95% interval] | verdict |", "|---|---|---|---|---|---|"]
    for f in findings:
        lines.append(f"| {f.claim} | {f.source} | {f.paper} | {f.value} | {interval_text(f)} | {f.verdict}, "
                     f"{seeds_text(f)} |")
    counts = {v: sum(f.verdict == v for f in findings) for v in VERDICTS}
    lines.append("")
    lines.append(", ".join(f"{n} {v}" for v, n in counts.items()) + f" of {len(findings)} claims. A claim holds when "
                 "the 95% interval of its contrast lies above zero (at every seed, over several).")
    return "\n".join(lines) + "\n"


def _finite(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def _float(v, default: float = math.nan) -> float:
    return default if v is None else float(v)


__all__ = ["HOLDS", "NOT_SHOWN", "REVERSED", "VERDICTS", "Contrast", "Finding", "bootstrap_contrast", "combine",
           "difference_contrast", "finding", "findings_table", "mean_contrast", "paired_contrast",
           "proportion_contrast", "read_findings", "verdict", "write_findings"]
