"""Where the options beyond AMPO met the old code wrongly (issue 30), one test per finding, each
failing on the code before the fix: the LR schedule and a short mini-batch under dynamic sampling,
rounds counted once, the soft penalty deciding guidance, prefix continuations under the overlong
rules, rows outside the loss in rollout/logprob_diff, the token normaliser, a prefix that already
states the answer, torn JSONL lines; and num_tokens in TRL's meaning. Real models and the real
verifier throughout; numbers worked out by hand in the comments."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json

import pyarrow.parquet as pq
import pytest
import torch

from ampo_cache.misses import miss_prompts
from ampo_cache.verify import Verifier
from ampo_common.jsonl import read_jsonl
from ampo_train.config import LossSettings, OverlongSettings, RewardSettings
from ampo_train.data import Row, collate
from ampo_train.metrics import MetricsLogger, StepStats
from ampo_train.miss_log import MissLog
from ampo_train.rewards import Rewarder, score_responses
from ampo_train.schedule import UpdateSchedule, lr_factor
from ampo_train.update import Normalisers, PlainBackward, UpdateSettings, minibatch_backward, sampling_logprobs
from tests.trainer_fixtures import make_policy, make_student, make_tokenizer


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(make_student(tmp_path_factory.mktemp("composition") / "student"))


class Recording(PlainBackward):
    def __init__(self):
        self.losses = []

    def backward(self, loss):
        self.losses.append(float(loss.detach()))
        loss.backward()


# ----------------------------------------------------------------------------- 1. LR schedule, short steps


def test_a_short_step_still_reaches_the_end_of_the_schedule():
    """Linear decay over 4 steps of 2 updates (horizon 8). Counting updates, a run whose steps 2-4
    make 1 update each ends at position 5 of 8 (LR 0.375 of the base); placed by progress, step 4's
    single update sits at position 6, and the last full step's second update at 7, as a full run."""
    param = torch.nn.Parameter(torch.zeros(1))
    schedule = UpdateSchedule(torch.optim.SGD([param], lr=1.0), "linear", warmup=0, updates_per_step=2, max_steps=4)
    seen = []
    for step, count in ((1, 2), (2, 1), (3, 1), (4, 1)):
        for j in range(count):
            schedule.place(step, j, count)
            seen.append(schedule.get_last_lr()[0])
            schedule.step()
    assert seen == pytest.approx([1.0, 7 / 8, 6 / 8, 4 / 8, 2 / 8])  # positions 0, 1, 2, 4, 6
    assert schedule.applied == 5
    schedule.place(4, 1, 2)  # a full last step's second update: position 7 -> 1/8, as transformers' linear
    assert schedule.get_last_lr()[0] == pytest.approx(1 / 8)
    # full steps land exactly on transformers' schedules (the figures the demo trained with)
    from transformers import get_scheduler

    for kind in ("linear", "cosine", "constant"):
        reference = get_scheduler(kind if kind != "constant" else "constant_with_warmup",
                                  torch.optim.SGD([param], lr=1.0), num_warmup_steps=3, num_training_steps=8)
        for t in range(8):
            assert lr_factor(kind, t, 3, 8) == reference.lr_lambdas[0](t)


def test_a_short_last_mini_batch_weighs_in_proportion_to_its_rows(model):
    """Updates of 4 prompts (G = 2), 6 prompts kept: the second update has 2. Its rows repeat the
    first update's first half, and with a learning rate of 0 the weights do not move: divided by the
    configured 8 rows its loss is half the first's (it was divided by its own 4 rows: equal)."""
    from accelerate import Accelerator

    from ampo_train.update import Optimization, RowLogprobs, update_policy

    pair = [Row([5, 6], [10, 11, 12, 2], 1.0, advantage=0.5), Row([5, 6], [13, 2], 0.0, advantage=0.25),
            Row([7, 8], [14, 15, 2], 1.0, advantage=0.5), Row([7, 8], [16, 17, 18, 19, 2], 0.0, advantage=-0.25)]
    rows = pair * 3
    settings = UpdateSettings(group_size=2, prompts_per_update=4, updates_per_step=2, micro_batch_size=16,
                              loss=LossSettings(entropy_coef=0.0), loss_length=8)
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    policy = make_policy(model)
    recording = Recording()

    class Recorded(Optimization):
        def backward(self, loss):
            recording.backward(loss)

    optimization = Recorded(accelerator, model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0))
    update_policy(policy, rows, RowLogprobs(), settings, StepStats(), optimization)
    assert len(recording.losses) == 2 and recording.losses[0] != 0
    assert recording.losses[1] == pytest.approx(recording.losses[0] / 2, rel=1e-6)


