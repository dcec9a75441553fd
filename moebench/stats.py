"""Statistics for citing a score: binomial error, spread over seeds, paired tests between runs.

Pure functions of numbers (numpy and the standard library only, so the core install needs no
scipy). The choices, and why:

- One run on one set: accuracy p over n items has binomial standard error sqrt(p(1-p)/n).
- Over seeds: mean, sample standard deviation (ddof=1) and a Student-t interval with n-1
  degrees of freedom, because with 3 seeds a normal interval would be far too narrow
  (t_{0.975,2} = 4.30, not 1.96). The t quantile is found by bisection on the t distribution's
  tail, written with the regularised incomplete beta function.
- Two runs on the same items: the per-item differences are resampled together (a paired
  bootstrap), which keeps the strong correlation between two models' verdicts on one item; that
  is why a paired test sees real differences that two independent standard errors hide.
  McNemar's exact test uses only the discordant items: under "no difference" each of them is
  equally likely to favour either run.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Bootstrap resamples are drawn in blocks of about this many item indices, which bounds memory
# (a set of 10,000 items x 10,000 resamples would otherwise need 800 MB of indices at once).
_BLOCK_ELEMENTS = 2_000_000


def binomial_stderr(p: float, n: int) -> float:
    """Standard error of an accuracy `p` measured on `n` independent items."""
    if n < 1:
        raise ValueError(f"n={n} items: a standard error needs at least one.")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"accuracy {p} is not a proportion in [0, 1].")
    return math.sqrt(p * (1.0 - p) / n)


# ---------------------------------------------------------------------------------------------
# Student's t


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b) for a, b > 0 and 0 <= x <= 1.

    Evaluated as its continued fraction (modified Lentz algorithm), which converges quickly for
    x < (a + 1) / (a + b + 2); above that the symmetry I_x(a, b) = 1 - I_{1-x}(b, a) is used.
    """
    if a <= 0 or b <= 0:
        raise ValueError(f"betainc needs a, b > 0, got a={a}, b={b}.")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc needs 0 <= x <= 1, got x={x}.")
    if x == 0.0 or x == 1.0:
        return x
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - betainc(b, a, 1.0 - x)
    log_front = (
        a * math.log(x)
        + b * math.log1p(-x)
        + math.lgamma(a + b)
        - math.lgamma(a)
        - math.lgamma(b)
        - math.log(a)
    )
    return math.exp(log_front) * _beta_fraction(a, b, x)


def _beta_fraction(a: float, b: float, x: float) -> float:
    """1 / (1 + d1 / (1 + d2 / (1 + ...))), the continued fraction of I_x(a, b)."""
    tiny = 1e-300
    f = c = tiny
    d = 0.0
    for j in range(1, 10_000):
        if j == 1:
            coeff = 1.0
        else:
            k = j - 1  # index of d_k
            m = k // 2
            if k % 2:  # d_{2m+1}
                coeff = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
            else:  # d_{2m}
                coeff = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 + coeff * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + coeff / c
        c = c if abs(c) > tiny else tiny
        step = c * d
        f *= step
        if abs(step - 1.0) < 1e-15:
            return f
    raise ArithmeticError(f"betainc({a}, {b}, {x}) did not converge.")


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with `df` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"df={df}: Student's t needs positive degrees of freedom.")
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1.0 - tail


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    return 1.0 - t_sf(t, df)


@functools.lru_cache(maxsize=1024)
def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p, by bisection on the upper tail (no cancellation near p = 1).

    Cached: a leaderboard asks for the same few (level, seeds - 1) pairs thousands of times.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"quantile level p={p} must lie strictly between 0 and 1.")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    if p == 0.5:
        return 0.0
    tail = 1.0 - p
    lo, hi = 0.0, 1.0
    while t_sf(hi, df) > tail:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_sf(mid, df) > tail:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * hi:
            break
    return 0.5 * (lo + hi)


# ---------------------------------------------------------------------------------------------
# Over seeds


@dataclass(frozen=True)
class SeedSummary:
    """Mean over seeds with its spread; `std`/`low`/`high` are None for a single seed."""

    n: int
    mean: float
    std: float | None
    low: float | None
    high: float | None


def summarize_seeds(values: Sequence[float], level: float = 0.95) -> SeedSummary:
    """Mean, sample std (ddof=1) and a `level` Student-t interval for the mean."""
    if not values:
        raise ValueError("summarize_seeds needs at least one value.")
    x = np.asarray(values, dtype=float)
    mean = float(x.mean())
    if x.size == 1:
        return SeedSummary(1, mean, None, None, None)
    std = float(x.std(ddof=1))
    half = t_quantile(0.5 + level / 2.0, x.size - 1) * std / math.sqrt(x.size)
    return SeedSummary(int(x.size), mean, std, mean - half, mean + half)


# ---------------------------------------------------------------------------------------------
# Paired comparison on the same items


