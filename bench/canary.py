"""``make bench-canary``: the canary judge's decisions on simulated candidates, beside a fixed-horizon test.

Terms
-----
- *Events*: each has a true probability ``p ~ Beta(2, 5)`` and a Bernoulli label ``y ~ Bernoulli(p)``.
  A *model* of noise ``s`` predicts ``sigmoid(logit(p) + s * N(0, 1))`` (independent noise per model):
  ``s = 0`` is perfectly calibrated, and its expected log loss grows with ``s``. The champion has
  ``s = S_CHAMPION``.
- *Effect* ``e`` (``--effect``, default 0.02 nats): the candidate's expected per-event log loss minus the
  champion's. Scenarios: ``better`` (-e), ``equal`` (0: same noise, independent draws) and ``worse`` (+e);
  the candidate's noise is found by bisection on a large seeded sample so that its expected log loss is
  the champion's plus the scenario's effect (the figures say what the simulation actually delivered).
- *Modes*: ``shadow`` — both score every event, compared paired (per-event loss difference); ``canary``
  — each event answered by the candidate with probability ``--share`` (default 0.2), else the champion,
  compared unpaired (the judge's two cases).
- *The judge*: :class:`streams.verdict.Judgement` — the very rules and confidence sequence ``tide judge``
  runs (:mod:`streams.sequential`), with ``Canary(margin=--margin, alpha=--alpha, min_labels=
  --min-labels)``, looked at after every ``--look-every`` labels, until it decides or ``--max-labels``
  (then ``inconclusive``, the policy's ``max_duration``). Guardrails are not simulated.
- *Labels*: candidate labels (pairs for a shadow; the candidate's share for a canary).
- *Fixed horizon*: a two-sided z-test on the difference in mean loss at the sample size computed for the
  same ``alpha`` and 80 % power at the stated effect (``n = (z_{1-alpha/2} + z_{0.8})^2 Var / e^2``, with
  the variance from a pilot sample), deciding with the same rule (pass when the interval's upper end is
  below the margin, fail when its lower end is above 0, else inconclusive), looked at once.
- *false_promotion_rate*: share of ``worse`` runs that passed (would be promoted).
- *false_rollback_rate*: share of ``equal`` runs that failed (would be rolled back); goal <= 5 %.
- *power*: share of correct decisions at the stated effect: ``better`` passed and ``worse`` failed.
- *median_labels_to_decide*: median candidate labels at the decision, over all runs that decided.

Top-level figures are the canary mode's (the case the benchmark is named for); ``modes`` holds both,
each with its fixed-horizon counterpart and per-scenario detail. Runs are ``--seeds`` x
``--runs-per-seed`` per scenario and mode, every one seeded. Results go to ``out/bench/canary.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from schemas.policy import Canary
from streams.sequential import PairedSequence, UnpairedSequence
from streams.verdict import CANARY, FAIL, PASS, SHADOW, Judgement

OUT_DIR = Path("out/bench")
RESULT_FILE = OUT_DIR / "canary.json"
S_CHAMPION = 1.0
SCENARIOS = {"better": -1.0, "equal": 0.0, "worse": 1.0}
PILOT = 200_000


def predict(rng: np.random.Generator, p: np.ndarray, noise: float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(np.log(p / (1.0 - p)) + noise * rng.normal(size=p.shape))))


def log_loss(q: np.ndarray, y: np.ndarray) -> np.ndarray:
    q = np.clip(q, 1e-6, 1 - 1e-6)  # the judge's clip (streams.outcomes.EPS)
    return -np.where(y, np.log(q), np.log(1.0 - q))


def events(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    p = rng.beta(2, 5, n)
    return p, rng.random(n) < p


def expected_loss(noise: float) -> float:
    rng = np.random.default_rng(12345)  # common random numbers: the same events for every noise
    p, y = events(rng, PILOT)
    return float(log_loss(predict(rng, p, noise), y).mean())


def noise_for(target: float) -> float:
    """The candidate noise whose expected log loss is ``target`` (bisection; loss grows with noise)."""
    lo, hi = 0.0, 4.0
    for _ in range(30):
        mid = (lo + hi) / 2
        if expected_loss(mid) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def losses(rng: np.random.Generator, n: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-event log losses of the champion and the candidate on the same ``n`` events."""
    p, y = events(rng, n)
    return log_loss(predict(rng, p, S_CHAMPION), y), log_loss(predict(rng, p, noise), y)


