"""Stage 2 (GRPO): hand-computed losses and advantages, chunked vocab-parallel log-probs, rollout
records, and GRPO steps through the trainer (1 rank = 2 ranks, exact resume, step-1 oracle)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from megatron_a1.testing import run_multirank
from megatron_a1.training.losses import (
    GRPOLossConfig,
    asymmetric_tool_advantages,
    dynamic_sampling_keep,
    group_advantages,
    grpo_token_losses,
)
from megatron_a1.training.rollout_groups import (
    RolloutGroupSource,
    RolloutRecordError,
    make_micro_batch,
    pack_first_fit,
    read_rollout_groups,
)
from test_train_loop import base_overrides, train_body, write_dataset

# ------------------------------------------------------------------------ advantages by hand


def test_group_advantages_by_hand():
    # group 0: rewards 1,0,0,1 -> mean .5, population std .5 -> +-1
    # group 1: all equal -> 0; group 2: a single sample -> 0
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.3, 0.3, 0.3, 0.7])
    g = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2])
    adv = group_advantages(r, g, eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([1.0, -1, -1, 1, 0, 0, 0, 0]))
    # negative rewards only: mean -2, std sqrt(2/3)
    adv = group_advantages(torch.tensor([-1.0, -2.0, -3.0]), torch.zeros(3), eps=0.0)
    s = math.sqrt(2 / 3)
    torch.testing.assert_close(adv, torch.tensor([1 / s, 0.0, -1 / s]))


def test_asymmetric_tool_advantage_by_hand():
    outcome = torch.tensor([1.0, 0.0, 0.0, 0.0])
    process = torch.tensor([0.9, 0.2, 0.6, 1.0])
    adv = asymmetric_tool_advantages(outcome, process, torch.zeros(4), 0.5, eps=0.0)
    so = math.sqrt(0.1875)  # std of (1,0,0,0)
    a_out = [0.75 / so, -0.25 / so, -0.25 / so, -0.25 / so]
    sp = math.sqrt(((0.4) ** 2 + 0 + 0.4 ** 2) / 3)  # std of the negatives' (0.2, 0.6, 1.0)
    a_proc = [0.0, -0.4 / sp, 0.0, 0.4 / sp]  # the success gets no process term
    torch.testing.assert_close(adv, torch.tensor([a + 0.5 * p for a, p in zip(a_out, a_proc)]))
    # all negative: A_out = 0, the process reward alone ranks the failures
    adv = asymmetric_tool_advantages(torch.zeros(2), torch.tensor([0.0, 1.0]), torch.zeros(2),
                                     0.5, eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([-0.5, 0.5]))


def test_dynamic_sampling_keeps_groups_with_distinct_rewards():
    r = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.5])
    g = torch.tensor([0, 0, 1, 1, 2, 2, 3])
    assert dynamic_sampling_keep(r, g).tolist() == [False, False, False, False, True, True, False]


def test_grpo_token_loss_by_hand():
    cfg = GRPOLossConfig(clip_low=0.2, clip_high=0.28, kl_coef=0.1, entropy_coef=0.01)
    old = torch.zeros(4)
    # ratios 1.5 (A>0: clipped at 1.28), 0.5 (A<0: clipped at 0.8), 1.1 (inside), 0.5 (A>0: the
    # unclipped ratio is smaller, so min keeps it)
    logp = torch.log(torch.tensor([1.5, 0.5, 1.1, 0.5])).requires_grad_()
    adv = torch.tensor([2.0, -1.0, 1.0, 3.0])
    ref = torch.log(torch.tensor([1.0, 1.0, 1.0, 0.25]))
    ent = torch.tensor([0.5, 1.0, 2.0, 0.0])
    loss = grpo_token_losses(logp, old, adv, cfg, ref_logprobs=ref, entropy=ent)
    pg = torch.tensor([-1.28 * 2, 0.8 * 1, -1.1, -0.5 * 3])
    d = ref - logp.detach()
    k3 = torch.exp(d) - d - 1
    torch.testing.assert_close(loss, pg + 0.1 * k3 - 0.01 * ent)
    # clipped tokens pass no policy gradient; the others -A*ratio (plus the KL's)
    loss.sum().backward()
    dk3 = 0.1 * (1 - torch.exp(d))  # d(k3)/d(logp) = -exp(d) + 1
    torch.testing.assert_close(logp.grad, torch.tensor([0.0, 0.0, -1.1, -1.5]) + dk3)
    # the terms the step's metrics read: the clip is active exactly where the gradient is zero
    again, terms = grpo_token_losses(logp.detach(), old, adv, cfg, ref_logprobs=ref, entropy=ent,
                                     return_terms=True)
    torch.testing.assert_close(again, loss.detach())
    assert terms.clipped.tolist() == [True, True, False, False]
    torch.testing.assert_close(terms.ratio, torch.tensor([1.5, 0.5, 1.1, 0.5]))
    torch.testing.assert_close(terms.kl, k3)


def test_grpo_kl_and_entropy_need_their_inputs():
    cfg = GRPOLossConfig()
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_token_losses(torch.zeros(2), torch.zeros(2), torch.ones(2), cfg)


# ------------------------------------------------------------------- log-probs and entropy


def _ref_logprobs(hidden, weight, labels):
    logits = (hidden @ weight.t()).float()
    logp = torch.log_softmax(logits, -1)
    return logp.gather(1, labels[:, None])[:, 0], -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("chunk", [3, 64])
def test_token_logprobs_values_and_grads(chunk):
    from megatron_a1.training.logprobs import token_logprobs

    torch.manual_seed(0)
    h = torch.randn(11, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 50, (11,))
    g1, g2 = torch.randn(11, dtype=torch.float64), torch.randn(11, dtype=torch.float64)
    lp, ent = token_logprobs(h, w, y, chunk_size=chunk, with_entropy=True)
    (lp * g1 + ent * g2).sum().backward()
    grads = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    rlp, rent = _ref_logprobs(h, w, y)
    (rlp * g1 + rent * g2).sum().backward()
    torch.testing.assert_close(lp, rlp.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, rent.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], h.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[1], w.grad, rtol=1e-5, atol=1e-5)


def _tp_logprobs_body(rank, world_size, _):
    from megatron_a1.runtime import ParallelConfig, destroy, initialize
    from megatron_a1.training.logprobs import token_logprobs
    from megatron.core import parallel_state

    initialize(ParallelConfig(tensor_parallel=2), seed=0)
    torch.manual_seed(0)
    h = torch.randn(9, 8, dtype=torch.float64, requires_grad=True)
    w_full = torch.randn(20, 8, dtype=torch.float64)
    y = torch.randint(0, 20, (9,))
    w = w_full[rank * 10:(rank + 1) * 10].clone().requires_grad_()
    lp, ent = token_logprobs(h, w, y, chunk_size=4, with_entropy=True,
                             tp_group=parallel_state.get_tensor_model_parallel_group())
    (lp.sum() + 0.5 * ent.sum()).backward()
    out = {"lp": lp.detach(), "ent": ent.detach(), "gh": h.grad.clone(), "gw": w.grad.clone()}
    destroy()
    return out


def test_token_logprobs_tensor_parallel_equals_one_rank():
    outs = run_multirank(_tp_logprobs_body, 2, args=(None,))
    torch.manual_seed(0)
    h = torch.randn(9, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(20, 8, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 20, (9,))
    lp, ent = _ref_logprobs(h, w, y)
    (lp.sum() + 0.5 * ent.sum()).backward()
    for rank, o in enumerate(outs):
        torch.testing.assert_close(o["lp"], lp.float(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(o["ent"], ent.float(), rtol=1e-5, atol=1e-5)
        # each TP rank holds the full hidden gradient (the sum over vocab shards)
        torch.testing.assert_close(o["gh"], h.grad, rtol=1e-5, atol=1e-5)  # fp32 inside
        torch.testing.assert_close(o["gw"], w.grad[rank * 10:(rank + 1) * 10], rtol=1e-5,
                                   atol=1e-5)


# -------------------------------------------------------------------------- rollout records


def _record(pid, outcome, n_prompt, sampled, *, logprobs=None, process=None, domain="search"):
    tokens = list(range(1, n_prompt + 1)) + list(sampled)
    rec = {"prompt_id": pid, "domain": domain, "tokens": tokens,
           "loss_mask": [0] * n_prompt + [1] * len(sampled),
           "rewards": {"outcome": outcome, "process": process}}
    if logprobs is not None:
        rec["logprobs"] = [0.0] * n_prompt + list(logprobs)
    return rec


def write_rollouts(path, n_prompts=6, samples=4, seed=0, with_logprobs=False) -> str:
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for p in range(n_prompts):
            prompt = int(rng.integers(3, 12))
            for s in range(samples):
                sampled = rng.integers(0, 128, size=int(rng.integers(4, 30))).tolist()
                # prompt 1: every sample fails -> dropped by dynamic sampling
                outcome = 0.0 if p == 1 else float(rng.integers(0, 2) if s else 1)
                lp = (-rng.random(len(sampled)) * 3).tolist() if with_logprobs else None
                f.write(json.dumps(_record(f"p{p}", outcome, prompt, sampled, logprobs=lp,
                                           domain=["search", "science"][p % 2])) + "\n")
    return path


def test_bad_records_are_named_and_skipped(tmp_path):
    path = tmp_path / "r.jsonl"
    good = _record("a", 1.0, 3, [5, 6]), _record("a", 0.0, 3, [7, 8])
    path.write_text("\n".join([json.dumps(good[0]), "{not json", json.dumps({"prompt_id": "b"}),
                               json.dumps({**good[1], "loss_mask": [1]}), json.dumps(good[1])]))
    groups, errors = read_rollout_groups(str(path))
    assert [len(g) for g in groups] == [2]
    assert [e.split(": ")[0] for e in errors] == [f"{path}:2", f"{path}:3", f"{path}:4"]
    assert "rewards.outcome" in errors[1] and "loss_mask" in errors[2]


def test_all_equal_rewards_everywhere_is_a_clear_error(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(_record("a", 1.0, 3, [5, 6])) for _ in range(3)))
    with pytest.raises(RolloutRecordError, match="nothing to learn"):
        RolloutGroupSource(str(path), prompts_per_step=1, max_seq_len=64, process_weight=None,
                           dynamic_sampling=True, dp_rank=0, dp_size=1)


def test_source_refills_after_dropped_groups_and_splits_over_dp(tmp_path):
    path = write_rollouts(str(tmp_path / "r.jsonl"))
    src = [RolloutGroupSource(path, prompts_per_step=2, max_seq_len=64, process_weight=None,
                              dynamic_sampling=True, dp_rank=r, dp_size=2) for r in range(2)]
    step, cursor = src[0].next_step(0)
    assert step.groups_read == 3 and step.groups_kept == 2 and cursor == 3  # p1 dropped
    assert {s.prompt_id for s in step.samples} == {"p0", "p2"}
    step1, _ = src[1].next_step(0)
    assert len(step.micro_batches) == len(step1.micro_batches)
    # the two ranks' packs hold every sampled token exactly once
    trained = sum(float(b["loss_mask"].sum()) for b in step.micro_batches + step1.micro_batches)
    assert trained == sum(float(s.mask[1:].sum()) for s in step.samples)
    # every group's advantages are zero-mean
    for pid in ("p0", "p2"):
        assert abs(sum(s.advantage for s in step.samples if s.prompt_id == pid)) < 1e-5


def test_micro_batch_aligns_logprobs_and_advantages_to_labels():
    from megatron_a1.training.rollout_groups import RolloutSample

    a = RolloutSample("a", "x", np.array([1, 2, 3, 4]), np.array([0, 0, 1, 1], np.float32),
                      np.array([0, 0, -0.5, -0.25], np.float32), 1.0, None, "t", advantage=2.0)
    b = RolloutSample("b", "x", np.array([7, 8, 9]), np.array([0, 1, 1], np.float32), None, 0.0,
                      None, "t", advantage=-1.0)
    batch = make_micro_batch([a, b], pad_to_multiple=4)
    assert batch["tokens"][0].tolist() == [1, 2, 3, 4, 7, 8, 9, 0]
    assert batch["labels"][0].tolist() == [2, 3, 4, -100, 8, 9, -100, -100]
    assert batch["loss_mask"][0].tolist() == [0, 1, 1, 0, 1, 1, 0, 0]
    assert batch["advantages"].tolist() == [2, 2, 2, 2, -1, -1, -1, 0]
    old = batch["old_logprobs"]
    assert old[:3].tolist() == [0, -0.5, -0.25] and torch.isnan(old[4:]).all()


def test_first_fit_decreasing():
    assert pack_first_fit([5, 9, 3, 4, 6], 10) == [[1], [4, 3], [0, 2]]


# ------------------------------------------------------------------- GRPO through the trainer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    data = write_dataset(str(root / "sft"), n_docs=8, seed=5)
    init = str(root / "init")
    run_multirank(train_body, 1, args=(base_overrides(data, init, steps=0),))
    return root, init


def grpo_overrides(rollouts, ck, init, steps=3, extra=()):
    return [o for o in base_overrides("unused", ck, steps=steps, init=init)
            if not o.startswith("data.prefixes")] + [
        "train.stage=grpo", f"grpo.rollouts={rollouts}", "grpo.prompts_per_step=2",
        "grpo.chunk_size=32", "optim.lr=5e-3", "checkpoint.save_interval=0", *extra]


def test_first_step_loss_is_minus_mean_advantage(setup, tmp_path):
    """Without record log-probs the ratio is 1 and the reference is the policy, so step 1's loss
    is -mean over sampled tokens of their sample's advantage (entropy bonus off)."""
    root, init = setup
    path = write_rollouts(str(tmp_path / "r.jsonl"))
    [s] = run_multirank(train_body, 1, args=(grpo_overrides(
        path, str(tmp_path / "ck"), init, steps=1, extra=["grpo.entropy_coef=0"]),))
    src = RolloutGroupSource(path, prompts_per_step=2, max_seq_len=128, process_weight=None,
                             dynamic_sampling=True, dp_rank=0, dp_size=1)
    step, _ = src.next_step(0)
    num = sum(x.advantage * float(x.mask[1:].sum()) for x in step.samples)
    den = sum(float(x.mask[1:].sum()) for x in step.samples)
    assert s["losses"][0] == pytest.approx(-num / den, abs=1e-5)


