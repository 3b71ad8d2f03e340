"""Search environment: BM25 tools over the bundled corpus, HTTP adapter, hand-computed rewards."""
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from megatron_a1.envs import bundled_tasks, load_tasks, make
from megatron_a1.envs.search import HTTPSearch, SearchConfig, SearchEnv, token_f1


def call(name, **args):
    return {"type": "function", "function": {"name": name, "arguments": args}}


def traj(*rounds):
    """A trajectory with one assistant tool round per element (list of calls)."""
    msgs = [{"role": "user", "content": "q"}]
    for calls in rounds:
        msgs.append({"role": "assistant", "content": "", "tool_calls": calls})
        msgs += [{"role": "tool", "content": "r"} for _ in calls]
    return msgs


@pytest.fixture(scope="module")
def env():
    return make("search")


def test_tools_search_and_open(env):
    env.reset(bundled_tasks("search")[0])
    out = env.step(call("search", query="where was Marie Curie born"))
    assert out.splitlines()[0] == "[d1] Marie Curie"  # the only doc with both 'curie' and 'born'
    assert "Warsaw in 1867" in out
    assert env.step(call("open", doc_id="d5")).startswith("[d5] Vistula\nThe Vistula is")
    assert env.step(call("open", doc_id="nope")) == "Error: no document with id 'nope'."
    assert env.step(call("search", query="zzzz qqqq")) == "No results."
    assert env.step(call("browse", url="x")).startswith("Error: unknown tool 'browse'")


def test_reward_correct_wrong_partial(env):
    env.reset(bundled_tasks("search")[1])  # gold: "Baltic Sea", "the Baltic"
    r = env.reward({"role": "assistant", "content": "It flows into <answer>The Baltic sea.</answer>"},
                   traj([call("search", query="capital Warsaw")]))
    assert r["outcome"] == 1.0 and r["components"]["em"] == 1.0
    assert env.reward("<answer>North Sea</answer>", traj())["outcome"] == 0.0
    # partial: EM 0; F1 of "baltic ocean" vs "baltic sea" = 1/2, vs "baltic" (article dropped)
    # p = 1/2, r = 1 -> 2/3; the best gold counts
    env.config = SearchConfig(metric="f1")
    r = env.reward("<answer>Baltic Ocean</answer>", traj())
    assert r["outcome"] == pytest.approx(2 / 3) and r["components"]["em"] == 0.0
    env.config = SearchConfig()


def test_round_and_repetition_penalties():
    e = SearchEnv(SearchConfig(max_free_rounds=2, round_penalty=0.1, repeat_penalty=0.25))
    e.reset(bundled_tasks("search")[0])
    rounds = [[call("search", query="Marie Curie")], [call("search", query="marie  curie!")],
              [call("open", doc_id="d1")], [call("search", query="Warsaw")],
              [call("search", query="Warsaw"), call("search", query="warsaw")]]
    r = e.reward("<answer>Warsaw</answer>", traj(*rounds))
    # 5 rounds, K=2 -> 3 over -> 0.3; repeats: 'marie curie' once, 'warsaw' twice -> 3 * 0.25
    assert r["components"]["rounds"] == 5 and r["components"]["repeated_queries"] == 3
    assert r["components"]["penalty"] == pytest.approx(0.3 + 0.75)
    assert r["outcome"] == 0.0  # clipped at 0
    r = e.reward("<answer>Warsaw</answer>", traj(*rounds[:3]))
    assert r["outcome"] == pytest.approx(1.0 - 0.1 - 0.25)


def test_token_f1_hand_values():
    assert token_f1("the cat sat on mat", ["a cat sat"]) == pytest.approx(2 * (2 / 4) * 1 / (2 / 4 + 1))
    assert token_f1("", ["x"]) == 0.0


def test_http_backend_against_local_server():
    docs = {"a1": {"id": "a1", "title": "T", "text": "hello world"}}
    seen = []

    class H(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.path)
            body = (json.dumps({"results": list(docs.values())}) if self.path.startswith("/s")
                    else json.dumps(docs.get(self.path.rsplit("/", 1)[-1])))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *a):
            pass

    srv = HTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{srv.server_port}"
    try:
        env = SearchEnv(backend=HTTPSearch(base + "/s?q={query}&k={k}", base + "/d/{doc_id}",
                                           timeout_s=5))
        env.reset({"prompt": "x", "answers": ["y"]})
        assert env.step(call("search", query="hello there")) == "[a1] T\nhello world"
        assert seen[-1] == "/s?q=hello%20there&k=5"
        assert env.step(call("open", doc_id="a1")) == "[a1] T\nhello world"
    finally:
        srv.shutdown()
    dead = SearchEnv(backend=HTTPSearch(base + "/s?q={query}", timeout_s=1))
    assert dead.step(call("search", query="x")).startswith("Error: search service unavailable")


def test_user_task_file(tmp_path):
    p = tmp_path / "mine.jsonl"
    p.write_text('{"prompt": "2+2?", "answers": ["4"]}\n\n{"id": "b", "prompt": "x", "answers": []}\n')
    tasks = load_tasks(str(p))
    assert [t["id"] for t in tasks] == ["mine.jsonl:1", "b"]
    p.write_text('{"answers": ["4"]}\n')
    with pytest.raises(ValueError, match="mine.jsonl:1"):
        load_tasks(str(p))