# ----------------------------------------------------------------------------- 2. rounds counted once


def test_dynamic_rounds_are_counted_once_over_processes():
    """Each of 2 processes made one extra round (processes agree on rounds): 1, not 2; the groups
    each drew and kept add up."""
    parts = []
    for _ in range(2):
        stats = StepStats()
        stats.replicated("dynamic/rounds", 1)
        stats.total("dynamic/drawn_groups", 8)
        parts.append(stats.to_dict())
    merged = StepStats.merge(parts).summary()
    assert merged["dynamic/rounds"] == 1 and merged["dynamic/drawn_groups"] == 16


# ----------------------------------------------------------------------------- 3-4. the overlong rules


def test_the_soft_penalty_shapes_the_reward_not_the_verdict():
    """4 of 4 correct, answers long: budget 256, L_cache 64, lengths 230..256 -> penalties
    -(230 - 192)/64 ... -1: rewards [0.406, 0.25, 0.094, 0.0]. The verdicts stay correct, so the
    guidance rules (which read them) see a solved group."""
    rewarder = Rewarder(Verifier(workers=0), RewardSettings(), OverlongSettings(soft_penalty_tokens=64), 256)
    scored = rewarder([r"\boxed{4}"] * 4, ["4"] * 4, [230, 240, 250, 256])
    assert scored.rewards.tolist() == pytest.approx([1 - 38 / 64, 0.25, 1 - 58 / 64, 0.0])
    assert scored.correct.tolist() == [True] * 4
    from ampo_train.guidance import trigger_rule
    from ampo_train.config import GuidanceSettings

    assert not trigger_rule("adaptive").decide(scored.correct.tolist(), GuidanceSettings(), None).guided


def _prefix_guide(world, unigram_budget: int, overlong: OverlongSettings, trace_text: str | None = None):
    """A real PrefixTraces over a world with one prompt (17 + 25) and its store; ``trace_text``
    replaces the store's traces by one given text (as a teacher's)."""
    from transformers import AutoModelForCausalLM

    from ampo_cache.lookup import CachedTrace
    from ampo_cache.prompts import Prompt
    from ampo_cache.store import TraceStore
    from ampo_train.config import GuidanceSettings, PrefixSettings, RolloutSettings
    from ampo_train.data import prepare_prompts
    from ampo_train.guided_step import PrefixTraces, WholeTraces

    tok = make_tokenizer()
    batch = prepare_prompts([Prompt(world["pid"], "What is 17 + 25?", "42")], tok)
    if trace_text is None:
        lookup = TraceStore.open(world["store"]).index(prompt_ids=[world["pid"]]).lookup
    else:
        lookup = lambda ids: {i: [CachedTrace("t", 0, trace_text, None, len(trace_text))] for i in ids}  # noqa: E731
    rollout = RolloutSettings(max_new_tokens=unigram_budget)
    policy = make_policy(AutoModelForCausalLM.from_pretrained(world["student"]), rollout, tok)
    from ampo_train.rollout import open_engine

    policy.engine = open_engine("transformers", rollout, policy.module, tok, private_rng=True)
    rewarder = Rewarder(Verifier(workers=0), RewardSettings(), overlong, unigram_budget)
    whole = WholeTraces(GuidanceSettings(k=1, rank="random"), lookup, None)
    guide = PrefixTraces(whole, policy, tok, rewarder, PrefixSettings(fraction=1.0, schedule="constant"), rollout, 1)
    return guide, batch, tok


