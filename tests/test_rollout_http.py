"""HTTPEngine <-> our token-in/token-out server, for vLLM's and SGLang's protocols.

The served engine is a deterministic test double (:class:`ToyEngine`: logits a fixed function of
the context and a "weight" read from a checkpoint dir, sampling seeded by the request); the
point is the HTTP round trip: exact ids and log-probs in prompt order with many requests in
flight, timeouts/5xx retried, 4xx not, pause and weight-update semantics, version tags. When
``megatron_a1.rollout.embedded`` exists, one test serves a real ``EmbeddedEngine`` on a tiny
random model.
"""
import contextlib
import importlib.util
import json
import math
import os
import random
import subprocess
import sys
import threading
import time

import pytest

from megatron_a1.rollout.engine import Engine, Generation, SamplingParams
from megatron_a1.rollout.http import (EngineHTTPError, EngineUnavailableError, HTTPEngine,
                                      parse_sglang, parse_vllm)
from megatron_a1.rollout.server import make_server
from megatron_a1.rollout.weight_sync import weight_sync_for

BACKENDS = ["vllm", "sglang"]
GEN_PATH = {"vllm": "/inference/v1/generate", "sglang": "/generate"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ToyEngine:
    """A deterministic :class:`Engine`: logits are a fixed function of the context and
    ``shift`` (its "weights"); a request's randomness comes from its seed, else its prompt."""

    def __init__(self, vocab: int = 37, shift: float = 0.0, delay_s: float = 0.0):
        self.vocab, self.shift, self.delay_s = vocab, shift, delay_s
        self.weight_version = 0
        self.fail_next = 0  # the next n calls raise (the server answers 500)
        self.started = threading.Event()

    def _logits(self, ctx):
        last, n = ctx[-1], len(ctx)
        return [3.0 * math.sin(0.7 * j * (last + 1) + 0.31 * n + self.shift)
                for j in range(self.vocab)]

    def generate(self, prompts, sampling):
        self.started.set()
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("injected engine failure")
        return [self._one(list(p), sampling) for p in prompts]

    def _one(self, prompt, s: SamplingParams) -> Generation:
        if any(t >= self.vocab for t in prompt):
            raise ValueError(f"token id {max(prompt)} is out of vocabulary (size {self.vocab})")
        rng = random.Random(s.seed if s.seed is not None else hash(tuple(prompt)))
        ctx, ids, lps = list(prompt), [], []
        for _ in range(s.max_tokens):
            z = self._logits(ctx)
            m = max(z)
            logz = m + math.log(sum(math.exp(v - m) for v in z))
            if s.temperature == 0:
                tok = max(range(self.vocab), key=z.__getitem__)
            else:
                order = sorted(range(self.vocab), key=lambda j: -z[j])
                if s.top_k > 0:
                    order = order[:s.top_k]
                w = [math.exp((z[j] - m) / s.temperature) for j in order]
                tok = rng.choices(order, weights=w)[0]
            ids.append(tok)
            lps.append(z[tok] - logz)
            ctx.append(tok)
            if tok in s.stop_token_ids:
                return Generation(token_ids=ids, logprobs=lps, finish_reason="stop",
                                  weight_version=self.weight_version)
        return Generation(token_ids=ids, logprobs=lps, finish_reason="length",
                          weight_version=self.weight_version)


def write_checkpoint(path, shift: float) -> str:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "shift.json"), "w") as f:
        json.dump({"shift": shift}, f)
    return str(path)


def toy_reload(engine: ToyEngine):
    def reload(path):
        with open(os.path.join(path, "shift.json")) as f:
            engine.shift = json.load(f)["shift"]
    return reload


@contextlib.contextmanager
def serving(engine, reload=None):
    server = make_server(engine, reload=reload)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def client(server, backend="vllm", **kw):
    kw = {"timeout_s": 30.0, "max_retries": 2, "backoff_s": 0.01, "max_in_flight": 16, **kw}
    return HTTPEngine(server.url, backend=backend, **kw)


def prompts_for(n, vocab=37, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(1, 9))] for _ in range(n)]


def assert_same(got: list[Generation], want: list[Generation]):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.token_ids == w.token_ids, i
        assert g.logprobs == w.logprobs, i  # bit-exact: JSON round-trips Python floats
        assert g.finish_reason == w.finish_reason, i
        assert g.weight_version == w.weight_version, i


