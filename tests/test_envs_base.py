"""Environment registry, task loading and the shared helpers."""
import pytest

from megatron_a1.envs import Environment, bundled_tasks, call_name_args, make, register, registry


def test_builtin_domains_and_bundled_tasks():
    assert {"search", "science", "instruction", "tool"} <= set(registry())
    for domain in ("search", "science", "instruction", "tool"):
        tasks = bundled_tasks(domain)
        assert len(tasks) >= 3 and len({t["id"] for t in tasks}) == len(tasks)
        env = make(domain)
        msgs = env.reset(tasks[0])
        assert msgs == [{"role": "user", "content": tasks[0]["prompt"]}]


def test_user_registered_environment():
    @register("echo-test")
    class Echo(Environment):
        def reward(self, final_message, trajectory):
            return {"outcome": float(final_message == self.task["prompt"]), "process": None,
                    "components": {}}

    env = make("echo-test")
    assert env.reset({"prompt": "hi", "system": "be brief"}) == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert env.reward("hi", [])["outcome"] == 1.0 and env.reward("ho", [])["outcome"] == 0.0
    with pytest.raises(KeyError, match="unknown environment"):
        make("no-such-domain")


def test_call_name_args_forms():
    assert call_name_args({"function": {"name": "f", "arguments": '{"a": 1}'}}) == ("f", {"a": 1})
    assert call_name_args({"name": "g", "arguments": {"b": 2}}) == ("g", {"b": 2})
    assert call_name_args({"function": {"name": "h", "arguments": "not json"}}) == ("h", "not json")
