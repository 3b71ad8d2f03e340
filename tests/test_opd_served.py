"""OPD with a teacher served over HTTP (``opd.teacher_servers``): the co-located teacher is the
oracle.

* ``HTTPEngine.prompt_topk`` against our server on a live ``EmbeddedEngine`` equals the top-k of
  the log-softmax of the same model's full forward, for vLLM's ``/v1/completions`` and SGLang's
  ``/generate`` (ragged lengths, k > 1); vLLM's extra prompt-token entry and ties are handled;
  malformed answers raise ``EngineProtocolError``; unsupported requests answer 400;
* :class:`~megatron_a1.training.opd.ServedTeacher` addresses a pack's loss rows like the store
  and refuses ids outside the student's vocabulary;
* the trainer with the teacher served gives the same OPD losses and updated weights as the same
  teacher co-located (``opd.teachers``);
* a domain with two kinds of teacher, or a served domain without a URL, is a config error.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from megatron_a1.configs import ConfigError, load_config
from megatron_a1.rollout.http import (EngineHTTPError, EngineProtocolError, HTTPEngine,
                                      parse_sglang_prompt_topk, parse_vllm_prompt_topk)
from megatron_a1.rollout.server import make_server
from megatron_a1.testing import run_multirank
from megatron_a1.training.config import TrainConfig
from test_opd_teacher_topk import assert_trained_alike
from test_rollout_http import serving
from test_train_loop import base_overrides, train_body, write_dataset
from test_train_opd import opd_overrides

BACKENDS = ["vllm", "sglang"]
REAL_VOCAB = 100  # the "tokenizer" below the model's 128 rows: log-softmax over these only
# the trainer ranks and the served teacher run PyTorch paths (core attention, the co-located SVA
# oracle, the sorted top-k): fast, and the co-located oracle is the plain reference
TORCH_PATHS = {"TRITON_INTERPRET": "0"}


@pytest.fixture(scope="module")
def runtime():
    """One-rank megatron runtime in this process (the served engines run here)."""
    from megatron_a1.runtime import destroy, initialize
    from megatron_a1.testing.multirank import free_port

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {**TORCH_PATHS, "MASTER_ADDR": "127.0.0.1",
                     "MASTER_PORT": str(free_port())}.items():
            mp.setenv(k, v)
        yield initialize(seed=0)
        destroy()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(runtime):
    from megatron_a1.model.build import build_model
    from megatron_a1.model.config import preset

    cfg = preset("tiny_test")
    return build_model(cfg, cfg.to_transformer_config(None), pg_collection=runtime.pg_collection,
                       backend="local", max_seq_len=128).eval()


@pytest.fixture(scope="module")
def server(model):
    from megatron_a1.rollout.embedded import EmbeddedEngine

    with serving(EmbeddedEngine(model, vocab_size=REAL_VOCAB)) as s:
        yield s


def client(server, backend):
    return HTTPEngine(server.url, backend=backend, timeout_s=60.0, max_retries=1,
                      backoff_s=0.01, max_in_flight=4)


def sequences(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, REAL_VOCAB, (n,), generator=g).tolist() for n in lengths]


def full_topk(model, seq, k):
    """Top-k (descending, ties to the lower id) of the log-softmax over the real vocabulary of
    the model's packed full forward: rows 0..n-2, row t predicting token t+1."""
    from megatron_a1.model.parity import megatron_logits

    logits = megatron_logits(model, torch.tensor(seq), torch.tensor([0, len(seq)]))
    logp = logits[:-1, :REAL_VOCAB].float().log_softmax(-1)
    values, ids = logp.sort(dim=-1, descending=True, stable=True)
    return ids[:, :k].numpy(), values[:, :k].numpy()