def _one_prompt_world(tmp_path, unigram):
    from ampo_cache.ids import prompt_id
    from tests.trainer_fixtures import make_world

    world = make_world(tmp_path / "world", problems=[("What is 17 + 25?", "42", 17, 25)], covered=1.0, unigram=unigram)
    return {**world, "pid": prompt_id("What is 17 + 25?")}


def test_prefix_continuations_are_penalised_and_filtered_like_rollouts(tmp_path):
    """A student that writes only spaces continues the prefix "17+25=" (cut before the first "42")
    to the budget of 12: 6 + 6 tokens, no EOS. The soft penalty (L_cache 4: -(12 - 8) / 4 = -1) is
    on its reward, as on the group's rollouts (it was the verifier's 0 alone), and the overlong
    filter masks it."""
    from ampo_train.rollout import Rollout
    from ampo_train.sampling import RowSettings, build_rows
    from ampo_train.seeds import RoundSeeds

    world = _one_prompt_world(tmp_path, {" ": 0.999, "<eos>": 0.001})
    guide, batch, tok = _prefix_guide(world, 12, OverlongSettings(filter=True, soft_penalty_tokens=4))
    plan = guide.plan(batch, torch.zeros(1, 2, dtype=torch.bool), 1, RoundSeeds(0, 1, 0, (0,), 1))
    (injection,) = plan.injections
    continuation = injection.continuation
    assert tok.decode(continuation.prefix_ids).replace(" ", "") == "17+25="
    assert len(continuation.prefix_ids) + len(continuation.rollout.token_ids) == 12
    assert continuation.rollout.finish_reason == "length" and not continuation.correct
    assert continuation.reward == pytest.approx(-1.0)
    rollouts = [[Rollout([5, 6, tok.eos_token_id], "stop"), Rollout([5] * 12, "length")]]
    scored = guide.rewarder(["x", "x"], ["42", "42"], [3, 12])
    rows = build_rows(batch, rollouts, scored, plan, tok, RowSettings(16, 1.0, True, "none"))
    assert rows[injection.slot].prefix_len == 6 and not rows[injection.slot].in_loss


def test_a_prefix_that_states_the_answer_earns_nothing(tmp_path):
    """A trace that says the answer in prose before its box. The prefix is now cut before "42"
    (it was cut before the box, so it held "42. So the answer: "); and even given that text, a
    student that writes nothing (EOS at once) is not credited: the answer the verifier reads lies in
    the prefix, not in what the student wrote."""
    text = "17+25 gives 42. So the answer: "
    assert score_responses(Verifier(workers=0), [text], ["42"], RewardSettings()).correct.tolist() == [True]
    assert score_responses(Verifier(workers=0), [text], ["42"], RewardSettings(), own_from=[len(text)]).correct.tolist() \
        == [False]
    assert score_responses(Verifier(workers=0), [text + "42"], ["42"], RewardSettings(),
                           own_from=[len(text)]).correct.tolist() == [True]
    from ampo_train.seeds import RoundSeeds

    world = _one_prompt_world(tmp_path, {"<eos>": 0.999, " ": 0.001})
    guide, batch, tok = _prefix_guide(world, 16, OverlongSettings(), trace_text=text + "\\boxed{42}")
    plan = guide.plan(batch, torch.zeros(1, 2, dtype=torch.bool), 1, RoundSeeds(0, 1, 0, (0,), 1))
    continuation = plan.injections[0].continuation
    assert tok.decode(continuation.prefix_ids).replace(" ", "") == "17+25gives"
    assert continuation.rollout.token_ids == [tok.eos_token_id] and not continuation.correct
    assert continuation.reward == 0.0


# ----------------------------------------------------------------------------- 5-6. what the loss trains


def test_rows_outside_the_loss_stay_out_of_logprob_diff(model):
    """Two rows whose engine log-probs are the trainer's own: the difference is ~0. The second is a
    truncated rollout the overlong filter masked; its no-grad pass is not computed (0), which was
    compared with its engine log-probs (a difference of ~4)."""
    policy = make_policy(model)
    response = [7, 8, 9, 10, 11, 12]
    true_lp = policy.logprobs([Row([3, 4], response, 0.0)], 8)[0]
    rows = [Row([3, 4], response, 0.0, engine_logp=true_lp.clone()),
            Row([3, 4], response, 0.0, finished=False, in_loss=False, engine_logp=true_lp.clone())]
    stats = StepStats()
    sampling_logprobs(policy, rows, UpdateSettings(group_size=2, prompts_per_update=1, updates_per_step=2,
                                                   micro_batch_size=8), stats)
    assert stats.summary()["rollout/logprob_diff"] < 1e-5