def judge_run(
    policy: Canary, mode: str, champion: np.ndarray, candidate: np.ndarray, arm: np.ndarray, look: int
) -> tuple[str, str, int]:
    """One run through the judge's rules: (outcome, rule, candidate labels at the decision)."""
    j = Judgement("sim", mode, 2, policy, started_ms=0)
    step = 0
    total = len(champion)
    while step < total:
        end = min(step + look, total)
        if mode == SHADOW:
            assert isinstance(j.stats, PairedSequence)
            j.stats.update_many(candidate[step:end], champion[step:end])
        else:
            assert isinstance(j.stats, UnpairedSequence)
            mine = arm[step:end]
            j.stats.candidate.update_many(candidate[step:end][mine])
            j.stats.champion.update_many(champion[step:end][~mine])
        j.labelled(0)
        step = end
        timed_out = step >= total
        d = j.decide(10**12 if timed_out else 0, check_guardrails=False)
        if d.final:
            return d.outcome, d.rule, j.stats.n
    return "inconclusive", "max_duration", j.stats.n


def fixed_horizon_n(mode: str, share: float, effect: float, alpha: float, var_b: float, var_c: float) -> int:
    """Candidate labels for a two-sided z-test at ``alpha`` with 80 % power at ``effect``."""
    z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(0.8)
    if mode == SHADOW:
        return math.ceil(z * z * var_c / effect**2)  # var_c: variance of the paired difference here
    total = z * z * (var_c / share + var_b / (1 - share)) / effect**2
    return math.ceil(total * share)


def fixed_run(
    mode: str,
    champion: np.ndarray,
    candidate: np.ndarray,
    arm: np.ndarray,
    n: int,
    alpha: float,
    margin: float,
) -> str:
    z = stats.norm.ppf(1 - alpha / 2)
    if mode == SHADOW:
        d = candidate[:n] - champion[:n]
        est, se = d.mean(), d.std(ddof=1) / math.sqrt(n)
    else:
        cut = int(np.searchsorted(np.cumsum(arm), n)) + 1  # events until the candidate has n labels
        c, b = candidate[:cut][arm[:cut]], champion[:cut][~arm[:cut]]
        est = c.mean() - b.mean()
        se = math.sqrt(c.var(ddof=1) / len(c) + b.var(ddof=1) / len(b))
    if est - z * se > 0:
        return FAIL
    if est + z * se < margin:
        return PASS
    return "inconclusive"


def rate(items: list[bool]) -> float:
    return round(sum(items) / len(items), 4) if items else 0.0


def bench_mode(args: argparse.Namespace, mode: str, noises: dict[str, float]) -> dict[str, Any]:
    policy = Canary(margin=args.margin, alpha=args.alpha, min_labels=args.min_labels, min_duration_s=0)
    share = 1.0 if mode == SHADOW else args.share
    # Pilot variances (worse scenario) for the fixed-horizon size.
    pilot = np.random.default_rng(777)
    b, c = losses(pilot, PILOT, noises["worse"])
    var_c = float((c - b).var()) if mode == SHADOW else float(c.var())
    n_fixed = fixed_horizon_n(mode, share, args.effect, args.alpha, float(b.var()), var_c)
    max_events = math.ceil(args.max_labels / share) + 1
    detail: dict[str, Any] = {}
    for scenario, noise in noises.items():
        outcomes, fixed, decided_at, delivered = [], [], [], []
        for seed in range(args.seeds):
            for r in range(args.runs_per_seed):
                rng = np.random.default_rng([seed, r, SCENARIOS_INDEX[scenario], MODES_INDEX[mode]])
                champion, candidate = losses(rng, max_events, noise)
                arm = np.ones(max_events, bool) if mode == SHADOW else rng.random(max_events) < share
                outcome, _, n = judge_run(policy, mode, champion, candidate, arm, args.look_every)
                outcomes.append(outcome)
                if outcome in (PASS, FAIL):
                    decided_at.append(n)
                fixed.append(fixed_run(mode, champion, candidate, arm, n_fixed, args.alpha, args.margin))
                delivered.append(
                    float(candidate[arm].mean() - champion[~arm if mode == CANARY else arm].mean())
                )
        detail[scenario] = {
            "candidate_noise": round(noise, 4),
            "effect_delivered": round(statistics.fmean(delivered), 5),
            "runs": len(outcomes),
            "pass": rate([o == PASS for o in outcomes]),
            "fail": rate([o == FAIL for o in outcomes]),
            "inconclusive": rate([o not in (PASS, FAIL) for o in outcomes]),
            "median_labels_to_decide": statistics.median(decided_at) if decided_at else None,
            "fixed_horizon": {
                "pass": rate([o == PASS for o in fixed]),
                "fail": rate([o == FAIL for o in fixed]),
                "inconclusive": rate([o not in (PASS, FAIL) for o in fixed]),
            },
            "_decided": decided_at,
        }
    every = [n for s in detail.values() for n in s.pop("_decided")]
    result = {
        "false_promotion_rate": detail["worse"]["pass"],
        "false_rollback_rate": detail["equal"]["fail"],
        "power": round((detail["better"]["pass"] + detail["worse"]["fail"]) / 2, 4),
        "median_labels_to_decide": statistics.median(every) if every else None,
        "fixed_horizon_labels": n_fixed,
        "fixed_horizon": {
            "false_promotion_rate": detail["worse"]["fixed_horizon"]["pass"],
            "false_rollback_rate": detail["equal"]["fixed_horizon"]["fail"],
            "power": round(
                (detail["better"]["fixed_horizon"]["pass"] + detail["worse"]["fixed_horizon"]["fail"]) / 2, 4
            ),
            "labels": n_fixed,
        },
        "scenarios": detail,
    }
    return result


