"""The token-exact agent loop: episodes in token ids, batched across episodes, one record each.

    cfg = AgentConfig(max_turns=8, sampling=SamplingParams(temperature=1.0))
    records = run_episodes(engine, [(make("tool"), task)], tokenizer, cfg)
    groups = group_rollouts(engine, {"tool": tasks}, 8, tokenizer, cfg)   # GRPO groups
    print(RolloutStats.from_records(records, seconds).table())

An episode renders its prompt **once** (:func:`~megatron_a1.data.render.render_prompt`, the same
renderer SFT uses) and from then on only appends ids: the ids the engine sampled, exactly as
sampled (never decoded and encoded again), and the template's tool-response turn
(:func:`~megatron_a1.data.render.render_tool_responses`). Each turn:

1. every live episode's context goes to the engine; requests are batched across episodes into
   one ``engine.generate`` call per distinct seed (one call when ``seed`` is None; with a seed,
   one call per ``sample_index``, because an HTTP engine gives every request of a call the same
   seed and identical prompts must not share one). ``max_tokens`` of the call is the largest
   budget in it; a longer generation is cut to its episode's own budget afterwards, which is
   exactly a sample under the smaller limit (sampling is left to right);
2. the turn's text (its ids up to ``<|im_end|>``, decoded only to read it) is parsed with
   :func:`~megatron_a1.rollout.parse.parse_assistant`; each tool call runs in the episode's
   environment; a malformed call's error text is the tool response the model sees for it;
3. the responses are appended (loss mask 0) with the next generation header, and the loop goes
   on, until one of the finish reasons below.

Finish reasons: ``stop`` (a turn without tool calls: the final answer; also a turn that ended in a
stop token other than ``<|im_end|>``), ``length`` (a turn reached ``max_turn_tokens`` before
``<|im_end|>``), ``max_tokens`` (the episode sampled ``max_tokens`` in total), ``context_limit``
(the next turn, or the tool responses, would not fit in ``context_limit``), ``max_turns``
(``max_turns`` assistant turns made tool calls; their responses are appended, no header).

The record (one JSON object per episode) is the data pipeline's trajectory record
(``messages``/``tools``/``domain``/``id``; :func:`megatron_a1.data.records.parse_record` reads it
and ``tools/preprocess_trajectories.py`` renders it) plus what GRPO/OPD train on
(:mod:`megatron_a1.training.rollout_groups` reads it):

* ``messages``: the environment's initial messages, then per turn the assistant message as parsed
  (``reasoning_content``, ``content``, ``tool_calls`` with ids ``call_<turn>_<k>`` and object
  ``arguments``) and one ``tool`` message per attempted call, in the order the calls were written
  (a malformed call's message has no ``tool_call_id``). A turn whose every call was malformed is
  recorded as what the model wrote (its raw text as ``content``, no ``tool_calls``) followed by a
  ``user`` message holding the ``<tool_response>`` blocks; the template renders both exactly as
  the model saw them, and a user turn of tool responses is not a query to the template.
* ``tokens``: prompt + sampled + tool-response ids, as the model saw them; a trailing ``\\n`` (the
  template's glue after the last ``<|im_end|>``, loss mask 0) when the episode ends after a
  complete turn, so the record equals the template's rendering of ``messages``.
* ``loss_mask``: 1 exactly on the sampled ids (the forced ``<think>\\n`` header is prompt, 0).
* ``logprobs``: the engine's log-prob of each sampled id, 0.0 elsewhere (same length).
* ``rewards``: ``env.reward(final assistant message, messages)`` (``outcome``, ``process``,
  ``components``).
* ``weight_version``: ``{"min", "max", "turns": [version per turn]}`` — ``min`` is the oldest
  policy that sampled any token (what a staleness bound checks).
* ``finish_reason``, ``prompt_id`` (the task id), ``sample_index``, ``id`` (``prompt_id/sample``),
  ``prompt_length`` (tokens before the first sampled one), ``enable_thinking``.
* ``stats``: ``turns``, ``tool_calls`` (parsed calls executed), ``tool_errors`` (responses of the
  environment that start with ``Error`` — the bundled environments' convention),
  ``malformed_calls``,
  ``argument_errors`` (values that did not fit the schema; the call still ran),
  ``ignored_text`` (text written after tool calls, dropped by the template), ``sampled_tokens``,
  ``truncated_turn`` and the re-render check below.

Token exactness (:func:`rerender_check`, run on every record): ``messages`` rendered by the data
pipeline's renderer must give ``tokens`` back, and the renderer's loss mask must agree with
``loss_mask``. The renderer marks the whole assistant turn after ``<|im_start|>assistant\\n``,
including the generation header that the rollout had in its prompt (``<think>\\n``, or the empty
think block without thinking), so turns are compared as *header + sampled ids*. Per turn whose
ids differ: same text → ``retokenization_mismatch`` (the model sampled a non-canonical
tokenisation, e.g. ``"hel"+"lo"``; the sampled ids are kept for training); different text →
``text_mismatch`` (the parse normalised it: whitespace the template trims, dropped malformed or
trailing text). ``context_mismatch`` counts differences outside the sampled turns (a bug if ever
non-zero). ``rerender_exact`` says the whole record re-renders token for token. A final turn that
did not end with ``<|im_end|>`` cannot be rendered by the template and is left out of the check.

Past reasoning. The Qwen3.5 template drops ``reasoning_content`` of assistant turns *before the
last user query*. In an agent episode every assistant turn follows the one query (tool results
come back as user turns of ``<tool_response>`` blocks, which the template does not count as
queries), so every turn keeps its reasoning and the episode is prefix-consistent: the prompt of
turn k is exactly the rendering of the first k-1 turns plus the header (tested against the
template with jinja).
"""
from __future__ import annotations