def bootstrap_mean_differences(
    diff: np.ndarray, resamples: int, rng: np.random.Generator
) -> np.ndarray:
    """Means of `resamples` bootstrap resamples (items drawn with replacement) of `diff`."""
    diff = np.asarray(diff, dtype=float)
    n = diff.size
    if n == 0:
        raise ValueError("a bootstrap needs at least one item.")
    out = np.empty(resamples)
    rows = max(1, _BLOCK_ELEMENTS // n)
    for start in range(0, resamples, rows):
        stop = min(resamples, start + rows)
        idx = rng.integers(0, n, size=(stop - start, n))
        out[start:stop] = diff[idx].sum(axis=1) / n
    return out


def percentile_interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central `level` interval of a bootstrap distribution (percentile method)."""
    low, high = np.quantile(samples, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(low), float(high)


def bootstrap_p_value(samples: np.ndarray, observed: float) -> float:
    """Two-sided p-value for "the true difference is 0".

    The bootstrap distribution is centred on the observed difference; shifting it to 0 gives the
    null distribution, so p is the share of resamples at least as far from the observed value as
    the observed value is from 0 (Hall & Wilson 1991). The +1s count the observed sample itself,
    so p is never reported as exactly 0 from finitely many resamples.
    """
    samples = np.asarray(samples, dtype=float)
    # A hair of slack so that float noise in equal means does not decide ties.
    extreme = np.abs(samples - observed) >= abs(observed) - 1e-12
    return float((1 + np.count_nonzero(extreme)) / (1 + samples.size))


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p from the discordant counts.

    `a_only`: items only run A got right; `b_only`: only run B. Under "no difference" b_only is
    Binomial(a_only + b_only, 1/2); p = 2 P(X <= min), capped at 1, computed in exact integers.
    """
    if a_only < 0 or b_only < 0:
        raise ValueError(f"discordant counts must be >= 0, got {a_only} and {b_only}.")
    n = a_only + b_only
    if n == 0:
        return 1.0
    k = min(a_only, b_only)
    total, term = 0, 1  # term = C(n, i), updated exactly: C(n, i+1) = C(n, i) (n - i) / (i + 1)
    for i in range(k + 1):
        total += term
        term = term * (n - i) // (i + 1)
    # Divide the exact integers: Python rounds int / int correctly, and 2**n as a float would
    # overflow beyond n = 1023.
    return min(1.0, 2 * total / 2**n)


@dataclass(frozen=True)
class PairedResult:
    """Run B against run A on the same items; `diff` = acc B - acc A."""

    n: int
    acc_a: float
    acc_b: float
    diff: float
    low: float
    high: float
    p_bootstrap: float
    p_mcnemar: float | None  # None where the items are not single right/wrong verdicts
    a_only: int  # A right, B wrong
    b_only: int  # A wrong, B right
    samples: np.ndarray  # the bootstrap differences, kept to build averages over sets


def paired_comparison(
    a: Sequence[bool] | np.ndarray,
    b: Sequence[bool] | np.ndarray,
    *,
    resamples: int = 10_000,
    rng: np.random.Generator | int = 0,
    level: float = 0.95,
) -> PairedResult:
    """Compare per-item correctness of two runs, aligned item by item."""
    va = np.asarray(a, dtype=bool)
    vb = np.asarray(b, dtype=bool)
    if va.shape != vb.shape or va.ndim != 1:
        raise ValueError(
            f"paired verdicts must be two equal 1-d arrays, got {va.shape} and {vb.shape}."
        )
    if resamples < 1:
        raise ValueError(f"resamples={resamples} must be >= 1.")
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    diff = vb.astype(float) - va.astype(float)
    samples = bootstrap_mean_differences(diff, resamples, gen)
    observed = float(diff.mean())
    low, high = percentile_interval(samples, level)
    a_only = int(np.count_nonzero(va & ~vb))
    b_only = int(np.count_nonzero(~va & vb))
    return PairedResult(
        n=int(va.size),
        acc_a=float(va.mean()),
        acc_b=float(vb.mean()),
        diff=observed,
        low=low,
        high=high,
        p_bootstrap=bootstrap_p_value(samples, observed),
        p_mcnemar=mcnemar_exact(a_only, b_only),
        a_only=a_only,
        b_only=b_only,
        samples=samples,
    )


def mean_over_sets(results: Sequence[PairedResult], level: float = 0.95) -> PairedResult:
    """The unweighted mean over sets (how the papers average), from each set's own resamples.

    Items are resampled within each set (a stratified bootstrap), so the average of the sets'
    bootstrap differences, resample by resample, is the bootstrap distribution of the average.
    McNemar's test has no meaning for a mean of proportions, so `p_mcnemar` is None.
    """
    if not results:
        raise ValueError("mean_over_sets needs at least one set.")
    sizes = {r.samples.size for r in results}
    if len(sizes) != 1:
        raise ValueError(f"every set needs the same number of resamples, got {sorted(sizes)}.")
    samples = np.mean([r.samples for r in results], axis=0)
    diff = float(np.mean([r.diff for r in results]))
    low, high = percentile_interval(samples, level)
    return PairedResult(
        n=sum(r.n for r in results),
        acc_a=float(np.mean([r.acc_a for r in results])),
        acc_b=float(np.mean([r.acc_b for r in results])),
        diff=diff,
        low=low,
        high=high,
        p_bootstrap=bootstrap_p_value(samples, diff),
        p_mcnemar=None,
        a_only=sum(r.a_only for r in results),
        b_only=sum(r.b_only for r in results),
        samples=samples,
    )
