"""Instruction-following environment: constraint checkers and reward on hand-made answers."""
import pytest

from megatron_a1.envs import bundled_tasks, make
from megatron_a1.envs.instruction import check_constraints


@pytest.mark.parametrize("text,constraint,ok", [
    ("one two three", {"type": "words", "min": 3, "max": 3}, True),
    ("one two three four", {"type": "words", "max": 3}, False),
    ("Hi. How are you? Fine!", {"type": "sentences", "min": 3, "max": 3}, True),
    ("Hi. How are you?", {"type": "sentences", "min": 3}, False),
    ("a\n***\nb\n***\nc", {"type": "paragraphs", "count": 3}, True),
    ("a\n\nb", {"type": "paragraphs", "count": 2}, False),
    ("The Health of health-care", {"type": "keywords_include", "keywords": ["health", "care"]}, True),
    ("healthy food", {"type": "keywords_include", "keywords": ["health"]}, False),
    ("a cat", {"type": "keywords_exclude", "keywords": ["dog"]}, True),
    ("a Dog.", {"type": "keywords_exclude", "keywords": ["dog"]}, False),
    ("health, health and health", {"type": "keyword_frequency", "keyword": "health",
                                   "relation": "exactly", "count": 3}, True),
    ("health", {"type": "keyword_frequency", "keyword": "health", "relation": "at_least",
                "count": 2}, False),
    ("banana", {"type": "letter_frequency", "letter": "A", "relation": "at_least", "count": 3}, True),
    ('```json\n{"a": [1, 2]}\n```', {"type": "json_format"}, True),
    ('{"a": 1', {"type": "json_format"}, False),
    ("all lower 123", {"type": "lowercase"}, True),
    ("not All lower", {"type": "lowercase"}, False),
    ("SHOUT 1!", {"type": "uppercase"}, True),
    ("* a\n* b\n- c\ntext * not", {"type": "bullet_count", "count": 3}, True),
    ("* a\n* b", {"type": "bullet_count", "count": 3}, False),
    ("<<My Title>>\nbody", {"type": "title"}, True),
    ("<<>> body", {"type": "title"}, False),
    ("... Any other questions?  \n", {"type": "end_phrase", "phrase": "Any other questions?"}, True),
    ("Any other questions? Yes.", {"type": "end_phrase", "phrase": "Any other questions?"}, False),
    ("Dear all, hi", {"type": "start_phrase", "phrase": "Dear"}, True),
    ("no commas here", {"type": "no_commas"}, True),
    ("one, two", {"type": "no_commas"}, False),
    ("Hi [name] at [address]", {"type": "placeholders", "count": 2}, True),
    ("Hi [name]", {"type": "placeholders", "count": 2}, False),
    ('"quoted"', {"type": "quotation"}, True),
    ('"half', {"type": "quotation"}, False),
    ("body\nP.S. bye", {"type": "postscript"}, True),
    ("body P.S. inline", {"type": "postscript"}, False),
    ("*one* and *two*", {"type": "highlighted_sections", "count": 2}, True),
])
def test_checkers(text, constraint, ok):
    assert check_constraints(text, [constraint]) == [ok]


def test_reward_all_partial_none():
    env = make("instruction")
    env.reset(bundled_tasks("instruction")[1])  # 3 bullets, 'health' >= 2, end phrase
    good = ("* better health\n* more energy\n* mental health\nAny other questions?")
    r = env.reward({"role": "assistant", "content": good, "reasoning_content": "x, y"}, [])
    assert r["outcome"] == 1.0 and r["components"]["fraction"] == 1.0
    partial = "* better health\n* more energy\nAny other questions?"  # 2 bullets, 1 'health'
    r = env.reward(partial, [])
    assert r["outcome"] == 0.0 and r["components"]["fraction"] == pytest.approx(1 / 3)
    assert r["components"]["0:bullet_count"] == 0.0 and r["components"]["2:end_phrase"] == 1.0
    assert env.reward("nothing", [])["components"]["fraction"] == 0.0


def test_unknown_constraint_is_a_task_error():
    with pytest.raises(KeyError):
        check_constraints("x", [{"type": "no_such_checker"}])


def test_no_tools():
    env = make("instruction")
    env.reset(bundled_tasks("instruction")[0])
    assert env.tools() == []
    assert env.step({"function": {"name": "x", "arguments": {}}}).startswith("Error: unknown tool")
