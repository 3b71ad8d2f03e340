"""EmbeddedEngine: incremental decoding on our HybridModel equals full forwards of the prefix.

The oracle is the model's normal packed forward (``parity.megatron_logits``) of each whole
prefix, on a tiny random ``GE*E`` model (Gated DeltaNet, gated attention, MoE):

* every incremental step's logits (a ragged prefill of several prompts, one of them longer than
  the Gated DeltaNet chunk of 64 tokens, then decode steps with rows dropping out and a
  multi-token step) equal the full forward's at the same positions;
* greedy generation is the argmax rolled out by repeated full forwards; every returned log-prob
  is the full forward's log-softmax at the sampled id;
* sampling: the filtered distribution (temperature, top-k, top-p) has the right numbers, the
  sampler draws from it, seeds reproduce, stop tokens and limits give the right finish reason;
* the engine shares the live weights, restores the train/eval mode, rejects sharded layouts.
"""
import copy
from types import SimpleNamespace

import pytest
import torch

from megatron_a1.model.config import preset
from megatron_a1.model.parity import megatron_logits
from megatron_a1.rollout.embedded import EmbeddedEngine, check_single_rank, sampling_probs
from megatron_a1.rollout.engine import Engine, SamplingParams

CFG = preset("tiny_test")  # GE*E, vocab 128, GDN chunk 64 (the kernel's default)
REAL_VOCAB = 100  # "tokenizer" size below the padded 128 rows
ATOL = 2e-5


@pytest.fixture(scope="module")
def model():
    from megatron_a1.model.build import build_model
    from megatron_a1.runtime import destroy, initialize

    threads = torch.get_num_threads()
    # Tiny tensors: one intra-op thread is as fast, and does not stall on a busy machine.
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        # core attention's PyTorch path in the full forward (the CPU demo's), not the
        # Triton interpreter: the oracle stays fast
        mp.setenv("TRITON_INTERPRET", "0")
        rt = initialize(seed=0)
        m = build_model(CFG, CFG.to_transformer_config(None), pg_collection=rt.pg_collection,
                        backend="local", max_seq_len=256)
        with torch.no_grad():  # large weights, so a wrong cache or position shows in the logits
            g = torch.Generator().manual_seed(0)
            for name, p in m.named_parameters():
                if name.endswith(("A_log", "dt_bias")):
                    continue
                if "norm" in name:
                    p.copy_(torch.rand(p.shape, generator=g) * 0.6 - 0.3)
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.15)
        yield m.eval()
        destroy()
    torch.set_num_threads(threads)


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, REAL_VOCAB, (n,), generator=g).tolist() for n in lengths]


def _full_logits(model, seqs):
    """Full packed forward of each sequence: list of [len, V] float32."""
    lens = torch.tensor([len(s) for s in seqs])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    out = megatron_logits(model, torch.tensor([t for s in seqs for t in s]), cu)
    return [out[a:b] for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]


def test_every_incremental_step_equals_full_forward(model):
    engine = EmbeddedEngine(model)
    assert isinstance(engine, Engine)
    lengths = [3, 70, 1, 62]  # 70 > the GDN chunk; 62 crosses 64 while decoding
    seqs = _prompts(lengths)
    cache = engine.new_cache(len(seqs), capacity=96)

    got = engine.forward(cache, seqs, all_logits=True)  # ragged prefill, every position
    ref = torch.cat(_full_logits(model, seqs))
    assert ref.abs().max() > 1.0, "logits too small for the comparison to mean anything"
    torch.testing.assert_close(got, ref, rtol=0, atol=ATOL)
    assert cache.lengths == lengths

    g = torch.Generator().manual_seed(1)
    for step in range(6):
        rows = [0, 1, 3] if step >= 2 else [0, 1, 2, 3]  # row 2 has finished
        new = [torch.randint(0, REAL_VOCAB, (3 if (r == 0 and step == 3) else 1,),
                             generator=g).tolist() for r in rows]  # one multi-token step
        got = engine.forward(cache, new, rows)  # last new token of each row
        for r, t in zip(rows, new):
            seqs[r] += t
        ref = torch.stack([x[-1] for x in _full_logits(model, [seqs[r] for r in rows])])
        torch.testing.assert_close(got, ref, rtol=0, atol=ATOL, msg=f"step {step}")
    assert cache.lengths == [len(s) for s in seqs]


