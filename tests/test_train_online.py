"""Online rollouts in the trainer: the embedded engine samples each step from the live policy.

A GRPO run interrupted after step 1 and resumed samples the same episodes and gives the same
losses as the uninterrupted run (the prompt cursor and sampling seeds are part of the state);
the rollout file holds token-exact records; bad online configs fail before compute.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from megatron_a1.configs import ConfigError, load_config
from megatron_a1.testing import run_multirank
from megatron_a1.training.config import TrainConfig
from test_train_loop import train_body

TASKS = os.path.join(os.path.dirname(__file__), "..", "examples", "tasks", "grpo_demo.jsonl")


def online_overrides(root, init, steps=2, extra=()):
    return [
        "model.preset=tiny_test", "model.backend=local",
        "model.overrides={vocab_size: 248320, router_aux_loss_coef: 0.0}",
        f"model.init_from={init}", "data.max_seq_len=256", "train.stage=grpo",
        f"train.train_steps={steps}", "optim.lr=1e-2", "optim.decay_style=constant",
        "grpo.prompts_per_step=2", "grpo.chunk_size=256", "rollout.engine=embedded",
        f"rollout.tasks={{instruction: {TASKS}}}", "rollout.samples_per_prompt=4",
        "rollout.enable_thinking=false", "rollout.max_turns=1", "rollout.max_turn_tokens=3",
        "rollout.max_tokens=3", "rollout.context_limit=256", "rollout.top_k=8",
        "rollout.max_refill_rounds=1", f"rollout.output={root}/rollouts.jsonl",
        f"checkpoint.dir={root}/ck", f"logging.metrics_jsonl={root}/metrics.jsonl", *extra]


@pytest.fixture(scope="module")
def init(tmp_path_factory):
    root = tmp_path_factory.mktemp("online_init")
    over = [o for o in online_overrides(root, None, steps=0) if not o.startswith("model.init")]
    run_multirank(train_body, 1, args=(over + ["grpo.kl_coef=0"],))
    return str(root / "ck")


def test_online_grpo_resume_is_exact_and_records_are_token_exact(init, tmp_path):
    [full] = run_multirank(train_body, 1, args=(online_overrides(tmp_path / "a", init),))
    run_multirank(train_body, 1, args=(online_overrides(tmp_path / "b", init,
                                                        extra=["train.exit_interval=1"]),))
    [rest] = run_multirank(train_body, 1, args=(online_overrides(tmp_path / "b", init),))
    np.testing.assert_allclose(rest["losses"], full["losses"][1:], rtol=1e-5, atol=1e-7)

    def records(root):
        return [json.loads(line) for line in open(root / "rollouts.jsonl")]

    a, b = records(tmp_path / "a"), records(tmp_path / "b")
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b]  # same episodes after resume
    for r in a:
        assert len(r["tokens"]) == len(r["loss_mask"]) == len(r["logprobs"])
        assert sum(r["loss_mask"]) == r["stats"]["sampled_tokens"] > 0
        assert r["stats"]["context_mismatch"] == 0  # prompt/tool tokens are the template's
        assert r["weight_version"]["min"] == r["step"] - 1  # sampled by the previous weights
    metrics = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
    assert 0.0 <= metrics[0]["rollout/instruction/reward"] <= 1.0
    assert metrics[0]["rollout/all/episodes"] >= 8  # 2 prompts x 4 samples (plus refills)


def test_async_rollouts_stay_within_the_bound_and_resume_with_batches_in_flight(init, tmp_path):
    """rollout.max_staleness=1: step s is sampled by the weights after step s-2 while step s-1
    trains. Stopped after step 2, the checkpoint holds the finished batches of steps 3 and 4;
    the resumed run trains them and matches the uninterrupted run step for step."""
    import torch

    from megatron_a1.training import checkpoint as ckpt

    extra = ["rollout.max_staleness=1"]
    [full] = run_multirank(train_body, 1, args=(online_overrides(tmp_path / "a", init, steps=4,
                                                                 extra=extra),))
    run_multirank(train_body, 1, args=(online_overrides(
        tmp_path / "b", init, steps=4, extra=extra + ["train.exit_interval=2"]),))
    stopped = ckpt.latest_checkpoint(str(tmp_path / "b" / "ck"))
    data = torch.load(os.path.join(stopped, "trainer_state.pt"), weights_only=False)["data"]
    assert sorted(data["rollouts_in_flight"]) == [3, 4]
    [rest] = run_multirank(train_body, 1, args=(online_overrides(tmp_path / "b", init, steps=4,
                                                                 extra=extra),))
    np.testing.assert_allclose(rest["losses"], full["losses"][2:], rtol=1e-5, atol=1e-7)

    def records(root):
        return [json.loads(line) for line in open(root / "rollouts.jsonl")]

    a, b = records(tmp_path / "a"), records(tmp_path / "b")
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b]  # nothing lost, nothing twice
    assert {(r["step"], r["weight_version"]["min"], r["weight_version"]["max"]) for r in a} == {
        (1, 0, 0), (2, 0, 0), (3, 1, 1), (4, 2, 2)}
    metrics = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
    assert [m["rollout/staleness"] for m in metrics] == [0, 1, 1, 1]


def test_online_config_errors(tmp_path):
    over = online_overrides(tmp_path, None)
    cfg = load_config(TrainConfig, None, [o for o in over if not o.startswith("model.init")]
                      + ["grpo.kl_coef=0", "parallel.expert_parallel=2"])
    with pytest.raises(ConfigError, match="rollout.engine=embedded"):
        cfg.validate(2)
    cfg = load_config(TrainConfig, None, over + ["rollout.engine=vllm"])
    with pytest.raises(ConfigError, match="rollout.url"):
        cfg.validate(1)
    server = ["rollout.url=http://x:1", "rollout.weight_transfer=distributed"]
    cfg = load_config(TrainConfig, None, over + server + ["rollout.engine=vllm"])
    with pytest.raises(ConfigError, match="broadcasts to SGLang"):
        cfg.validate(1)
    cfg = load_config(TrainConfig, None, over + server + [
        "rollout.engine=sglang", "rollout.max_staleness=1", "checkpoint.keep_last=2"])
    with pytest.raises(ConfigError, match="keep at least 3"):
        cfg.validate(1)
    cfg = load_config(TrainConfig, None, over + ["rollout.max_staleness=-1"])
    with pytest.raises(ConfigError, match="max_staleness"):
        cfg.validate(1)
    cfg = load_config(TrainConfig, None, over + ["train.stage=opd", "opd.teachers={tool: x}"])
    with pytest.raises(ConfigError, match="no teacher"):
        cfg.validate(1)


def _serve(hf: str, log):
    """tools/serve_embedded.py on ``hf`` in a process of its own; (process, URL)."""
    import re
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    server = subprocess.Popen([sys.executable, os.path.join(root, "tools", "serve_embedded.py"),
                               "--checkpoint", hf, "--port", "0", "--seed", "0"],
                              stdout=subprocess.PIPE, stderr=log, text=True)
    lines = []
    while not (found := re.search(r"serving .* at (http://\S+)", lines[-1] if lines else "")):
        lines.append(server.stdout.readline())
        if not lines[-1]:  # EOF: the server exited
            log.seek(0)
            server.wait()
            pytest.fail("serve_embedded exited:\n" + "".join(lines) + log.read()[-3000:])
    return server, found.group(1)


def _stop(server) -> None:
    """SIGTERM the server and wait for it and every process it started (megatron-core's
    checkpoint writer leaves a multiprocessing manager in each process that saved a dist
    checkpoint); whatever still runs after 30 s is killed and fails the test."""
    import psutil

    family = [psutil.Process(server.pid)]
    family += family[0].children(recursive=True)
    server.terminate()
    _, alive = psutil.wait_procs(family, timeout=30)
    for p in alive:
        p.kill()
    server.wait()
    assert not alive, f"still running 30 s after SIGTERM: {[p.pid for p in alive]}"


def test_online_grpo_from_a_server_syncs_weights_by_disk_and_by_broadcast_alike(init, tmp_path):
    """The policy is served by tools/serve_embedded.py. After each step whose weights sample a
    later step the server gets them: over vLLM's protocol from an HF export it reloads, over
    SGLang's by a broadcast from the checkpoint (update_weights_from_distributed, gloo). The
    next step's rollouts carry that version, and both ways sample the same episodes."""
    import urllib.request

    from megatron_a1.model.config import preset
    from megatron_a1.training import checkpoint as ckpt
    from megatron_a1.training.online import export_hf

    hf = str(tmp_path / "hf_init")
    config = preset("tiny_test").replace(vocab_size=248320, router_aux_loss_coef=0.0)
    export_hf(ckpt.latest_checkpoint(init), hf, config.to_hf_config_dict())
    records = {}
    for engine, transfer in (("vllm", "disk"), ("sglang", "distributed")):
        root = tmp_path / transfer
        root.mkdir()
        server, url = _serve(hf, open(root / "server.log", "w+"))
        try:
            run_multirank(train_body, 1, args=(online_overrides(root, init, extra=[
                f"rollout.engine={engine}", f"rollout.url={url}",
                f"rollout.weight_transfer={transfer}", "rollout.transfer_address=127.0.0.1"]),))
            records[transfer] = [json.loads(line) for line in open(root / "rollouts.jsonl")]
            info = json.loads(urllib.request.urlopen(url + "/weight_info", timeout=30).read())
            assert info.get("weight_version") in (1, "1"), info  # step 2's weights sample nothing
        finally:
            _stop(server)
        versions = {r["step"]: r["weight_version"]["min"] for r in records[transfer]}
        assert versions == {1: 0, 2: 1}
    # disk: the export of step 1 (the server's current weights); broadcast: no export at all
    assert os.listdir(tmp_path / "disk" / "ck" / "hf_export") == ["step_0000001"]
    assert not os.path.exists(tmp_path / "distributed" / "ck" / "hf_export")
    for key in ("tokens", "logprobs", "rewards"):
        assert [r[key] for r in records["disk"]] == [r[key] for r in records["distributed"]], key