def wait_for(cond, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


SAMPLINGS = {
    "sampled": SamplingParams(temperature=0.8, max_tokens=12, stop_token_ids=[5, 11]),
    "seeded_topk": SamplingParams(temperature=1.3, top_k=5, max_tokens=9, seed=7),
    "greedy": SamplingParams(temperature=0.0, max_tokens=6, stop_token_ids=[3]),
}


# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", list(SAMPLINGS))
def test_round_trip_equals_in_process(backend, which):
    engine, sampling = ToyEngine(), SAMPLINGS[which]
    prompts = prompts_for(40, seed=len(which))
    want = engine.generate(prompts, sampling)
    assert {w.finish_reason for w in want} <= {"stop", "length"}
    with serving(engine) as server, client(server, backend) as http:
        assert isinstance(http, Engine)
        got = http.generate(prompts, sampling)
        assert server.state.hits[GEN_PATH[backend]] == len(prompts)
    assert_same(got, want)


def test_many_in_flight_keep_prompt_order():
    engine = ToyEngine(delay_s=0.002)
    prompts = prompts_for(64, seed=5)
    sampling = SAMPLINGS["sampled"]
    want = engine.generate(prompts, sampling)
    with serving(engine) as server, client(server, max_in_flight=32) as http:
        results = {}

        def run(k):  # two callers share one client and its pool
            results[k] = http.generate(prompts[k::2], sampling)

        threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert_same(results[0], want[0::2])
    assert_same(results[1], want[1::2])


def test_timeout_is_retried_then_fails_clearly():
    engine = ToyEngine(delay_s=1.0)
    with serving(engine) as server, client(server, timeout_s=0.25, max_retries=2) as http:
        t0 = time.monotonic()
        with pytest.raises(EngineUnavailableError, match=r"failed 3 time\(s\).*timed out"):
            http.generate([[1, 2, 3]], SAMPLINGS["greedy"])
        assert time.monotonic() - t0 < 5
        assert server.state.hits["/inference/v1/generate"] == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_5xx_is_retried_then_succeeds(backend):
    engine = ToyEngine()
    want = engine.generate([[4, 2]], SAMPLINGS["sampled"])
    engine.fail_next = 2
    with serving(engine) as server, client(server, backend, max_retries=2) as http:
        got = http.generate([[4, 2]], SAMPLINGS["sampled"])
        assert server.state.hits[GEN_PATH[backend]] == 3
    assert_same(got, want)


def test_5xx_exhausts_retries_with_the_server_message():
    engine = ToyEngine()
    engine.fail_next = 10
    with serving(engine) as server, client(server, max_retries=1) as http:
        with pytest.raises(EngineUnavailableError, match="HTTP 500.*injected engine failure"):
            http.generate([[4, 2]], SAMPLINGS["sampled"])
        assert server.state.hits["/inference/v1/generate"] == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_4xx_is_not_retried(backend):
    with serving(ToyEngine(vocab=37)) as server, client(server, backend, max_retries=3) as http:
        with pytest.raises(EngineHTTPError, match="out of vocabulary") as e:
            http.generate([[1, 99]], SAMPLINGS["greedy"])
        assert e.value.status == 400
        with pytest.raises(EngineHTTPError, match="non-empty list"):
            http.generate([[]], SAMPLINGS["greedy"])
        assert server.state.hits[GEN_PATH[backend]] == 2


def test_connection_refused_is_retried():
    server = make_server(ToyEngine())
    url = server.url
    server.server_close()  # nothing listens there any more
    http = HTTPEngine(url, max_retries=2, backoff_s=0.01, timeout_s=2)
    with pytest.raises(EngineUnavailableError, match=r"failed 3 time\(s\)"):
        http.generate([[1]], SAMPLINGS["greedy"])
    assert not http.health()


# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_update_tags_the_next_generations(backend, tmp_path):
    engine = ToyEngine()
    prompts, sampling = prompts_for(6, seed=9), SAMPLINGS["sampled"]
    ref = ToyEngine()
    with serving(engine, reload=toy_reload(engine)) as server, client(server, backend) as http:
        sync = weight_sync_for(http)
        assert_same(http.generate(prompts, sampling), ref.generate(prompts, sampling))

        assert sync.update_from_disk(write_checkpoint(tmp_path / "a", 1.5), version=3) == 3
        assert http.weight_version == 3 and server.state.weight_version == 3
        ref.shift, ref.weight_version = 1.5, 3
        got = http.generate(prompts, sampling)
        assert_same(got, ref.generate(prompts, sampling))
        assert {g.weight_version for g in got} == {3}

        assert sync.update_from_disk(write_checkpoint(tmp_path / "b", -0.5)) == 4  # default +1
        ref.shift, ref.weight_version = -0.5, 4
        assert_same(http.generate(prompts, sampling), ref.generate(prompts, sampling))
        assert not server.state.paused
        info = http.client.request("GET", "/weight_info" if backend == "vllm" else "/model_info")
        assert info["weight_version"] == "4"
        assert server.state.hits["/collective_rpc" if backend == "vllm"
                                 else "/update_weights_from_disk"] == 2


def test_versions_fall_back_to_the_client_when_the_server_reports_none():
    vllm = {"choices": [{"index": 0, "token_ids": [7, 2], "finish_reason": "length",
                         "logprobs": {"content": [{"token": "token_id:7", "logprob": -0.5},
                                                  {"token": "token_id:2", "logprob": -1.25}]}}]}
    g = parse_vllm(vllm, 11)
    assert (g.token_ids, g.logprobs, g.finish_reason, g.weight_version) == (
        [7, 2], [-0.5, -1.25], "length", 11)
    sgl = {"text": "", "output_ids": [9], "meta_info": {
        "finish_reason": {"type": "stop", "matched": 9}, "weight_version": "default",
        "output_token_logprobs": [[-0.125, 9, None]]}}
    g = parse_sglang(sgl, 4)
    assert (g.token_ids, g.logprobs, g.finish_reason, g.weight_version) == (
        [9], [-0.125], "stop", 4)


def test_failed_update_leaves_server_paused_and_version_unchanged(tmp_path):
    engine = ToyEngine()
    with serving(engine) as server, client(server) as http:  # no loader: updates answer 400
        sync = weight_sync_for(http)
        with pytest.raises(EngineHTTPError, match="without a weight loader"):
            sync.update_from_disk(str(tmp_path), version=5)
        assert http.weight_version == 0 and server.state.weight_version == 0
        assert server.state.paused
        sync.resume()
        assert http.generate([[1, 2]], SAMPLINGS["greedy"])[0].weight_version == 0
        with pytest.raises(ValueError, match="absolute"):
            sync.update_from_disk("relative/dir")


@pytest.mark.parametrize("backend", BACKENDS)
def test_pause_holds_new_requests_until_resume(backend):
    engine = ToyEngine()
    want = engine.generate([[3, 1, 4]], SAMPLINGS["sampled"])
    with serving(engine) as server, client(server, backend) as http:
        sync = weight_sync_for(http)
        sync.pause("wait" if backend == "vllm" else "in_place")
        assert server.state.paused
        out = {}
        t = threading.Thread(target=lambda: out.update(g=http.generate([[3, 1, 4]],
                                                                      SAMPLINGS["sampled"])))
        t.start()
        wait_for(lambda: server.state.queued == 1)
        time.sleep(0.3)
        assert t.is_alive() and "g" not in out  # held by the server, not failed
        sync.resume()
        t.join(10)
    assert_same(out["g"], want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pause_abort_aborts_queued_requests_which_the_client_resends(backend):
    engine = ToyEngine(delay_s=0.4)
    prompts, sampling = [[1, 2], [2, 3]], SAMPLINGS["sampled"]
    want = ToyEngine().generate(prompts, sampling)
    with serving(engine) as server, client(server, backend, backoff_s=0.05) as http:
        sync = weight_sync_for(http)
        out = {}
        t = threading.Thread(target=lambda: out.update(g=http.generate(prompts, sampling)))
        t.start()
        path = GEN_PATH[backend]
        wait_for(lambda: engine.started.is_set() and server.state.queued == 1)
        sync.pause("abort")  # returns once the running request finished
        wait_for(lambda: server.state.hits[path] == 3 and server.state.queued == 1)
        time.sleep(0.2)
        assert t.is_alive()  # the aborted request was sent again and waits for resume
        sync.resume()
        t.join(10)
    assert_same(out["g"], want)


def test_server_rejects_unsupported_requests():
    with serving(ToyEngine()) as server, client(server) as http:
        c = http.client
        with pytest.raises(EngineHTTPError, match="reload_weights only"):
            c.request("POST", "/collective_rpc", {"method": "sleep"})
        with pytest.raises(EngineHTTPError, match="batched input_ids"):
            c.request("POST", "/generate", {"input_ids": [[1], [2]], "sampling_params": {}})
        with pytest.raises(EngineHTTPError, match="mode must be"):
            c.request("POST", "/pause?mode=never")
        with pytest.raises(EngineHTTPError, match="404.*no route"):
            c.request("GET", "/v1/models")
        assert c.request("GET", "/is_paused") == {"is_paused": False}
        assert http.health()


def test_serve_embedded_help():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "serve_embedded.py"), "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "--checkpoint" in r.stdout and "--preset" in r.stdout


# ----------------------------------------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("megatron_a1.rollout.embedded") is None,
                    reason="megatron_a1.rollout.embedded not written yet")
def test_served_embedded_engine_equals_in_process():
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import serve_embedded

    from megatron_a1.runtime import destroy, initialize

    initialize(seed=3)
    try:
        engine = serve_embedded.build_engine(preset="tiny_test", seed=0, checkpoint=None)
        vocab = serve_embedded.vocab_size(engine)
        prompts = prompts_for(3, vocab=vocab, seed=1)
        # the server runs one request per engine call: compare with one prompt per call
        sampling = SamplingParams(temperature=1.0, max_tokens=5, seed=11)
        want = [engine.generate([p], sampling)[0] for p in prompts]
        greedy = SamplingParams(temperature=0.0, max_tokens=4)
        want_greedy = [engine.generate([p], greedy)[0] for p in prompts[:2]]
        with serving(engine) as server, client(server, max_in_flight=4) as http:
            assert_same(http.generate(prompts, sampling), want)
            assert_same(http.generate(prompts[:2], greedy), want_greedy)
    finally:
        destroy()