def test_greedy_is_argmax_of_full_forwards_and_logprobs_match(model):
    engine = EmbeddedEngine(model, vocab_size=REAL_VOCAB)
    prompts = _prompts([5, 1, 12], seed=2)
    gens = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=6))
    for prompt, gen in zip(prompts, gens):
        seq = list(prompt)
        for tok, lp in zip(gen.token_ids, gen.logprobs):
            logits = _full_logits(model, [seq])[0][-1]
            assert tok == int(logits[:REAL_VOCAB].argmax())
            assert lp == pytest.approx(float(logits.log_softmax(-1)[tok]), abs=ATOL)
            seq.append(tok)
        assert len(gen.token_ids) == 6 and gen.finish_reason == "length"


def test_sampled_logprobs_are_the_policy_logprobs(model):
    engine = EmbeddedEngine(model, vocab_size=REAL_VOCAB)
    prompts = _prompts([4, 9, 2], seed=3)
    gens = engine.generate(prompts, SamplingParams(temperature=1.3, top_k=40, top_p=0.95,
                                                   max_tokens=8, seed=5))
    # one packed forward of prompt + sampled tokens: position i predicts token i + 1
    full = _full_logits(model, [p + g.token_ids for p, g in zip(prompts, gens)])
    for prompt, gen, logits in zip(prompts, gens, full):
        ids = torch.tensor(gen.token_ids)
        assert int(ids.max()) < REAL_VOCAB  # never a padded row
        ref = logits[len(prompt) - 1:-1].log_softmax(-1).gather(1, ids[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(gen.logprobs), ref, rtol=0, atol=ATOL)


def test_sampling_probs_numbers():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    torch.testing.assert_close(sampling_probs(logits, 0.5), (logits / 0.5).softmax(-1))
    top2 = torch.tensor([[2.0, 1.0]]).softmax(-1)[0]
    torch.testing.assert_close(sampling_probs(logits, 1.0, top_k=2)[0],
                               torch.tensor([top2[0], top2[1], 0, 0]))
    p = logits.softmax(-1)[0]  # [0.644, 0.237, 0.087, 0.032]
    torch.testing.assert_close(sampling_probs(logits, 1.0, top_p=0.6)[0],
                               torch.tensor([1.0, 0, 0, 0]))  # the first id alone reaches 0.6
    torch.testing.assert_close(sampling_probs(logits, 1.0, top_p=0.9)[0],
                               torch.cat([p[:3] / p[:3].sum(), torch.zeros(1)]))
    # top-p applies to the top-k-renormalised distribution: [0.665, 0.245, 0.090] -> 2 ids
    torch.testing.assert_close(sampling_probs(logits, 1.0, top_k=3, top_p=0.9)[0],
                               torch.cat([p[:2] / p[:2].sum(), torch.zeros(2)]))


def test_sampler_draws_from_the_filtered_distribution(model):
    engine = EmbeddedEngine(model, vocab_size=6)
    n = 4000
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, -3.0, 9.0, 9.0]).repeat(n, 1)  # 6, 7 padded
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    sp = SamplingParams(temperature=0.7, top_k=4)
    ids, lps = engine._sample(logits, gens, sp)
    freq = torch.bincount(torch.tensor(ids), minlength=8).double() / n
    expected = sampling_probs(logits[:1, :6], 0.7, top_k=4)[0].double()
    torch.testing.assert_close(freq[:6], expected, rtol=0, atol=0.03)
    assert freq[6:].sum() == 0  # padded rows never sampled, however likely
    # the log-prob is the raw policy's over all rows, not the filtered distribution's
    torch.testing.assert_close(torch.tensor(lps), logits.log_softmax(-1)[0][ids])