SCENARIOS_INDEX = {name: i for i, name in enumerate(SCENARIOS)}
MODES_INDEX = {CANARY: 0, SHADOW: 1}


def reproduce_command(args: argparse.Namespace) -> str:
    return (
        f"python -m bench.canary --seeds {args.seeds} --runs-per-seed {args.runs_per_seed} "
        f"--effect {args.effect} --margin {args.margin} --alpha {args.alpha} --min-labels {args.min_labels} "
        f"--share {args.share} --max-labels {args.max_labels} --look-every {args.look_every}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.canary", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=10, help="seeds per scenario and mode (default 10)")
    ap.add_argument("--runs-per-seed", type=int, default=20, help="runs per seed (default 20)")
    ap.add_argument("--effect", type=float, default=0.02, help="stated effect, nats of log loss")
    ap.add_argument("--margin", type=float, default=0.01, help="non-inferiority margin (the policy's)")
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--min-labels", type=int, default=200)
    ap.add_argument("--share", type=float, default=0.2, help="the canary's share of events")
    ap.add_argument("--max-labels", type=int, default=40_000, help="candidate labels before max_duration")
    ap.add_argument("--look-every", type=int, default=50, help="labels between two looks (a judge batch)")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    base = expected_loss(S_CHAMPION)
    noises = {name: noise_for(base + sign * args.effect) for name, sign in SCENARIOS.items()}
    noises["equal"] = S_CHAMPION
    modes = {mode: bench_mode(args, mode, noises) for mode in (CANARY, SHADOW)}
    top = modes[CANARY]
    result = {
        "false_promotion_rate": top["false_promotion_rate"],
        "false_rollback_rate": top["false_rollback_rate"],
        "power": top["power"],
        "median_labels_to_decide": top["median_labels_to_decide"],
        "fixed_horizon_labels": top["fixed_horizon_labels"],
        "goal_false_rollback_rate": 0.05,
        "effect": args.effect,
        "margin": args.margin,
        "alpha": args.alpha,
        "champion_expected_log_loss": round(base, 5),
        "modes": modes,
        "command": reproduce_command(args),
        "seconds": round(time.perf_counter() - started, 1),
        "python": sys.version.split()[0],
    }
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    RESULT_FILE.write_text(json.dumps(result, indent=2) + "\n")
    for mode, r in modes.items():
        fh = r["fixed_horizon"]
        print(
            f"{mode:7s} judge: false promotion {r['false_promotion_rate']:.3f}, false rollback "
            f"{r['false_rollback_rate']:.3f}, power {r['power']:.3f}, median labels to decide "
            f"{r['median_labels_to_decide']} | fixed horizon ({fh['labels']} labels): false promotion "
            f"{fh['false_promotion_rate']:.3f}, false rollback {fh['false_rollback_rate']:.3f}, "
            f"power {fh['power']:.3f}"
        )
    print(f"wrote {RESULT_FILE} in {result['seconds']} s; reproduce: {result['command']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
