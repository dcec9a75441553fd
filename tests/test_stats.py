"""Statistics a researcher can cite: each number checked against an independent computation.

Closed forms (Cauchy and t_2 distribution functions, binomial sums with math.comb), printed table
values, scipy where it is installed, and the normal approximation for large samples. Store-level
helpers and the CLI run on real SQLite stores in tmp_path.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from moebench import stats
from moebench.comparisons import compare_runs, seed_free_config, seed_groups
from moebench.errors import ConfigError, NotFoundError
from moebench.store import Store, add_metrics, add_predictions, create_run, open_store
from tests.test_cli import _one_clean_error, moebench

GEN = "llm-adapters-gen/alpaca/greedy/max32"
LOGLIK = "llm-adapters-loglik/alpaca"
CONFIG: dict[str, Any] = {
    "method": "lora",
    "model": "tiny-llama",
    "suite": "mini",
    "seed": 1,
    "method_config": {"rank": 8},
    "train": {"lr": 3e-4},
    "eval": {"mode": "generate", "num_beams": 1},
}


# ---------------------------------------------------------------------------------------------
# Pure functions


def test_binomial_stderr_by_hand() -> None:
    assert stats.binomial_stderr(0.5, 100) == pytest.approx(0.05)
    # OBQA scale from the docs: n=500 near 75% is about 2 points.
    assert stats.binomial_stderr(0.75, 500) == pytest.approx(math.sqrt(0.1875 / 500))
    assert stats.binomial_stderr(1.0, 7) == 0.0
    with pytest.raises(ValueError, match="n=0"):
        stats.binomial_stderr(0.5, 0)
    with pytest.raises(ValueError, match=r"1\.5"):
        stats.binomial_stderr(1.5, 10)


@pytest.mark.parametrize("x", [0.0, 0.01, 0.3, 0.5, 0.77, 0.999, 1.0])
def test_betainc_closed_forms(x: float) -> None:
    assert stats.betainc(1, 1, x) == pytest.approx(x, abs=1e-14)
    assert stats.betainc(3.5, 1, x) == pytest.approx(x**3.5, abs=1e-14)
    assert stats.betainc(1, 4.2, x) == pytest.approx(1 - (1 - x) ** 4.2, abs=1e-14)
    # I_x(a, b) = 1 - I_{1-x}(b, a), and I_{1/2}(a, a) = 1/2.
    assert stats.betainc(2.5, 7, x) + stats.betainc(7, 2.5, 1 - x) == pytest.approx(1, abs=1e-13)
    assert stats.betainc(6.3, 6.3, 0.5) == pytest.approx(0.5, abs=1e-14)


@pytest.mark.parametrize("t", [-30.0, -2.0, -0.3, 0.0, 0.7, 1.5, 4.0, 100.0])
def test_t_cdf_against_closed_forms(t: float) -> None:
    # df=1 is the Cauchy distribution; df=2 has F(t) = 1/2 + t / (2 sqrt(2 + t^2)).
    assert stats.t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-13)
    assert stats.t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-13)


@pytest.mark.parametrize(
    ("df", "value"),
    [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (9, 2.262), (29, 2.045), (120, 1.980)],
)
def test_t_quantile_matches_printed_tables(df: int, value: float) -> None:
    assert stats.t_quantile(0.975, df) == pytest.approx(value, abs=5e-4)
    assert stats.t_quantile(0.025, df) == pytest.approx(-value, abs=5e-4)


def test_t_quantile_inverts_the_closed_form_cdfs() -> None:
    for p in (0.6, 0.9, 0.975, 0.9995):
        assert stats.t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-10)
        q = 2 * p - 1  # t_2 quantile: q * sqrt(2 / (1 - q^2))
        assert stats.t_quantile(p, 2) == pytest.approx(q * math.sqrt(2 / (1 - q * q)), rel=1e-10)
    assert stats.t_quantile(0.5, 7) == 0.0
    # Many degrees of freedom approach the normal quantile 1.959964.
    assert stats.t_quantile(0.975, 1e7) == pytest.approx(1.959964, abs=1e-6)
    with pytest.raises(ValueError, match="p=1"):
        stats.t_quantile(1.0, 3)


def test_t_quantile_against_scipy() -> None:
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 5, 7.5, 10, 30, 100, 1000):
        for p in (0.001, 0.05, 0.3, 0.7, 0.95, 0.975, 0.995, 0.9999):
            want = scipy_stats.t.ppf(p, df)
            assert stats.t_quantile(p, df) == pytest.approx(want, rel=1e-9), (df, p)
            assert stats.t_cdf(want, df) == pytest.approx(p, rel=1e-10), (df, p)


def test_summarize_seeds_by_hand() -> None:
    values = [0.60, 0.62, 0.67]
    s = stats.summarize_seeds(values)
    sd = statistics.stdev(values)  # ddof=1
    assert s.n == 3
    assert s.mean == pytest.approx(0.63)
    assert s.std == pytest.approx(sd)
    assert sd == pytest.approx(math.sqrt(((0.03**2) + (0.01**2) + (0.04**2)) / 2))
    half = 4.302653 * sd / math.sqrt(3)
    assert (s.low, s.high) == pytest.approx((0.63 - half, 0.63 + half), abs=1e-6)
    one = stats.summarize_seeds([0.5])
    assert (one.n, one.mean, one.std, one.low, one.high) == (1, 0.5, None, None, None)
    five = stats.summarize_seeds([1, 2, 3, 4, 5])
    assert five.high - five.mean == pytest.approx(2.776445 * math.sqrt(2.5) / math.sqrt(5))


def _binomial_two_sided(k_small: int, n: int) -> float:
    """2 P(X <= k_small), X ~ Bin(n, 1/2), summed with math.comb in exact fractions."""
    from fractions import Fraction

    tail = sum(Fraction(math.comb(n, i), 2**n) for i in range(k_small + 1))
    return float(min(Fraction(1), 2 * tail))


@pytest.mark.parametrize(
    ("a_only", "b_only"), [(0, 0), (0, 5), (5, 0), (3, 10), (7, 7), (40, 61), (1400, 1500)]
)
def test_mcnemar_exact_is_a_binomial_sum(a_only: int, b_only: int) -> None:
    want = _binomial_two_sided(min(a_only, b_only), a_only + b_only)
    assert stats.mcnemar_exact(a_only, b_only) == pytest.approx(want, rel=1e-12)


def test_mcnemar_exact_by_hand_and_against_scipy() -> None:
    assert stats.mcnemar_exact(0, 5) == 2 / 32
    assert stats.mcnemar_exact(1, 5) == pytest.approx(2 * (1 + 6) / 64)  # n = 6: C(6,0) + C(6,1)
    assert stats.mcnemar_exact(4, 4) == 1.0
    scipy_stats = pytest.importorskip("scipy.stats")
    for a_only, b_only in ((3, 12), (50, 80), (600, 510)):
        want = scipy_stats.binomtest(b_only, a_only + b_only, 0.5).pvalue
        assert stats.mcnemar_exact(a_only, b_only) == pytest.approx(want, rel=1e-9)


def test_paired_comparison_small_example_by_hand() -> None:
    a = [True, True, False, False, True]
    b = [True, False, True, True, True]
    r = stats.paired_comparison(a, b, resamples=2000, rng=3)
    assert (r.n, r.acc_a, r.acc_b) == (5, 0.6, 0.8)
    assert r.diff == pytest.approx(0.2)
    assert (r.a_only, r.b_only) == (1, 2)
    assert r.p_mcnemar == pytest.approx(1.0)  # 2 * P(X <= 1 | n=3) = 2 * 4/8, capped
    # Every resample mean of 5 items from {0, -1, +1, +1, 0} is a multiple of 1/5 in [-1, 1].
    assert np.allclose(r.samples * 5, np.round(r.samples * 5))
    assert r.samples.min() >= -1 and r.samples.max() <= 1
    assert r.low <= r.diff <= r.high


def test_identical_runs_have_no_difference_and_p_one() -> None:
    v = np.random.default_rng(0).random(300) < 0.6
    r = stats.paired_comparison(v, v, resamples=1000, rng=0)
    assert (r.diff, r.low, r.high, r.a_only, r.b_only) == (0.0, 0.0, 0.0, 0, 0)
    assert r.p_bootstrap == 1.0 and r.p_mcnemar == 1.0


def _correlated_pair(n: int, acc: float, gain: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Run A right with probability `acc`; B equals A except for flips whose expected net
    effect is +`gain` (B = A on most items, as for two adapters of one base model)."""
    g = np.random.default_rng(seed)
    a = g.random(n) < acc
    u = g.random(n)
    b = a.copy()
    lose = 0.05  # P(A right -> B wrong) among A-right items
    win = (gain + acc * lose) / (1 - acc)  # P(A wrong -> B right), so E[b - a] = gain
    b[a & (u < lose)] = False
    b[~a & (u < win)] = True
    return a, b