def test_grpo_two_ranks_equal_one_rank_and_resume_is_exact(setup, tmp_path):
    root, init = setup
    path = write_rollouts(str(tmp_path / "r.jsonl"), with_logprobs=True, seed=1)
    [one] = run_multirank(train_body, 1, args=(grpo_overrides(path, str(tmp_path / "a"), init,
                                                               steps=4),))
    assert all(math.isfinite(x) for x in one["losses"])
    two = run_multirank(train_body, 2, args=(grpo_overrides(path, str(tmp_path / "b"), init,
                                                             steps=4),))
    for s in two:
        np.testing.assert_allclose(s["losses"], one["losses"], rtol=2e-4, atol=1e-6)
    ck = str(tmp_path / "c")
    run_multirank(train_body, 1, args=(grpo_overrides(path, ck, init, steps=4,
                                                      extra=["train.exit_interval=2"]),))
    [resumed] = run_multirank(train_body, 1, args=(grpo_overrides(path, ck, init, steps=4),))
    np.testing.assert_allclose(resumed["losses"], one["losses"][2:], rtol=1e-5, atol=1e-7)
    metrics = [json.loads(line) for line in open(f"{ck}/metrics.jsonl")]
    assert metrics[-1]["grpo/groups_dropped"] >= 0 and "reward/search" in metrics[0]


def test_grpo_config_errors(setup, tmp_path):
    from megatron_a1.configs import ConfigError, load_config
    from megatron_a1.training.config import TrainConfig

    root, init = setup
    path = write_rollouts(str(tmp_path / "r.jsonl"))
    cfg = load_config(TrainConfig, None, grpo_overrides(path, str(tmp_path), None))
    with pytest.raises(ConfigError, match="reference policy"):
        cfg.validate(1)
    cfg = load_config(TrainConfig, None, grpo_overrides(str(tmp_path / "missing.jsonl"),
                                                        str(tmp_path), init))
    with pytest.raises(ConfigError, match="grpo.rollouts"):
        cfg.validate(1)
