"""Tool-use environment: stateful JSON-schema functions; outcome and process rewards by hand."""
import json

import pytest

from megatron_a1.envs import bundled_tasks, make
from megatron_a1.rollout import parse_assistant


def call(name, **args):
    return {"type": "function", "function": {"name": name, "arguments": args}}


def run(env, task, rounds):
    """Play ``rounds`` (lists of calls) through ``step``; return (trajectory, responses)."""
    msgs = env.reset(task)
    responses = []
    for calls in rounds:
        msgs.append({"role": "assistant", "content": "", "tool_calls": calls})
        for c in calls:
            responses.append(env.step(c))
            msgs.append({"role": "tool", "content": responses[-1]})
    return msgs, responses


@pytest.fixture
def tasks():
    return {t["id"]: t for t in bundled_tasks("tool")}


def test_correct_episode(tasks):
    env = make("tool")
    traj, resp = run(env, tasks["tool-1"], [[call("find_orders", customer="ana")],
                                            [call("cancel_order", order_id="o1")]])
    assert [o["order_id"] for o in json.loads(resp[0])] == ["o1", "o2"]
    assert json.loads(resp[1])["status"] == "cancelled"
    assert env.db["orders"]["o1"]["status"] == "cancelled"
    assert tasks["tool-1"]["db"]["orders"]["o1"]["status"] == "pending"  # task not mutated
    r = env.reward({"role": "assistant", "content": "Cancelled o1 (total 30.5)."}, traj)
    assert r == {"outcome": 1.0, "process": 1.0, "components": {
        "state_match": 1.0, "answer_match": 1.0, "valid_calls": 2, "calls": 2}}
    # right state, answer lacks the total
    assert env.reward("Done.", traj)["outcome"] == 0.0


def test_invalid_calls_schema_and_state(tasks):
    env = make("tool")
    rounds = [[call("cancel_order", order_id="o2")],                 # shipped: state forbids
              [call("cancel_order", order_id=2)],                    # schema: not a string
              [call("cancel_order", order_id="o9")],                 # no such order
              [call("refund", order_id="o1")],                       # unknown function
              [call("update_address", order_id="o3", address="x")],  # minLength 5
              [{"type": "function", "function": {"name": "update_address",  # JSON-string args
                "arguments": '{"order_id": "o3", "address": "42 Oak Ave"}'}}]]
    traj, resp = run(env, tasks["tool-2"], rounds)
    assert resp[0] == ("Error: cancel_order needs status='pending', but orders 'o2' has "
                       "status='shipped'")
    assert resp[1].startswith("Error: invalid arguments for cancel_order: order_id:")
    assert resp[2] == "Error: no orders with order_id='o9'"
    assert resp[3].startswith("Error: unknown function 'refund'")
    assert resp[4].startswith("Error: invalid arguments for update_address: address:")
    assert env.calls == [False, False, False, False, False, True]
    r = env.reward("Updated.", traj)
    assert r["outcome"] == 1.0 and r["process"] == pytest.approx(1 / 6)


def test_wrong_final_state_partial_process(tasks):
    env = make("tool")
    traj, _ = run(env, tasks["tool-1"], [[call("get_order", order_id="o1"),
                                          call("cancel_order", order_id="o3")],
                                         [call("cancel_order", order_id="o3")]])
    r = env.reward("Cancelled, total 30.5", traj)  # cancelled bo's order, not ana's
    assert r["outcome"] == 0.0 and r["components"]["state_match"] == 0.0
    assert r["process"] == pytest.approx(2 / 3)  # the second cancel of o3 is invalid


def test_no_calls_gives_zero_process(tasks):
    env = make("tool")
    env.reset(tasks["tool-3"])
    r = env.reward("It is shipped.", env.reset(tasks["tool-3"]))
    assert r["outcome"] == 1.0 and r["process"] == 0.0


def test_parsed_model_output_drives_the_environment(tasks):
    env = make("tool")
    env.reset(tasks["tool-2"])
    text = ("<think>\nchange it\n</think>\n\n<tool_call>\n<function=update_address>\n"
            "<parameter=order_id>\no3\n</parameter>\n<parameter=address>\n42 Oak Ave\n"
            "</parameter>\n</function>\n</tool_call>")
    parsed = parse_assistant(text, env.tools())
    assert parsed["errors"] == []
    out = json.loads(env.step(parsed["tool_calls"][0]))
    assert out["address"] == "42 Oak Ave"
    traj = [{"role": "user", "content": "x"}, {"role": "assistant", **parsed}]
    assert env.reward("ok", traj)["outcome"] == 1.0