def test_bootstrap_interval_matches_the_normal_approximation_on_a_large_set() -> None:
    true_gain = 0.02
    a, b = _correlated_pair(20_000, 0.6, true_gain, seed=11)
    r = stats.paired_comparison(a, b, resamples=10_000, rng=5)
    d = b.astype(float) - a.astype(float)
    se = d.std(ddof=0) / math.sqrt(d.size)
    assert r.diff == pytest.approx(d.mean())
    assert r.low < true_gain < r.high
    assert r.low == pytest.approx(d.mean() - 1.959964 * se, abs=0.1 * se)
    assert r.high == pytest.approx(d.mean() + 1.959964 * se, abs=0.1 * se)
    assert r.samples.std() == pytest.approx(se, rel=0.03)
    # Two independent standard errors would give a far wider interval: pairing matters.
    independent = math.sqrt(a.var() / a.size + b.var() / b.size)
    assert (r.high - r.low) < 0.5 * 2 * 1.96 * independent


def test_p_values_small_for_a_clear_winner_and_large_for_noise() -> None:
    a, b = _correlated_pair(2000, 0.5, 0.08, seed=1)
    clear = stats.paired_comparison(a, b, resamples=5000, rng=0)
    assert clear.low > 0
    assert clear.p_bootstrap == pytest.approx(1 / 5001)  # no resample as far out as 0
    assert clear.p_mcnemar is not None and clear.p_mcnemar < 1e-8
    # Swapped roles: the same evidence the other way round.
    swapped = stats.paired_comparison(b, a, resamples=5000, rng=0)
    assert swapped.high < 0 and swapped.p_mcnemar == clear.p_mcnemar
    a, b = _correlated_pair(2000, 0.5, 0.0, seed=2)
    noise = stats.paired_comparison(a, b, resamples=5000, rng=0)
    assert noise.low < 0 < noise.high
    assert noise.p_bootstrap > 0.2 and noise.p_mcnemar is not None and noise.p_mcnemar > 0.2


