"""The speculation policy: K per request from acceptance and measured cost."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vllm_longspec.speculation.cost import CostModel, CostPrior
from vllm_longspec.speculation.policy import (
    DRAFT,
    LOOKUP,
    LOOKUP_MATCH_CLASSES,
    Acceptance,
    PolicyConfig,
    Request,
    SpeculationPolicy,
    acceptance_key,
    lookup_match_class,
    static_schedule,
)

CHEAP = CostPrior(fixed_ms=40.0, per_token_ms=0.01, draft_fixed_ms=1.0)
# verification compute-bound: every verified token costs 5 ms
EXPENSIVE = CostPrior(fixed_ms=40.0, per_token_ms=5.0, draft_fixed_ms=3.25)


def fixed_rates(acceptance: float, **kwargs) -> PolicyConfig:
    """Acceptance pinned at the prior (its weight swamps any observation)."""
    return PolicyConfig(draft_prior=acceptance,
                        lookup_priors=((acceptance,) * 2,) * len(LOOKUP_MATCH_CLASSES),
                        population_prior_weight=1e12, prior_weight=1e12, **kwargs)


def requests(batch: int, lookup_tokens: int = 0) -> list[Request]:
    return [Request(f"r{i}", 4096, lookup_tokens) for i in range(batch)]


def test_the_docstring_worked_example():
    plan = SpeculationPolicy(fixed_rates(0.7)).plan(requests(1))
    assert plan.num_tokens == (4,) and plan.draft_steps == 4
    assert plan.expected_tokens == pytest.approx(2.7731)
    assert plan.expected_ms == pytest.approx(66.4)
    assert plan.plain_ms == pytest.approx(44.4)
    lookup = SpeculationPolicy(fixed_rates(0.7)).plan(requests(1, lookup_tokens=4))
    assert lookup.num_tokens == (4,) and lookup.draft_steps == 0
    assert lookup.expected_ms == pytest.approx(53.4)
    low = SpeculationPolicy(fixed_rates(0.1)).plan(requests(1))
    assert low.num_tokens == (0,) and low.draft_steps == 0 and not low.speculates


@pytest.mark.parametrize("seed", range(40))
def test_the_best_plan_is_the_best_of_every_assignment(seed):
    """The sorted-gains search equals brute force over every (K_r) assignment."""
    rng = np.random.default_rng(seed)
    batch, k_max = int(rng.integers(1, 4)), 3
    prior = CostPrior(fixed_ms=40.0, per_token_ms=float(rng.uniform(0.05, 12.0)),
                      draft_fixed_ms=float(rng.uniform(0.1, 8.0)))
    policy = SpeculationPolicy(PolicyConfig(k_max=k_max), CostModel(prior))
    lookup = [int(rng.choice([0, 0, 1, 2, 3])) for _ in range(batch)]
    batch_requests = [Request(f"r{i}", 4096, n) for i, n in enumerate(lookup)]
    sources = [LOOKUP if n else DRAFT for n in lookup]
    for request, source in zip(batch_requests, sources, strict=True):
        for _ in range(int(rng.integers(0, 12))):   # acceptance differing per request
            proposed = int(rng.integers(1, k_max + 1))
            accepted = proposed if rng.random() < 0.5 else int(rng.integers(0, proposed))
            policy.observe(request.request_id, source, proposed, accepted)
    keys = [acceptance_key(source, 0) for source in sources]
    gains = np.cumprod(policy._rates([r.request_id for r in batch_requests], keys), axis=1)
    limits = [min(n, k_max) if n else k_max for n in lookup]
    gains[np.arange(k_max) >= np.array(limits)[:, None]] = 0.0
    is_lookup = np.array([n > 0 for n in lookup])
    drafting = sources.count(DRAFT)
    best = policy._best_speculative(gains, is_lookup, 4096.0, drafting)
    speeds = []
    for assignment in np.ndindex(*(limit + 1 for limit in limits)):
        if any(assignment):
            plan = policy._priced(list(assignment), gains, is_lookup, 4096.0, drafting)
            speeds.append(plan.tokens / plan.ms)
    assert best.tokens / best.ms == pytest.approx(max(speeds), rel=1e-12)


def test_zero_when_observed_acceptance_is_low():
    policy = SpeculationPolicy(PolicyConfig(probe_interval=1000, max_probe_interval=1000),
                               CostModel(CHEAP))
    assert policy.plan(requests(2)).num_tokens == (4, 4)  # prior 0.5, cheap: speculate
    for _ in range(50):
        for request in requests(2):
            policy.observe(request.request_id, DRAFT, proposed=4, accepted=0)
    plan = policy.plan(requests(2))
    assert plan.num_tokens == (0, 0) and plan.draft_steps == 0


def test_zero_at_large_batch_when_verification_is_expensive():
    # the same acceptance pays at batch 1 and loses at batch 64
    assert SpeculationPolicy(fixed_rates(0.8), CostModel(EXPENSIVE)).plan(
        requests(1)).speculates
    plan = SpeculationPolicy(fixed_rates(0.8), CostModel(EXPENSIVE)).plan(requests(64))
    assert plan.num_tokens == (0,) * 64 and plan.draft_steps == 0


def test_k_max_when_acceptance_is_high_and_verification_cheap():
    policy = SpeculationPolicy(PolicyConfig(k_max=6), CostModel(CHEAP))
    for _ in range(30):
        for request in requests(8):
            policy.observe(request.request_id, DRAFT, proposed=6, accepted=6)
    plan = policy.plan(requests(8))
    assert plan.num_tokens == (6,) * 8 and plan.draft_steps == 6


def test_an_expensive_draft_step_shortens_the_chain():
    # docstring prior but a 20 ms draft step: K = 1 gives 1.7 / 66.65 ms = 25.5 tok/s,
    # K = 2 2.19 / 88.9 ms = 24.6, plain 22.5; a lookup chain pays no draft step
    slow_draft = CostModel(CostPrior(draft_fixed_ms=20.0))
    assert SpeculationPolicy(fixed_rates(0.7), slow_draft).plan(
        requests(1)).num_tokens == (1,)
    assert SpeculationPolicy(fixed_rates(0.7), slow_draft).plan(
        requests(1, lookup_tokens=4)).num_tokens == (4,)


def test_lookup_requests_need_no_draft_forward():
    policy = SpeculationPolicy(fixed_rates(0.9), CostModel(CHEAP))
    plan = policy.plan(requests(3, lookup_tokens=2))
    assert plan.num_tokens == (2, 2, 2)  # capped by the lookup's proposal
    assert plan.draft_steps == 0 and plan.sources == (LOOKUP,) * 3


def run_until_speculating(policy: SpeculationPolicy, acceptance: int, steps: int) -> int:
    """Steps (1-based) until a plan speculates, feeding back ``acceptance`` of each."""
    for step in range(1, steps + 1):
        plan = policy.plan(requests(1))
        if plan.speculates:
            k = plan.num_tokens[0]
            policy.observe("r0", DRAFT, k, min(k, acceptance))
            if not plan.probe:
                return step
    return 0


def test_a_request_at_zero_is_probed_and_recovers():
    policy = SpeculationPolicy(PolicyConfig(probe_interval=4), CostModel(CHEAP))
    for _ in range(40):
        policy.observe("r0", DRAFT, proposed=4, accepted=0)
    # acceptance stays 0: probes are spaced out, interval 4, 8, 16, ...
    probes = [policy.plan(requests(1)).probe for _ in range(60)]
    assert [i + 1 for i, p in enumerate(probes) if p] == [4, 12, 28, 60]
    # the draft improves: a probe sees it and speculation resumes for good
    step = run_until_speculating(policy, acceptance=4, steps=200)
    assert 0 < step <= 128
    plans = [policy.plan(requests(1)) for _ in range(3)]
    assert all(p.speculates and not p.probe for p in plans)


def test_without_probes_a_request_at_zero_never_recovers():
    config = PolicyConfig(probe_interval=10_000, max_probe_interval=10_000)
    policy = SpeculationPolicy(config, CostModel(CHEAP))
    for _ in range(40):
        policy.observe("r0", DRAFT, proposed=4, accepted=0)
    assert run_until_speculating(policy, acceptance=4, steps=300) == 0


def test_a_starved_request_gets_one_token_while_others_draft():
    # a verified token costs 2 ms: worth it for r1 (accepts all), not for r0 (none)
    cost = CostModel(CostPrior(fixed_ms=40.0, per_token_ms=2.0, draft_fixed_ms=1.0))
    policy = SpeculationPolicy(PolicyConfig(probe_interval=3), cost)
    for _ in range(40):
        policy.observe("r0", DRAFT, 4, 0)
        policy.observe("r1", DRAFT, 4, 4)
    ks = [policy.plan(requests(2)).num_tokens for _ in range(8)]
    assert all(k[1] == 4 for k in ks)
    assert [k[0] for k in ks] == [0, 0, 0, 1, 0, 0, 0, 0]  # streak 3, then interval 6


def test_hysteresis_keeps_the_current_mode_near_break_even():
    # acceptance 0.2 beats plain by 6.8% (docstring prior): between the margins
    config = fixed_rates(0.2, enter_margin=0.10, stay_margin=0.0)
    assert not SpeculationPolicy(config).plan(requests(1)).speculates
    speculating = SpeculationPolicy(config)
    speculating._speculating = True
    assert speculating.plan(requests(1)).num_tokens == (1,)


def test_empty_statistics_and_empty_batches_are_finite():
    policy = SpeculationPolicy()
    empty = policy.plan([])
    assert empty.num_tokens == () and empty.draft_steps == 0
    assert np.allclose(policy.rates("unknown", DRAFT), 0.5)
    plan = policy.plan(requests(4) + requests(1, lookup_tokens=3))
    assert all(math.isfinite(v) for v in (plan.expected_tokens, plan.expected_ms))
    counts = Acceptance(4)
    assert np.array_equal(counts.rates(np.full(4, 0.3), 1.0), np.full(4, 0.3))
    policy.observe("r0", DRAFT, proposed=0, accepted=0)  # nothing proposed: no-op
    policy.remove_request("r0")
    policy.remove_request("never-seen")
    with pytest.raises(ValueError):
        policy.observe("r0", DRAFT, proposed=2, accepted=3)
    with pytest.raises(ValueError):
        PolicyConfig(prior_weight=0.0)
    with pytest.raises(ValueError, match="one value per match class"):
        PolicyConfig(lookup_priors=((0.5, 0.5),))


def test_match_lengths_fall_into_their_classes():
    assert [lookup_match_class(m) for m in (0, 1, 2, 3, 4, 7, 8, 40)] == \
        [0, 1, 2, 3, 4, 4, 5, 5]
    assert LOOKUP_MATCH_CLASSES[lookup_match_class(6)] == 4


def test_long_matches_accepted_elsewhere_do_not_vouch_for_a_short_one():
    """Code prompts teach the population that 8-token matches are accepted;
    a new request's 1-token match is still priced at its own class's rate, and
    where an extra token costs 30 ms on a 70 ms step (break-even acceptance
    0.43) it is not worth verifying (pooled, it was: 0.89)."""
    policy = SpeculationPolicy(cost=CostModel(CostPrior(fixed_ms=40.0, per_token_ms=30.0,
                                                        draft_fixed_ms=3.25)))
    for i in range(200):
        policy.observe(f"code{i % 8}", LOOKUP, 4, 4, match_len=8)
    assert policy.rates("qa", LOOKUP, match_len=8)[0] > 0.9
    short = policy.rates("qa", LOOKUP, match_len=1)
    assert np.allclose(short, [0.25, 0.75, 0.75, 0.75])  # LOOKUP_PRIORS[1]
    assert policy.plan([Request("qa", 4096, 4, lookup_match=1)]).num_tokens == (0,)
    assert policy.plan([Request("code0", 4096, 4, lookup_match=8)]).num_tokens == (4,)
    # a request's own evidence counts in its class only
    for _ in range(6):
        policy.observe("qa", LOOKUP, 4, 0, match_len=2)
    assert policy.rates("qa", LOOKUP, match_len=2)[0] < 0.2
    assert np.allclose(policy.rates("qa", LOOKUP, match_len=1), short)


def test_acceptance_counts_follow_the_first_rejection():
    counts = Acceptance(4)
    counts.observe(proposed=4, accepted=1, decay=1.0)   # tried 1, 2; accepted 1
    counts.observe(proposed=2, accepted=2, decay=1.0)   # tried 1, 2; accepted 1, 2
    assert counts.tried.tolist() == [2, 2, 0, 0]
    assert counts.accepted.tolist() == [2, 1, 0, 0]
    counts.observe(proposed=4, accepted=0, decay=0.5)
    assert counts.tried.tolist() == [2, 1, 0, 0]
    assert counts.accepted.tolist() == [1, 0.5, 0, 0]


def test_cost_model_learns_a_correction_line_per_cell():
    model = CostModel(CostPrior(fixed_ms=10.0, per_token_ms=1.0))
    assert model.target_ms(8, 8, 4096) == pytest.approx(18.0)
    for _ in range(100):
        model.observe_target(8, 8, 4096, 36.0)               # plain steps: 18 ms over
    assert model.target_ms(8, 8, 4096) == pytest.approx(36.0, rel=0.02)
    # 32 extra tokens never measured: the level carries over, the prior's 1 ms per
    # extra token stands (a factor would have doubled it)
    assert model.target_ms(40, 8, 4096) == pytest.approx(68.0, rel=0.02)
    for _ in range(100):
        model.observe_target(40, 8, 4096, 50.0)              # measured: the prior's
        model.observe_target(8, 8, 4096, 36.0)
    # the slope's ridge keeps a little of the level: within 10%
    assert model.target_ms(40, 8, 4096) == pytest.approx(50.0, rel=0.1)
    assert model.target_ms(8, 8, 4096) == pytest.approx(36.0, rel=0.1)
    assert model.target_ms(8, 1, 4096) == pytest.approx(18.0)    # other batch bucket
    assert model.target_ms(8, 8, 512) == pytest.approx(18.0)     # other context bucket
    curve = model.target_ms(np.array([8, 16, 40]), 8, 4096)
    assert curve.shape == (3,)
    # fitted: 18 ms over the prior at 0 extra tokens, about 0 at 32
    assert np.all(np.diff(model.correction_ms(np.array([8, 16, 40]), 8, 4096)) < 0)
    for _ in range(200):
        model.observe_target(8, 8, 4096, 1.0)                # never below 10% of the prior
    assert model.target_ms(8, 8, 4096) >= 0.1 * 18.0
    model.observe_draft_step(8, 6.5)
    assert model.draft_step_ms(8) == pytest.approx(6.5)
    assert model.draft_step_ms(1) == pytest.approx(3.25)


def test_extra_tokens_at_batch_8_keep_their_marginal_cost():
    """Measured (VLLM_LONGSPEC_POLICY_TRACE, batch 8, 4k, bfloat16): plain steps
    44.5 ms, now and then K = 1 for all eight 64.4 ms. Under the default prior
    the line must price the rare step right, not scale its cost with the
    plain steps' level (a factor gave 58 ms: 10% cheap)."""
    model = CostModel()
    for step in range(240):
        model.observe_target(8, 8, 4096, 44.5)
        if step % 48 == 47:
            model.observe_target(16, 8, 4096, 64.4)
    assert model.target_ms(8, 8, 4096) == pytest.approx(44.5, rel=0.03)
    assert model.target_ms(16, 8, 4096) == pytest.approx(64.4, rel=0.05)