def test_token_means_divide_by_the_tokens_the_loss_trains(model):
    """A prefixed row (8 tokens of context, 2 trained), a filtered row (10 tokens, none trained) and
    a plain one (2): 4 trained tokens of 22. Every advantage is 1 and the ratio is 1 (one update),
    so each trained token's loss is -1: token_mean is -4 / 4 = -1 (it was -4 / 22), and the entropy
    bonus is the mean over those 4 tokens."""
    policy = make_policy(model)
    rows = [Row([5], list(range(10, 20)), 1.0, advantage=1.0, prefix_len=8),
            Row([5], list(range(10, 20)), 0.0, finished=False, in_loss=False, advantage=1.0),
            Row([5], [30, 31], 1.0, advantage=1.0)]
    assert [r.loss_tokens for r in rows] == [2, 0, 2]
    for coef in (0.0, 0.5):
        settings = UpdateSettings(group_size=3, prompts_per_update=1, updates_per_step=1, micro_batch_size=8,
                                  loss=LossSettings(aggregation="token_mean", entropy_coef=coef))
        recording, stats = Recording(), StepStats()
        minibatch_backward(policy, rows, settings, stats, recording)
        mb = collate(rows, 0)
        with torch.no_grad():
            _, entropy = policy.response_logprobs(mb, with_entropy=True)
        mean_entropy = float(entropy[mb.response_mask].sum()) / 4
        assert recording.losses[0] == pytest.approx(-1.0 - coef * mean_entropy, rel=1e-5)
        assert stats.summary()["entropy"] == pytest.approx(mean_entropy, rel=1e-5)
        assert stats.summary()["update/token_normaliser"] == stats.summary()["update/loss_tokens"] == 4
    assert Normalisers.local(rows) == Normalisers(4, 3)


# ----------------------------------------------------------------------------- 8. torn lines


def test_a_torn_last_line_is_dropped_on_resume(tmp_path):
    """A kill while a line was written leaves half of it: resume drops it (and says so) instead of
    failing on it; the miss log resumes too."""
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "reward": 0.5}\n{"step": 2, "reward": 0.7}\n{"step": 3, "rew')
    logger = MetricsLogger(tmp_path, max_steps=5)
    logger.truncate_after(2)
    logger.close()
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2]
    misses = tmp_path / "misses.jsonl"
    misses.write_text('{"step": 1, "prompt_id": "a", "problem": "1+1", "answer": "2"}\n{"step": 2, "prompt_id": "b", "prob')
    log = MissLog(tmp_path, resumed_step=1)
    assert [e["prompt_id"] for e in log.history] == ["a"]
    assert read_jsonl(misses) == ([{"step": 1, "prompt_id": "a", "problem": "1+1", "answer": "2"}], False)
    metrics.write_text('{"step": 1}\nnot json\n{"step": 2}\n')  # damage before the end is an error
    with pytest.raises(Exception, match=r"metrics.jsonl:2"):
        read_jsonl(metrics)


def test_prompts_from_misses_sees_every_completed_step(tmp_path):
    """The table is rewritten after the JSONL line: a kill between the two leaves the table a step
    behind. The build reads the run's JSONL, so the step's misses are not lost."""
    log = MissLog(tmp_path)
    log.record(1, [{"prompt_id": "a", "problem": "1+1", "answer": "2"}])
    with open(tmp_path / "misses.jsonl", "a") as out:  # step 2 written, the kill before its table
        out.write(json.dumps({"step": 2, "prompt_id": "b", "problem": "2+2", "answer": "4"}) + "\n")
    assert [r["problem"] for r in pq.read_table(tmp_path / "misses.parquet").to_pylist()] == ["1+1"]
    assert [p.problem for p in miss_prompts(tmp_path)] == ["1+1", "2+2"]