def test_bootstrap_is_seeded_and_blocks_cover_every_resample(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b = _correlated_pair(500, 0.6, 0.03, seed=4)
    first = stats.paired_comparison(a, b, resamples=3000, rng=9)
    again = stats.paired_comparison(a, b, resamples=3000, rng=9)
    other = stats.paired_comparison(a, b, resamples=3000, rng=10)
    assert np.array_equal(first.samples, again.samples)
    assert not np.array_equal(first.samples, other.samples)
    # Blocks of 2 resamples with 5 left over: every slot is filled with a real resample mean.
    monkeypatch.setattr(stats, "_BLOCK_ELEMENTS", 7)
    d = np.array([1.0, 0.0, -1.0])
    samples = stats.bootstrap_mean_differences(d, 5, np.random.default_rng(0))
    assert samples.shape == (5,)
    assert np.allclose(samples * 3, np.round(samples * 3)) and np.all(np.abs(samples) <= 1)
    ones = stats.bootstrap_mean_differences(np.ones(4), 9, np.random.default_rng(0))
    assert np.array_equal(ones, np.ones(9))


def test_mean_over_sets_resamples_within_each_set() -> None:
    a1, b1 = _correlated_pair(3000, 0.7, 0.04, seed=20)
    a2, b2 = _correlated_pair(800, 0.4, -0.01, seed=21)
    r1 = stats.paired_comparison(a1, b1, resamples=8000, rng=1)
    r2 = stats.paired_comparison(a2, b2, resamples=8000, rng=2)
    avg = stats.mean_over_sets([r1, r2])
    assert avg.diff == pytest.approx((r1.diff + r2.diff) / 2)
    assert avg.acc_a == pytest.approx((a1.mean() + a2.mean()) / 2)
    assert (avg.n, avg.a_only, avg.b_only) == (3800, r1.a_only + r2.a_only, r1.b_only + r2.b_only)
    assert avg.p_mcnemar is None
    # Var of a mean of two independent set differences: (var1 / n1 + var2 / n2) / 4.
    d1, d2 = b1.astype(float) - a1, b2.astype(float) - a2
    se = math.sqrt(d1.var() / d1.size + d2.var() / d2.size) / 2
    assert avg.samples.std() == pytest.approx(se, rel=0.04)
    assert avg.low == pytest.approx(avg.diff - 1.959964 * se, abs=0.12 * se)


# ---------------------------------------------------------------------------------------------
# On a store


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return open_store(f"sqlite:///{tmp_path / 'stats.db'}")


def _run(store: Store, seed: int = 1, **config: Any) -> int:
    cfg = {**CONFIG, "seed": seed, **config}
    return create_run(
        store,
        method=cfg["method"],
        model=cfg["model"],
        suite=cfg["suite"],
        config=cfg,
        config_hash=f"{seed:064x}",
        seed=seed,
        versions={},
        git_sha=None,
        hardware={},
        output_dir=None,
        status="done",
    )


def _predict(
    store: Store,
    run_id: int,
    task: str,
    correct: list[bool],
    protocol: str = GEN,
    start: int = 0,
    prompt: str = "q",
) -> None:
    add_predictions(
        store,
        run_id,
        [
            {
                "task": task,
                "item_id": f"{task}/{start + i}",
                "prompt_hash": f"{prompt}{start + i}",
                "output": "",
                "extracted": None,
                "gold": "true",
                "correct": c,
                "parse_failed": False,
                "protocol": protocol,
            }
            for i, c in enumerate(correct)
        ],
    )


T, F = True, False


def test_compare_runs_pairs_items_and_names_the_flips(store: Store) -> None:
    a, b = _run(store), _run(store, seed=2)
    # boolq: ids 0..11 in A, 2..13 in B: ids 2..11 are shared.
    a_shared = [T, T, F, F, T, T, F, T, F, T]
    b_shared = [T, F, T, T, T, F, T, T, T, T]
    _predict(store, a, "boolq", [T, F, *a_shared])
    _predict(store, b, "boolq", [*b_shared, F, F], start=2)
    # piqa: generation in A, log-likelihood in B: not comparable.
    _predict(store, a, "piqa", [T, T, F])
    _predict(store, b, "piqa", [T, F, F], protocol=LOGLIK)
    # hellaswag: same protocol; item 3's prompt differs between the runs, so it is not paired.
    _predict(store, a, "hellaswag", [F, F, T, T])
    _predict(store, b, "hellaswag", [T, T, T])
    _predict(store, b, "hellaswag", [F], start=3, prompt="other")
    # winogrande only in run A.
    _predict(store, a, "winogrande", [T])

    c = compare_runs(store, a, b, resamples=2000, seed=0)
    by_task = {s.task: s for s in c.sets}
    assert sorted(by_task) == ["boolq", "hellaswag"]

    boolq = by_task["boolq"]
    assert boolq.result.n == 10
    assert boolq.result.acc_a == pytest.approx(sum(a_shared) / 10)
    assert boolq.result.acc_b == pytest.approx(sum(b_shared) / 10)
    assert boolq.a_only_ids == ["boolq/3", "boolq/7"]
    assert boolq.b_only_ids == ["boolq/4", "boolq/5", "boolq/8", "boolq/10"]
    assert boolq.result.p_mcnemar == pytest.approx(_binomial_two_sided(2, 6))

    hs = by_task["hellaswag"]
    assert (hs.result.n, hs.mismatched) == (3, 1)
    assert hs.b_only_ids == ["hellaswag/0", "hellaswag/1"]

    skipped = dict(c.skipped)
    assert skipped["piqa"] == (
        f"scored under different protocols (run {a}: {GEN}; run {b}: {LOGLIK})"
    )
    assert skipped["winogrande"] == f"only run {a} scored it"

    # boolq and hellaswag are both commonsense: their unweighted mean, bootstrapped per set.
    (avg,) = c.averages
    assert avg.name == "commonsense_avg" and avg.sets == ("boolq", "hellaswag")
    assert avg.result.diff == pytest.approx((boolq.result.diff + hs.result.diff) / 2)

    # A set's resamples do not depend on which other sets were selected.
    only = compare_runs(store, a, b, tasks=["boolq"], resamples=2000, seed=0)
    assert np.array_equal(only.sets[0].result.samples, boolq.result.samples)
    assert only.averages == []


def test_compare_runs_refuses_what_cannot_be_compared(store: Store) -> None:
    a, b = _run(store), _run(store, seed=2)
    _predict(store, a, "piqa", [T, F])
    _predict(store, b, "piqa", [T, T], protocol=LOGLIK)
    with pytest.raises(ConfigError, match="no item scored under the same protocol") as info:
        compare_runs(store, a, b)
    assert LOGLIK in str(info.value) and "piqa" in str(info.value)
    with pytest.raises(NotFoundError, match="No run with id 99"):
        compare_runs(store, a, 99)
    with pytest.raises(ConfigError, match="'boolq'; they have: piqa"):
        compare_runs(store, a, b, tasks=["boolq"])
    with pytest.raises(ConfigError, match="'commonsense_avg' is an average over sets"):
        compare_runs(store, a, b, tasks=["commonsense_avg"])
    with pytest.raises(ConfigError, match="--resamples 10 "):
        compare_runs(store, a, b, resamples=10)
    empty = _run(store, seed=3)
    with pytest.raises(ConfigError, match=f"Run {empty} has no stored per-item predictions"):
        compare_runs(store, a, empty)
    with pytest.raises(ConfigError, match=f"piqa: only run {a} scored it"):
        compare_runs(store, a, empty, tasks=["piqa"])


def _metrics(store: Store, run_id: int, boolq: float, n: int = 200) -> None:
    add_metrics(
        store,
        run_id,
        [
            {"task": "boolq", "metric": "accuracy", "value": boolq, "n": n, "protocol": GEN,
             "stderr": stats.binomial_stderr(boolq, n)},
            {"task": "boolq", "metric": "parse_failure_rate", "value": 0.1, "n": n,
             "protocol": GEN},
            {"task": "commonsense_avg", "metric": "accuracy", "value": boolq, "n": 1,
             "protocol": "unweighted-mean-over-sets"},
        ],
    )  # fmt: skip


def test_seed_free_config_ignores_seed_and_execution_settings() -> None:
    base = seed_free_config(CONFIG, "x")
    assert seed_free_config({**CONFIG, "seed": 7}, "x") == base
    execution = {**CONFIG, "train": {**CONFIG.get("train", {}), "checkpoint_every": 3}}
    assert seed_free_config(execution, "x") == base
    assert seed_free_config({**CONFIG, "train": {"lr": 1e-4}}, "x") != base
    # other data files or rows: not a seed of the same run
    assert seed_free_config(CONFIG, "y") != base


def test_seed_groups_summarise_each_set_over_seeds(store: Store) -> None:
    runs = {}
    for seed, acc in ((1, 0.60), (2, 0.62), (3, 0.67)):
        runs[seed] = _run(store, seed=seed)
        _metrics(store, runs[seed], acc)
    # A newer run of seed 2 repeats a seed: it is counted, the older one is listed as a repeat.
    repeat = _run(store, seed=2)
    _metrics(store, repeat, 0.62)
    other = _run(store, seed=1, train={"lr": 1e-4})  # a different config: its own group
    _metrics(store, other, 0.9)
    failed = _run(store, seed=4)
    _metrics(store, failed, 0.1)
    from moebench.store import set_status

    set_status(store, failed, "failed", "boom")

    (group,) = seed_groups(store)  # `other` has one seed: below min_seeds=2
    assert group.seeds == (1, 2, 3)
    assert group.runs == (runs[1], repeat, runs[3])
    assert group.repeats == (runs[2],)
    boolq, avg = group.sets
    assert (boolq.task, boolq.metric, boolq.protocol) == ("boolq", "accuracy", GEN)
    values = [0.60, 0.62, 0.67]
    sd = statistics.stdev(values)
    assert boolq.values == tuple(values)
    assert boolq.summary.mean == pytest.approx(0.63)
    assert boolq.summary.std == pytest.approx(sd)
    assert boolq.summary.high == pytest.approx(0.63 + 4.302653 * sd / math.sqrt(3), abs=1e-6)
    assert boolq.binomial_se == pytest.approx(math.sqrt(0.63 * 0.37 / 200))
    assert avg.task == "commonsense_avg" and avg.binomial_se is None

    assert len(seed_groups(store, min_seeds=1)) == 2
    assert seed_groups(store, method="loramoe") == []
    assert seed_groups(store, suite="other-suite") == []


# ---------------------------------------------------------------------------------------------
# CLI


def test_compare_and_summary_commands(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'cli.db'}"
    s = open_store(db)
    a, b = _run(s), _run(s, seed=2)
    _predict(s, a, "boolq", [T, T, F, F, T, T, F, T, F, T])
    _predict(s, b, "boolq", [T, F, T, T, T, F, T, T, T, T])
    _predict(s, a, "piqa", [T, F])
    _predict(s, b, "piqa", [T, T], protocol=LOGLIK)
    for run_id, acc in ((a, 0.6), (b, 0.8)):
        _metrics(s, run_id, acc)

    r = moebench("compare", str(a), str(b), "--db", db, "--resamples", "500", "--flips", "1",
                 cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = r.stdout
    boolq_row = next(line for line in out.splitlines() if line.lstrip("│ ").startswith("boolq"))
    cells = [c.strip() for c in boolq_row.strip("│ ").split("│")]
    assert cells[:4] == ["boolq", "10", "60.00 ± 15.49", "80.00 ± 12.65"]
    assert cells[4] == "+20.00"
    assert cells[7] == f"{_binomial_two_sided(2, 6):.3f}"
    assert cells[8:10] == ["2", "4"]
    assert "boolq, A right, B wrong (2): boolq/1 (+1 more)" in out
    assert "boolq, A wrong, B right (4): boolq/2 (+3 more)" in out
    assert f"not compared: piqa: scored under different protocols (run {a}: {GEN}; run {b}: " in out

    _one_clean_error(moebench("compare", str(a), "99", "--db", db, cwd=tmp_path),
                     "No run with id 99")  # fmt: skip
    _one_clean_error(
        moebench("compare", str(a), str(b), "--task", "piqa", "--db", db, cwd=tmp_path),
        f"Runs {a} and {b} have no item scored under the same protocol",
        "piqa: scored under different protocols",
    )
    _one_clean_error(moebench("compare", str(a), str(b), "--flips", "-1", "--db", db,
                              cwd=tmp_path), "--flips -1")  # fmt: skip

    r = moebench("runs", "summary", "--db", db, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    sd = statistics.stdev([0.6, 0.8])
    half = 12.706205 * sd / math.sqrt(2)
    assert f"runs {a}, {b} (seeds 1, 2)" in r.stdout
    assert f"[{100 * (0.7 - half):.2f}, {100 * (0.7 + half):.2f}]" in r.stdout
    assert f"{100 * sd:.2f}" in r.stdout
    r = moebench("runs", "summary", "--method", "loramoe", "--db", db, cwd=tmp_path)
    assert r.returncode == 0 and "No 2 or more finished runs" in r.stdout