import copy
import json
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Sequence

from megatron_a1.data.records import parse_messages, parse_tools
from megatron_a1.data.render import (last_query_index, render_messages, render_prompt,
                                     render_tool_responses, tokenize_rendered)
from megatron_a1.data.tokenizer import Tokenizer

from .engine import Engine, Generation, SamplingParams
from .parse import parse_assistant

__all__ = ["AgentConfig", "FINISH_REASONS", "run_episodes", "group_rollouts", "rerender_check",
           "RolloutStats", "env_factory"]

FINISH_REASONS = ("stop", "length", "max_tokens", "context_limit", "max_turns")


@dataclass(kw_only=True)
class AgentConfig:
    max_turns: int = 16
    """Most assistant turns per episode."""
    max_tokens: int = 16384
    """Most sampled tokens per episode (all turns together)."""
    max_turn_tokens: int = 4096
    """Most sampled tokens per assistant turn."""
    context_limit: int = 32768
    """Most tokens in the whole record (prompt + sampled + tool responses)."""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    """Temperature/top-p/top-k; ``max_tokens`` is set per turn from the limits above and
    ``<|im_end|>`` is added to ``stop_token_ids``; ``seed`` is ignored (see ``seed``)."""
    enable_thinking: bool = True
    """Generation header ``<think>\\n`` (True) or the empty think block (False)."""
    seed: int | None = None
    """Base seed: sample ``s`` at turn ``t`` gets its own seed derived from (seed, s, t), so the
    samples of a GRPO group differ on every engine (None: the engine's own randomness)."""
    tool_workers: int = 8
    """Threads running the tool calls of different episodes concurrently (an episode's own
    calls run in order)."""

    def __post_init__(self):
        for name in ("max_turns", "max_tokens", "max_turn_tokens", "context_limit", "tool_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"AgentConfig.{name} must be >= 1")


# ----------------------------------------------------------------------------------------------
# One episode's state
# ----------------------------------------------------------------------------------------------
@dataclass
class _Episode:
    env: Any
    task: dict
    sample_index: int
    messages: list[dict]
    tools: list[dict]
    tokens: list[int]
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    stats: Counter = field(default_factory=Counter)
    prompt_length: int = 0
    budget: int = 0
    budget_reason: str = "length"
    finish: str | None = None
    truncated: bool = False
    record: dict | None = None

    @property
    def turns(self) -> int:
        return len(self.versions)

    def append(self, ids: Sequence[int], logprobs: Sequence[float] | None = None) -> None:
        self.tokens += ids
        if logprobs is None:
            self.mask += [0] * len(ids)
            self.logprobs += [0.0] * len(ids)
        else:
            self.mask += [1] * len(ids)
            self.logprobs += [float(x) for x in logprobs]


class _Loop:
    """Shared per-run state: tokenizer, config, the fixed header/glue ids."""

    def __init__(self, tokenizer: Tokenizer, cfg: AgentConfig):
        self.tok, self.cfg = tokenizer, cfg
        self.im_end = tokenizer.im_end
        self.glue = tokenizer.encode("\n")  # the template's newline after <|im_end|>
        # what follows the tool responses: <|im_start|>assistant\n + the generation header
        bare = render_tool_responses([], tokenizer=tokenizer, add_generation_prompt=False)
        full = render_tool_responses([], tokenizer=tokenizer, add_generation_prompt=True,
                                     enable_thinking=cfg.enable_thinking)
        assert full[:len(bare)] == bare
        self.header = full[len(bare):]

    # -- budgets -------------------------------------------------------------------------------
    def set_budget(self, ep: _Episode, extra: int = 0) -> int:
        """Tokens the next turn may sample once ``extra`` more tokens (a header) are appended;
        remembers which limit binds. One token of context is kept for the closing glue."""
        cfg = self.cfg
        limits = [(cfg.max_turn_tokens, "length"),
                  (cfg.max_tokens - ep.stats["sampled_tokens"], "max_tokens"),
                  (cfg.context_limit - len(ep.tokens) - extra - len(self.glue), "context_limit")]
        ep.budget, ep.budget_reason = min(limits, key=lambda x: x[0])
        return ep.budget

    # -- one turn ------------------------------------------------------------------------------
    def take_turn(self, ep: _Episode, gen: Generation) -> list[dict]:
        """Append one generation; return the parsed tool calls/errors still to run (or [])."""
        ids, lps = list(gen.token_ids), list(gen.logprobs)
        if len(lps) != len(ids):
            raise ValueError(f"engine returned {len(ids)} ids but {len(lps)} log-probs")
        if self.im_end in ids:  # nothing after the turn's end belongs to it
            stop_at = ids.index(self.im_end) + 1
            ids, lps = ids[:stop_at], lps[:stop_at]
        cut = len(ids) > ep.budget
        ids, lps = ids[:ep.budget], lps[:ep.budget]
        ep.append(ids, lps)
        ep.versions.append(int(gen.weight_version))
        ep.stats["sampled_tokens"] += len(ids)
        closed = bool(ids) and ids[-1] == self.im_end
        stopped = not cut and gen.finish_reason == "stop" and bool(ids)
        text = self.tok.decode(ids[:-1] if (closed or stopped) else ids)
        parsed = parse_assistant(text, ep.tools)
        kinds = Counter(e["kind"] for e in parsed["errors"])
        ep.stats["malformed_calls"] += kinds["malformed_tool_call"]
        ep.stats["argument_errors"] += kinds["argument_type"]
        ep.stats["ignored_text"] += kinds["text_after_tool_calls"]
        attempts = _attempts(parsed)
        pure_malformed = not parsed["tool_calls"] and kinds["malformed_tool_call"] > 0
        ep.messages.append(_assistant_message(parsed, text, ep.turns - 1, raw=pure_malformed))
        if not closed:  # cut by a limit, or another stop token: the episode ends here
            ep.truncated = True
            ep.finish = "stop" if stopped else ep.budget_reason
            return []
        if not attempts:
            ep.finish = "stop"
            return []
        return attempts

    def after_tools(self, ep: _Episode, responses: list[dict], as_user: bool) -> None:
        """Append the tool responses of a closed turn, then the next header or finish."""
        tool_ids = render_tool_responses(responses, tokenizer=self.tok,
                                         add_generation_prompt=False)
        if len(ep.tokens) + len(tool_ids) > self.cfg.context_limit:
            ep.finish = "context_limit"  # the calls ran; their answers do not fit
            return
        if as_user:
            ep.messages.append({"role": "user", "content": _tool_response_blocks(responses)})
        else:
            ep.messages += responses
        ep.append(tool_ids)
        if ep.turns >= self.cfg.max_turns:
            ep.finish = "max_turns"
        elif self.set_budget(ep, extra=len(self.header)) <= 0:
            ep.finish = ep.budget_reason
        else:
            ep.append(self.header)

    def finalize(self, ep: _Episode) -> dict:
        if ep.tokens[-1:] == [self.im_end] and ep.mask[-1:] == [1]:
            ep.append(self.glue)  # a complete final turn: the template's closing newline
        final = next((m for m in reversed(ep.messages) if m["role"] == "assistant"),
                     {"role": "assistant", "content": ""})
        rewards = ep.env.reward(final, ep.messages)
        pid = str(ep.task.get("id"))
        stats = {k: int(ep.stats[k]) for k in ("turns", "tool_calls", "tool_errors",
                                               "malformed_calls", "argument_errors",
                                               "ignored_text", "sampled_tokens")}
        stats["turns"] = ep.turns
        stats["truncated_turn"] = ep.truncated
        record = {
            "id": f"{pid}/{ep.sample_index}", "prompt_id": pid, "sample_index": ep.sample_index,
            "domain": ep.env.domain, "messages": ep.messages, "tools": ep.tools,
            "tokens": ep.tokens, "loss_mask": ep.mask, "logprobs": ep.logprobs,
            "rewards": _jsonable(rewards), "finish_reason": ep.finish,
            "weight_version": {"min": min(ep.versions, default=None),
                               "max": max(ep.versions, default=None), "turns": ep.versions},
            "prompt_length": ep.prompt_length, "enable_thinking": self.cfg.enable_thinking,
            "stats": stats,
        }
        stats.update(rerender_check(record, self.tok))
        ep.record = record
        return record


def generation_header(tokenizer: Tokenizer, enable_thinking: bool = True) -> list[int]:
    """Ids of what the generation prompt adds after ``<|im_start|>assistant\\n`` (``<think>\\n``,
    or the empty think block), taken from the renderer itself."""
    q = [{"role": "user", "content": "x"}]
    with_header = render_prompt(q, tokenizer=tokenizer, enable_thinking=enable_thinking)
    bare = render_prompt(q, tokenizer=tokenizer, enable_thinking=True)
    think = tokenizer.encode("<think>\n")
    assert bare[-len(think):] == think, "renderer's generation header changed"
    base = bare[:-len(think)]  # ends with <|im_start|>assistant\n
    assert with_header[:len(base)] == base
    return with_header[len(base):]


def _attempts(parsed: dict) -> list[dict]:
    """Calls and malformed calls in the order the model wrote them."""
    out = []
    malformed = [e for e in parsed["errors"] if e["kind"] == "malformed_tool_call"]
    calls = parsed["tool_calls"]
    for k in range(len(calls) + 1):
        out += [{"error": e} for e in malformed if e["call_index"] == k]
        if k < len(calls):
            out.append({"call": calls[k], "index": k})
    return out


def _assistant_message(parsed: dict, text: str, turn: int, raw: bool) -> dict:
    msg: dict[str, Any] = {"role": "assistant"}
    if parsed["reasoning_content"] is not None:
        msg["reasoning_content"] = parsed["reasoning_content"]
    if raw:  # every call malformed: keep what the model wrote, so the record renders it
        rest = text.partition("</think>")[2].lstrip("\n") if "</think>" in text else text
        msg["content"] = rest.strip()
        return msg
    msg["content"] = parsed["content"]
    if parsed["tool_calls"]:
        msg["tool_calls"] = [{"id": f"call_{turn}_{k}", "type": "function",
                              "function": {"name": c["function"]["name"],
                                           "arguments": c["function"]["arguments"]}}
                             for k, c in enumerate(parsed["tool_calls"])]
    return msg


MALFORMED_HINT = ("Write each call as <tool_call>\n<function=NAME>\n<parameter=KEY>\nVALUE\n"
                  "</parameter>\n</function>\n</tool_call>")


def _run_tools(ep: _Episode, attempts: list[dict]) -> list[dict]:
    """Execute one turn's calls in order; the tool messages (malformed: an error text)."""
    msg = ep.messages[-1]
    out = []
    for a in attempts:
        if "error" in a:
            out.append({"role": "tool", "content": f"Error: malformed tool call "
                        f"({a['error']['message']}). {MALFORMED_HINT}"})
            continue
        call = msg["tool_calls"][a["index"]]
        text = ep.env.step(a["call"])
        text = text if isinstance(text, str) else json.dumps(text, ensure_ascii=False)
        ep.stats["tool_calls"] += 1
        ep.stats["tool_errors"] += text.lstrip().startswith("Error")
        out.append({"role": "tool", "tool_call_id": call["id"], "name": call["function"]["name"],
                    "content": text})
    return out


def _tool_response_blocks(responses: list[dict]) -> str:
    """Tool results as the text of one user turn (renders like the template's tool turn)."""
    return "\n".join(f"<tool_response>\n{r['content'].strip()}\n</tool_response>"
                     for r in responses)


def _jsonable(x):
    return json.loads(json.dumps(x, default=str))


def _seed(cfg: AgentConfig, sample_index: int, turn: int) -> int | None:
    if cfg.seed is None:
        return None
    return zlib.crc32(f"{cfg.seed}:{sample_index}:{turn}".encode()) & 0x7FFFFFFF


# ----------------------------------------------------------------------------------------------
# The batched loop
# ----------------------------------------------------------------------------------------------
EpisodeSpec = tuple  # (env, task) or (env, task, sample_index)


def run_episodes(engine: Engine, envs_and_tasks: Iterable[EpisodeSpec], tokenizer: Tokenizer,
                 cfg: AgentConfig, *, on_record: Callable[[dict], None] | None = None
                 ) -> list[dict]:
    """Run every ``(env, task[, sample_index])`` episode to its end, concurrently; records in
    input order. Each episode needs its own environment object (it holds the episode's state).
    ``on_record`` is called with each record as soon as its episode ends."""
    loop = _Loop(tokenizer, cfg)
    episodes = [_start(loop, spec) for spec in envs_and_tasks]
    if len({id(ep.env) for ep in episodes}) != len(episodes):
        raise ValueError("run_episodes: every episode needs its own environment object")
    with ThreadPoolExecutor(cfg.tool_workers) as pool:
        for ep in episodes:
            if ep.finish is not None:
                _done(loop, ep, on_record)
        while live := [ep for ep in episodes if ep.finish is None]:
            calls: dict[int | None, list[_Episode]] = {}
            for ep in live:
                calls.setdefault(_seed(cfg, ep.sample_index, ep.turns), []).append(ep)
            pending = []
            for seed, group in calls.items():
                sp = replace(cfg.sampling, max_tokens=max(ep.budget for ep in group), seed=seed,
                             stop_token_ids=sorted({*cfg.sampling.stop_token_ids, loop.im_end}))
                gens = engine.generate([ep.tokens for ep in group], sp)
                if len(gens) != len(group):
                    raise ValueError(f"engine returned {len(gens)} generations for "
                                     f"{len(group)} prompts")
                for ep, gen in zip(group, gens):
                    attempts = loop.take_turn(ep, gen)
                    if attempts:
                        pending.append((ep, attempts))
            # tools of different episodes run concurrently, each episode's calls in order
            results = pool.map(lambda item: _run_tools(*item), pending)
            for (ep, attempts), responses in zip(pending, results):
                as_user = "tool_calls" not in ep.messages[-1]
                loop.after_tools(ep, responses, as_user)
            for ep in live:
                if ep.finish is not None:
                    _done(loop, ep, on_record)
    return [ep.record for ep in episodes]


def _start(loop: _Loop, spec: EpisodeSpec) -> _Episode:
    env, task, *rest = spec
    sample_index = int(rest[0]) if rest else 0
    messages = env.reset(task)
    tools = env.tools() or []
    prompt = render_prompt(messages, tools or None, tokenizer=loop.tok,
                           enable_thinking=loop.cfg.enable_thinking)
    ep = _Episode(env=env, task=task, sample_index=sample_index, messages=list(messages),
                  tools=tools, tokens=[], prompt_length=len(prompt))
    ep.append(prompt)
    if loop.set_budget(ep) <= 0:
        ep.finish = ep.budget_reason
    return ep


def _done(loop: _Loop, ep: _Episode, on_record) -> None:
    if ep.record is None:
        record = loop.finalize(ep)
        if on_record is not None:
            on_record(record)


# ----------------------------------------------------------------------------------------------
# GRPO groups
# ----------------------------------------------------------------------------------------------
def env_factory(make: Callable[[str], Any] | None = None) -> Callable[[str], Any]:
    """``domain -> fresh environment``: one environment per domain is built with ``make``
    (default :func:`megatron_a1.envs.make`) and each call returns a shallow copy of it.
    Environments keep per-episode state in attributes that ``reset`` assigns, so a copy is a
    fresh world that shares the expensive parts (a search index, a config)."""
    if make is None:
        from megatron_a1.envs import make
    protos: dict[str, Any] = {}

    def new(domain: str):
        if domain not in protos:
            protos[domain] = make(domain)
        return copy.copy(protos[domain])

    return new


def group_rollouts(engine: Engine, tasks_by_domain: dict[str, list[dict]], samples_per_prompt: int,
                   tokenizer: Tokenizer, cfg: AgentConfig, *,
                   new_env: Callable[[str], Any] | None = None,
                   on_record: Callable[[dict], None] | None = None) -> list[list[dict]]:
    """GRPO groups: ``samples_per_prompt`` episodes of every task (``sample_index`` 0..n-1,
    each with its own seed when ``cfg.seed`` is set), all run concurrently; one list of records
    per task, in task order (domains in dict order)."""
    if samples_per_prompt < 1:
        raise ValueError("samples_per_prompt must be >= 1")
    new_env = new_env or env_factory()
    specs, keys = [], []
    for domain, tasks in tasks_by_domain.items():
        for t, task in enumerate(tasks):
            for s in range(samples_per_prompt):
                specs.append((new_env(domain), task, s))
                keys.append((domain, t))
    records = run_episodes(engine, specs, tokenizer, cfg, on_record=on_record)
    groups: dict[tuple, list[dict]] = {}
    for key, rec in zip(keys, records):
        groups.setdefault(key, []).append(rec)
    return list(groups.values())


# ----------------------------------------------------------------------------------------------
# Token exactness
# ----------------------------------------------------------------------------------------------
def _runs(mask: Sequence[int]) -> list[tuple[int, int]]:
    runs, start = [], None
    for i, m in enumerate(list(mask) + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return runs


def rerender_check(record: dict, tokenizer: Tokenizer) -> dict:
    """Re-render ``record["messages"]`` with the data pipeline's renderer and compare with
    ``tokens``/``loss_mask`` (module doc). Returns ``{"rerender_exact", "retokenization_mismatch",
    "text_mismatch", "context_mismatch"}``."""
    tokens, mask = list(record["tokens"]), list(record["loss_mask"])
    header = generation_header(tokenizer, record.get("enable_thinking", True))
    msgs = parse_messages(record["messages"])
    tools = parse_tools(record.get("tools")) or None
    lq = last_query_index(msgs)
    sampled = [i for i, m in enumerate(msgs) if m.role == "assistant" and i > lq]
    runs = _runs(mask)
    end = len(tokens)
    # an unfinished final turn (no <|im_end|>) cannot be rendered: check the context before it
    unfinished = not sampled or len(runs) < len(sampled) or \
        tokens[runs[-1][1] - 1] != tokenizer.im_end
    if unfinished:
        if sampled and len(runs) == len(sampled):
            end = runs.pop()[0]
        head = msgs[:sampled[-1]] if sampled else msgs
        rendered = render_messages(head, tools, trained=sampled[:-1],
                                   add_generation_prompt=True,
                                   enable_thinking=record.get("enable_thinking", True),
                                   nfc=tokenizer.nfc)
    else:
        rendered = render_messages(msgs, tools, trained=sampled, nfc=tokenizer.nfc)
    ids, rmask = tokenize_rendered(rendered, tokenizer)
    ours = tokens[:end]
    rruns = _runs(rmask)
    h = len(header)
    # our turns as the renderer sees them: the forced header + the sampled ids
    turns = [(a - h, b) for a, b in runs]
    result = {"rerender_exact": ids == ours and _mask_agrees(rmask, mask[:end], rruns, h),
              "retokenization_mismatch": 0, "text_mismatch": 0, "context_mismatch": 0}
    if result["rerender_exact"]:
        return result
    if len(rruns) != len(turns) or any(a < 0 or tokens[a:a + h] != header for a, _ in turns):
        result["context_mismatch"] = 1
        return result
    for (a, b), (ra, rb) in zip(turns, rruns):
        if ours[a:b] != ids[ra:rb]:
            if tokenizer.decode(ours[a:b]) == tokenizer.decode(ids[ra:rb]):
                result["retokenization_mismatch"] += 1
            else:
                result["text_mismatch"] += 1
    outside = _outside(ours, turns)
    result["context_mismatch"] = int(outside != _outside(ids, rruns))
    return result


def _mask_agrees(rmask, mask, rruns, h) -> bool:
    expected = list(rmask)
    for a, _ in rruns:  # the generation header was prompt in the rollout
        expected[a:a + h] = [0] * min(h, len(expected) - a)
    return expected == list(mask)


def _outside(ids: list[int], spans: list[tuple[int, int]]) -> list[list[int]]:
    out, prev = [], 0
    for a, b in spans:
        out.append(ids[prev:a])
        prev = b
    out.append(ids[prev:])
    return out


# ----------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------
_SUMS = ("turns", "tool_calls", "tool_errors", "malformed_calls", "retokenization_mismatch",
         "text_mismatch", "sampled_tokens")


@dataclass
class DomainStats:
    episodes: int = 0
    outcome: float = 0.0
    """Sum of outcome rewards (``mean_outcome`` divides)."""
    process: float = 0.0
    process_n: int = 0
    sums: Counter = field(default_factory=Counter)
    finish: Counter = field(default_factory=Counter)

    def add(self, record: dict) -> None:
        self.episodes += 1
        r = record.get("rewards") or {}
        self.outcome += float(r.get("outcome") or 0.0)
        if r.get("process") is not None:
            self.process += float(r["process"])
            self.process_n += 1
        for k in _SUMS:
            self.sums[k] += int(record["stats"].get(k, 0))
        self.finish[record.get("finish_reason")] += 1

    def summary(self, seconds: float) -> dict:
        n = max(self.episodes, 1)
        out = {"episodes": self.episodes, "mean_outcome": self.outcome / n,
               "mean_process": self.process / self.process_n if self.process_n else None,
               "mean_turns": self.sums["turns"] / n, "tool_calls": self.sums["tool_calls"],
               "tool_errors": self.sums["tool_errors"],
               "malformed_calls": self.sums["malformed_calls"],
               "retokenization_mismatch": self.sums["retokenization_mismatch"],
               "text_mismatch": self.sums["text_mismatch"],
               "tokens_generated": self.sums["sampled_tokens"],
               "tokens_per_s": self.sums["sampled_tokens"] / seconds if seconds > 0 else None,
               "finish_reasons": dict(self.finish)}
        return out


@dataclass
class RolloutStats:
    """Per-domain summary of rollout records. ``tokens_per_s`` divides a domain's sampled
    tokens by the run's wall time (domains share the batched engine calls, so the per-domain
    rates add up to the run's rate)."""

    per_domain: dict[str, DomainStats] = field(default_factory=dict)
    seconds: float = 0.0

    @classmethod
    def from_records(cls, records: Iterable[dict], seconds: float = 0.0) -> "RolloutStats":
        stats = cls(seconds=seconds)
        for rec in records:
            stats.add(rec)
        return stats

    def add(self, record: dict) -> None:
        self.per_domain.setdefault(str(record.get("domain")), DomainStats()).add(record)

    def as_dict(self) -> dict:
        total = DomainStats()
        for d in self.per_domain.values():
            total.episodes += d.episodes
            total.outcome += d.outcome
            total.process += d.process
            total.process_n += d.process_n
            total.sums.update(d.sums)
            total.finish.update(d.finish)
        out = {k: v.summary(self.seconds) for k, v in sorted(self.per_domain.items())}
        out["all"] = total.summary(self.seconds)
        return out

    def table(self) -> str:
        cols = [("domain", 12), ("episodes", 8), ("reward", 7), ("process", 7), ("turns", 6),
                ("tools", 6), ("tool_err", 8), ("malformed", 9), ("retok", 6), ("text_mm", 7),
                ("tokens", 9), ("tok/s", 9)]
        lines = ["  ".join(f"{name:>{w}}" for name, w in cols)]
        for name, s in self.as_dict().items():
            proc = "-" if s["mean_process"] is None else f"{s['mean_process']:.3f}"
            tps = "-" if s["tokens_per_s"] is None else f"{s['tokens_per_s']:.1f}"
            row = [name, s["episodes"], f"{s['mean_outcome']:.3f}", proc, f"{s['mean_turns']:.2f}",
                   s["tool_calls"], s["tool_errors"], s["malformed_calls"],
                   s["retokenization_mismatch"], s["text_mismatch"], s["tokens_generated"], tps]
            lines.append("  ".join(f"{str(v):>{w}}" for v, (_, w) in zip(row, cols)))
        finish = self.as_dict()["all"]["finish_reasons"]
        lines.append("finish reasons: " + ", ".join(f"{k}={v}" for k, v in sorted(
            finish.items(), key=lambda kv: str(kv[0]))))
        return "\n".join(lines)