def test_leaving_plain_decoding_costs_a_jump():
    """Batch 1, 7k (measured with VLLM_LONGSPEC_POLICY_TRACE): one token 54 ms,
    two 66, then about 4 ms per token. Mostly speculative steps, a few plain:
    both the plain step and the first extra token must be priced right (a line
    without the jump put the plain step 8 ms high and the jump 14 ms low), and
    lookup tokens accepted at 0.2 must not be verified."""
    rng = np.random.default_rng(0)
    truth = {0: 54.0, 1: 66.0, 2: 70.0, 3: 74.0, 4: 78.0}
    policy = SpeculationPolicy()
    for _ in range(300):
        extra = 0 if rng.random() < 0.15 else int(rng.integers(1, 5))
        policy.observe_step(1 + extra, 1, 7000, truth[extra] * rng.normal(1, 0.03))
    for extra, ms in truth.items():
        assert policy.cost.target_ms(1 + extra, 1, 7000) == pytest.approx(ms, rel=0.04)
    for _ in range(50):
        policy.observe("r", LOOKUP, 4, int(rng.random() < 0.2))
    plan = policy.plan([Request("r", 7000, 4)])
    assert plan.num_tokens == (0,)
    # with the prior alone (no steps measured) the same request would speculate
    assert SpeculationPolicy(fixed_rates(0.2)).plan([Request("r", 7000, 4)]).speculates