def test_seeded_sampling_is_reproducible_and_batch_independent(model):
    engine = EmbeddedEngine(model, vocab_size=REAL_VOCAB, seed=0)
    prompts = _prompts([3, 7], seed=4)
    sp = SamplingParams(temperature=1.0, max_tokens=8, seed=11)
    a = engine.generate(prompts + [prompts[0]], sp)
    b = engine.generate(prompts + [prompts[0]], sp)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert a[0].token_ids != a[2].token_ids  # same prompt twice in a request: two samples
    one_by_one = EmbeddedEngine(model, vocab_size=REAL_VOCAB, max_batch_size=1).generate(
        prompts + [prompts[0]], sp)
    assert [g.token_ids for g in one_by_one] == [g.token_ids for g in a]
    other = engine.generate(prompts, SamplingParams(temperature=1.0, max_tokens=8, seed=12))
    assert [g.token_ids for g in other] != [g.token_ids for g in a[:2]]
    # unseeded requests draw from the engine's generator: reproducible per engine seed
    unseeded = SamplingParams(temperature=1.0, max_tokens=10)
    x = EmbeddedEngine(model, seed=3).generate(prompts, unseeded)
    y = EmbeddedEngine(model, seed=3).generate(prompts, unseeded)
    assert [g.token_ids for g in x] == [g.token_ids for g in y]


def test_stop_tokens_and_limits(model):
    engine = EmbeddedEngine(model, vocab_size=REAL_VOCAB)
    prompt = _prompts([6], seed=5)[0]
    greedy = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=8))[0].token_ids
    k = next(i for i, t in enumerate(greedy) if t not in greedy[:i] and i >= 1)
    stopped = engine.generate([prompt, prompt], SamplingParams(
        temperature=0, max_tokens=8, stop_token_ids=[greedy[k]]))
    for gen in stopped:
        assert gen.token_ids == greedy[:k + 1] and gen.finish_reason == "stop"
        assert len(gen.logprobs) == k + 1
    short = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=2))[0]
    assert short.token_ids == greedy[:2] and short.finish_reason == "length"
    # the context bound ends a generation like max_tokens does
    bounded = EmbeddedEngine(model, vocab_size=REAL_VOCAB, max_context=len(prompt) + 3)
    gen = bounded.generate([prompt], SamplingParams(temperature=0, max_tokens=8))[0]
    assert gen.token_ids == greedy[:3] and gen.finish_reason == "length"
    with pytest.raises(ValueError, match="max_context"):
        bounded.generate([prompt + [1, 2, 3]], SamplingParams())


def test_shares_live_weights_versions_and_restores_mode(model):
    engine = EmbeddedEngine(model, vocab_size=REAL_VOCAB)
    prompt = _prompts([5], seed=6)[0]
    sp = SamplingParams(temperature=0, max_tokens=3)
    model.train()
    try:
        before = engine.generate([prompt], sp)[0]
        assert model.training  # mode restored
        assert before.weight_version == 0
        weight = model.output_layer.weight
        saved = weight.detach().clone()
        with torch.no_grad():  # an "optimizer step": the engine must see it without copying
            weight[before.token_ids[0]] *= -1.0  # the top logit changes sign
        assert engine.update_weights() == 1
        after = engine.generate([prompt], sp)[0]
        assert after.token_ids[0] != before.token_ids[0] and after.weight_version == 1
        model.eval()
        logits = _full_logits(model, [prompt])[0][-1]
        assert after.token_ids[0] == int(logits[:REAL_VOCAB].argmax())
        assert not model.training  # eval stays eval
        assert engine.update_weights(7) == 7
        with torch.no_grad():
            weight.copy_(saved)
    finally:
        model.eval()


def test_rejects_model_parallel_layouts(model):
    check_single_rank(model.config)  # one rank: fine
    for field_name in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                       "expert_model_parallel_size", "context_parallel_size"):
        config = copy.copy(model.config)
        setattr(config, field_name, 2)
        with pytest.raises(ValueError, match="HTTP engine"):
            EmbeddedEngine(SimpleNamespace(config=config))