def post(server, path, body):
    req = urllib.request.Request(server.url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# ----------------------------------------------------------------------------------------------
# Client and server
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_prompt_topk_equals_full_forward(model, server, backend):
    lengths = [7, 1, 2, 33, 70]  # ragged; 70 crosses the Gated DeltaNet chunk of 64
    seqs, k = sequences(lengths), 6
    with client(server, backend) as http:
        got = http.prompt_topk(seqs, k)
    assert len(got) == len(seqs)
    for seq, (ids, logprobs) in zip(seqs, got):
        assert ids.dtype == np.int64 and logprobs.dtype == np.float32
        assert ids.shape == logprobs.shape == (len(seq) - 1, k)
        if len(seq) < 2:
            continue
        want_ids, want_lp = full_topk(model, seq, k)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_allclose(logprobs, want_lp, rtol=0, atol=1e-5)
        assert (np.diff(logprobs, axis=1) <= 0).all()


def test_vllm_answer_holds_the_prompt_token_outside_the_topk(model, server):
    seq, k = sequences([40], seed=4)[0], 3
    status, answer = post(server, "/v1/completions",
                          {"prompt": seq, "max_tokens": 1, "prompt_logprobs": k,
                           "temperature": 0})
    assert status == 200, answer
    (choice,) = answer["choices"]
    rows = choice["prompt_logprobs"]
    assert rows[0] is None and len(rows) == len(seq)
    want_ids, want_lp = full_topk(model, seq, REAL_VOCAB)
    extra = 0
    for t, row in enumerate(rows[1:]):
        tok = seq[t + 1]
        top = {int(i) for i in want_ids[t, :k]}
        assert {int(i) for i in row} == top | {tok}
        rank = int(np.flatnonzero(want_ids[t] == tok)[0]) + 1
        assert row[str(tok)]["rank"] == rank
        assert row[str(tok)]["logprob"] == pytest.approx(float(want_lp[t, rank - 1]), abs=1e-5)
        extra += tok not in top
    assert extra > 5, "the sequence must have prompt tokens outside the top-k"
    assert len(choice["token_ids"]) == 1  # max_tokens 1: the greedy next token
    # the client keeps the k most likely of the k + 1 entries
    ids, _ = parse_vllm_prompt_topk(answer, len(seq), k)
    np.testing.assert_array_equal(ids, want_ids[:, :k])


def test_sglang_answer_has_input_logprobs(server):
    seq = sequences([12], seed=5)[0]
    status, answer = post(server, "/generate", {
        "input_ids": seq, "sampling_params": {"max_new_tokens": 1, "temperature": 0},
        "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 4})
    assert status == 200, answer
    meta = answer["meta_info"]
    assert len(meta["input_top_logprobs"]) == len(meta["input_token_logprobs"]) == len(seq)
    assert meta["input_top_logprobs"][0] is None and meta["input_token_logprobs"][0][0] is None
    assert [e[1] for e in meta["input_token_logprobs"]] == seq
    assert all(len(row) == 4 for row in meta["input_top_logprobs"][1:])
    assert len(answer["output_ids"]) == 1 and len(meta["output_token_logprobs"]) == 1


def _vllm(rows):
    return {"choices": [{"index": 0, "finish_reason": "length", "prompt_logprobs": rows}]}


def _entry(lp, rank):
    return {"logprob": lp, "rank": rank, "decoded_token": None}


def test_parsers_keep_the_k_most_likely_ties_to_the_lower_id():
    # position 1: the prompt token 9 (rank 5) comes first in the dict; position 2: a tie at -1.0
    # between ids 7 and 3 across the k-th place, the prompt token 7 listed as well
    rows = [None,
            {"9": _entry(-5.0, 5), "4": _entry(-0.5, 1), "2": _entry(-1.5, 2)},
            {"7": _entry(-1.0, 2), "5": _entry(-0.1, 1), "3": _entry(-1.0, 2)}]
    ids, lps = parse_vllm_prompt_topk(_vllm(rows), 3, 2)
    np.testing.assert_array_equal(ids, [[4, 2], [5, 3]])
    np.testing.assert_array_equal(lps, np.float32([[-0.5, -1.5], [-0.1, -1.0]]))
    sglang = {"meta_info": {"finish_reason": {"type": "length"}, "input_top_logprobs": [
        None, [[-1.5, 2, None], [-0.5, 4, None]],
        [[-1.0, 7, "x"], [-0.1, 5, None], [-1.0, 3, None]]]}}
    ids, lps = parse_sglang_prompt_topk(sglang, 3, 2)
    np.testing.assert_array_equal(ids, [[4, 2], [5, 3]])


@pytest.mark.parametrize("answer", [
    {},  # no choices
    _vllm([None, {"1": _entry(-1.0, 1), "2": _entry(-2.0, 2)}]),  # 2 entries for 3 tokens
    _vllm([None, {"1": _entry(-1.0, 1), "2": _entry(-2.0, 2)}, None]),  # a null position
    _vllm([None, {"1": _entry(-1.0, 1), "2": _entry(-2.0, 2)}, {"1": _entry(-1.0, 1)}]),  # < k
    _vllm([None, {"1": _entry(-1.0, 1), "x": _entry(-2.0, 2)}, {"1": _entry(-1.0, 1)}]),
    _vllm([None, {"1": _entry(-1.0, 1), "2": {"rank": 2}}, {"1": _entry(-1.0, 1)}]),
    _vllm([None, {"1": _entry(float("nan"), 1), "2": _entry(-2.0, 2)},
           {"1": _entry(-1.0, 1), "3": _entry(-2.0, 2)}]),
], ids=["no_choices", "short", "null_row", "fewer_than_k", "bad_id", "no_logprob", "nan"])
def test_malformed_vllm_answers_raise(answer):
    with pytest.raises(EngineProtocolError, match="malformed vLLM prompt_logprobs"):
        parse_vllm_prompt_topk(answer, 3, 2)


@pytest.mark.parametrize("meta", [
    {},
    {"input_top_logprobs": [None, [[-1.0, 1, None], [-2.0, 2, None]]]},
    {"input_top_logprobs": [None, [[-1.0, 1, None], [-2.0, 2, None]], [[-1.0]]]},
    {"input_top_logprobs": [None, [[-1.0, 1, None], [-2.0, 1, None]], [[-1.0, 1], [-3.0, 2]]]},
], ids=["missing", "short", "bad_entry", "repeated_id"])
def test_malformed_sglang_answers_raise(meta):
    with pytest.raises(EngineProtocolError, match="malformed SGLang input_top_logprobs"):
        parse_sglang_prompt_topk({"meta_info": meta}, 3, 2)


class _WrongRows:
    """An engine whose prompt log-probs miss the last position: the server's answer is short."""

    weight_version = 0

    def __init__(self, engine):
        self.engine = engine

    def prompt_logprobs(self, tokens, k):
        top = self.engine.prompt_logprobs(tokens, k)
        return type(top)(*(x[:-1] for x in top))

    def generate(self, prompts, sampling):
        return self.engine.generate(prompts, sampling)


@pytest.mark.parametrize("backend", BACKENDS)
def test_short_answer_from_a_live_server_raises(model, backend):
    from megatron_a1.rollout.embedded import EmbeddedEngine

    with serving(_WrongRows(EmbeddedEngine(model, vocab_size=REAL_VOCAB))) as s, \
            client(s, backend) as http:
        with pytest.raises(EngineProtocolError, match="one entry per prompt token"):
            http.prompt_topk(sequences([5]), 2)


def test_server_rejects_what_it_does_not_score(server):
    seq = [1, 2, 3]
    for body, msg in [
        ({"prompt": seq, "prompt_logprobs": 2, "max_tokens": 1, "n": 2}, "unsupported field"),
        ({"prompt": "hello", "prompt_logprobs": 2, "max_tokens": 1}, "token ids"),
        ({"prompt": seq, "max_tokens": 1}, "prompt_logprobs is required"),
        ({"prompt": seq, "prompt_logprobs": 2, "max_tokens": 5}, "max_tokens must be 0 or 1"),
        ({"prompt": seq, "prompt_logprobs": -1, "max_tokens": 1}, "non-negative"),
        ({"prompt": [1, 2, 300], "prompt_logprobs": 2, "max_tokens": 1}, "outside"),
    ]:
        status, answer = post(server, "/v1/completions", body)
        assert status == 400 and msg in answer["error"]["message"], (body, answer)
    for body, msg in [
        ({"input_ids": seq, "return_logprob": True, "top_logprobs_num": 2}, "prompt only"),
        ({"input_ids": seq, "return_logprob": True, "logprob_start_len": 1,
          "top_logprobs_num": 2}, "logprob_start_len must be 0"),
    ]:
        status, answer = post(server, "/generate", body)
        assert status == 400 and msg in answer["error"]["message"], (body, answer)
    from test_rollout_http import ToyEngine

    with serving(ToyEngine()) as toy, client(toy, "vllm") as http:
        with pytest.raises(EngineHTTPError, match="does not compute prompt log-probs"):
            http.prompt_topk([seq], 2)


# ----------------------------------------------------------------------------------------------
# ServedTeacher: rows of a THD pack
# ----------------------------------------------------------------------------------------------
def test_served_teacher_reads_the_packs_loss_rows(model, server):
    """Rows are addressed like the store's: pack row s + t of a document starting at s is the
    teacher's distribution after its tokens[:t+1]; every backend gives the same rows."""
    from megatron_a1.data.dataset import build_sample, collate_thd
    from megatron_a1.training.opd import ServedTeacher

    toks = sequences([9, 14, 6], seed=7)
    masks = [np.float32([0, 0, 1, 1, 0, 1, 1, 1, 0]), np.zeros(14, np.float32),
             np.float32([0, 1, 1, 0, 1, 0])]
    batches = []
    for order in ([0, 1, 2], [2, 0]):  # two micro-batches, documents in other places
        sample = build_sample([np.int64(toks[i]) for i in order], [masks[i] for i in order])
        sample.update(domains=["search"] * len(order), doc_ids=order, dataset_id=0)
        batches.append(collate_thd([sample]))
    rows = [b["loss_mask"][0].nonzero().squeeze(1) for b in batches]
    k = 4
    got = {}
    for backend in BACKENDS:
        teacher = ServedTeacher(server.url, backend, vocab_size=REAL_VOCAB)
        teacher.fetch(batches, rows, k)
        got[backend] = [teacher.gather(b, r, k) for b, r in zip(batches, rows)]
    for b, (batch, r) in enumerate(zip(batches, rows)):
        cu = batch["cu_seqlens"].tolist()
        want_ids, want_lp = [], []
        for row in r.tolist():
            i = max(j for j in range(len(cu) - 1) if cu[j] <= row)
            seq = batch["tokens"][0, cu[i]:cu[i + 1]].tolist()
            ids, lps = full_topk(model, seq, k)
            want_ids.append(ids[row - cu[i]])
            want_lp.append(lps[row - cu[i]])
        for backend in BACKENDS:
            ids, lps = got[backend][b]
            np.testing.assert_array_equal(ids.numpy(), np.stack(want_ids))
            np.testing.assert_allclose(lps.numpy(), np.stack(want_lp), rtol=0, atol=1e-5)
    with pytest.raises(RuntimeError, match="changed after prepare"):
        teacher.gather(batches[0], rows[0][:-1], k)
    small = ServedTeacher(server.url, "vllm", vocab_size=10)
    with pytest.raises(ValueError, match=rf"teacher server {server.url} returned token id \d+, "
                       "outside the student's vocabulary of 10"):
        small.fetch(batches, rows, k)


# ----------------------------------------------------------------------------------------------
# Through the trainer: served equals co-located
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("opd_served") / "rollouts"), n_docs=16,
                         seed=3)


@pytest.fixture(scope="module")
def setup(data, tmp_path_factory):
    """The student's init and a teacher (another seed's init: a different model, cheaply)."""
    root = tmp_path_factory.mktemp("opd_served_ckpt")
    init, teacher = str(root / "init"), str(root / "teacher")
    run_multirank(train_body, 1, args=(base_overrides(data, init, steps=0),), env=TORCH_PATHS)
    run_multirank(train_body, 1, args=(base_overrides(data, teacher, steps=0) + ["train.seed=7"],),
                  env=TORCH_PATHS)
    return data, init, teacher


def test_opd_step_with_served_teacher_equals_colocated(runtime, setup, tmp_path):
    """The search teacher co-located vs served (vLLM protocol, from this process): same losses,
    same weights after two optimizer steps (the tool domain keeps its co-located teacher)."""
    from megatron.core.dist_checkpointing.serialization import load_plain_tensors

    from megatron_a1.rollout.embedded import EmbeddedEngine
    from megatron_a1.training import checkpoint as ckpt
    from megatron_a1.training.model_setup import build_model_chunks
    from megatron_a1.training.opd import load_frozen

    data, init, teacher = setup
    colocated = opd_overrides(data, str(tmp_path / "a"), init, {"search": teacher, "tool": init})
    cfg = load_config(TrainConfig, None, colocated)
    engine = EmbeddedEngine(load_frozen(cfg, runtime, teacher, build_model_chunks))
    with serving(engine) as s:
        served = opd_overrides(data, str(tmp_path / "b"), init, {"tool": init}) + [
            f"opd.teacher_servers={{search: '{s.url}'}}"]
        [ref] = run_multirank(train_body, 1, args=(colocated,), env=TORCH_PATHS)
        [got] = run_multirank(train_body, 1, args=(served,), env=TORCH_PATHS)
        assert s.state.hits["/v1/completions"] > 0
    assert ref["losses"][0] > 1e-3
    np.testing.assert_allclose(got["losses"], ref["losses"], rtol=1e-5, atol=1e-7)

    def weights(d):
        return {k: v for k, v in load_plain_tensors(ckpt.latest_checkpoint(d)).items()
                if torch.is_tensor(v) and not k.startswith("optimizer")}

    assert_trained_alike(*(weights(d) for d in (ref["checkpoint_dir"], got["checkpoint_dir"],
                                                init)))


# ----------------------------------------------------------------------------------------------
# Config errors
# ----------------------------------------------------------------------------------------------
def _validate(data, tmp_path, teachers, *extra):
    cfg = load_config(TrainConfig, None,
                      opd_overrides(data, str(tmp_path), str(tmp_path), teachers) + list(extra))
    cfg.validate(1)


def test_a_domain_has_one_kind_of_teacher(data, tmp_path):
    with pytest.raises(ConfigError, match=r"opd.teacher_servers: domain 'search' is also in "
                       "opd.teachers; a domain has one teacher"):
        _validate(data, tmp_path, {"search": str(tmp_path), "tool": str(tmp_path)},
                  "opd.teacher_servers={search: 'http://127.0.0.1:1'}")
    with pytest.raises(ConfigError, match=r"opd.teacher_servers: domain 'tool' is also in "
                       "opd.teacher_topk"):
        _validate(data, tmp_path, {"search": str(tmp_path)},
                  f"opd.teacher_topk={{tool: {tmp_path}}}",
                  "opd.teacher_servers={tool: 'http://127.0.0.1:1'}")


@pytest.mark.parametrize("url", ["''", "node3:8100", "null"])
def test_a_served_domain_needs_a_url(data, tmp_path, url):
    # null is refused by the loader (not a string), the others by validate
    with pytest.raises(ConfigError, match="opd.teacher_servers.tool: (give the teacher server's "
                       "base URL|expected a string)"):
        _validate(data, tmp_path, {"search": str(tmp_path)}, f"opd.teacher_servers={{tool: {url}}}")


def test_served_teachers_alone_are_a_valid_opd_config(data, tmp_path):
    cfg = load_config(TrainConfig, None, opd_overrides(data, str(tmp_path), str(tmp_path), {}) + [
        "opd.teacher_servers={search: 'http://a:1', tool: 'http://a:1'}",
        "opd.teacher_server_backend=sglang"])
    cfg.validate(1)
    from megatron_a1.training.opd import build_servers

    servers = build_servers(cfg, vocab_size=128)
    assert servers["search"] is servers["tool"] and servers["tool"].engine.backend == "sglang"
    assert servers["tool"].vocab_size == 128