def test_one_stall_moves_the_cost_by_a_bounded_step():
    model = CostModel(CostPrior(fixed_ms=10.0, per_token_ms=1.0), max_jump=0.3)
    for _ in range(50):
        model.observe_target(1, 1, 4096, 11.0)
    before = model.target_ms(1, 1, 4096)
    model.observe_target(1, 1, 4096, 1100.0)                 # 100x: a stall
    assert before < model.target_ms(1, 1, 4096) < before * math.exp(0.3)


def test_noisy_step_times_do_not_price_the_best_k_out():
    """Lookup chains accepted at 0.74 0.9 0.93 0.95 (lookup_rule.md) under the
    default prior: K = 4 is 14% faster than K = 3. Step times with a 30% spread
    (a loaded VM) must not keep the policy away from it (a table of separate
    corrections per q chose K = 3 in 45% of these steps)."""
    rng = np.random.default_rng(0)
    conditional = [0.74, 0.9, 0.93, 0.95]
    prior, chosen = CostPrior(), []
    for _ in range(10):
        policy = SpeculationPolicy()
        for _ in range(300):
            k = policy.plan([Request("r", 4000, 4)]).num_tokens[0]
            chosen.append(k)
            accepted = 0
            while accepted < k and rng.random() < conditional[accepted]:
                accepted += 1
            policy.observe("r", LOOKUP, k, accepted)
            policy.observe_step(1 + k, 1, 4000,
                                prior.target_ms(1 + k, 1, 4000) * math.exp(rng.normal(0, 0.3)))
    assert np.mean(np.array(chosen) == 4) > 0.95


def test_cost_prior_fit_recovers_a_linear_cost():
    truth = CostPrior(fixed_ms=12.0, per_token_ms=0.5, per_kv_token_ms=1e-4,
                      draft_fixed_ms=2.0, draft_per_request_ms=0.25)
    target = [(n, b, c, float(truth.target_ms(n, b, c)))
              for n, b, c in [(1, 1, 1000), (5, 1, 4000), (8, 8, 2000), (40, 8, 7000)]]
    draft = [(b, truth.draft_step_ms(b)) for b in (1, 4, 16)]
    fitted = CostPrior.fit(target, draft)
    for name in ("fixed_ms", "per_token_ms", "per_kv_token_ms", "draft_fixed_ms",
                 "draft_per_request_ms"):
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=1e-6)


def test_static_schedule_backs_off_at_large_batches():
    schedule = static_schedule(CostModel(EXPENSIVE), np.full(4, 0.8), 64, 4096)
    assert schedule[0][0] == 1 and schedule[-1][1] == 64
    assert schedule[0][2] > 0 and schedule[-1][2] == 0
    for (_, last, _), (first, _, _) in zip(schedule, schedule[1:], strict=False):
        assert first == last + 1
    ks = [k for _, _, k in schedule]
    assert ks == sorted(ks, reverse=True)
    # vLLM accepts it as a schedule
    from vllm.v1.spec_decode.dynamic.utils import build_dynamic_sd_schedule_lookup

    dense = build_dynamic_sd_schedule_lookup([list(r) for r in schedule], 64, 4)
    for first, last, k in schedule:
        assert dense[first:last + 1] == [k] * (last - first + 1)
