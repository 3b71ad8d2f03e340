"""SGLang's distributed weight update, both ends: ``python -m megatron_a1.rollout.weight_transfer``
broadcasts a checkpoint (gloo on CPU, several buckets) to a server running our model, which then
serves exactly the weights of that checkpoint under the new version."""
import json
import os
import subprocess
import sys
import threading

import pytest
import torch

from megatron_a1.rollout.engine import SamplingParams
from megatron_a1.rollout.http import EngineHTTPError, HTTPClient, HTTPEngine
from megatron_a1.rollout.server import make_server
from megatron_a1.rollout.weight_transfer import _buckets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_buckets_split_by_bytes_and_flag_the_last():
    tensors = [(f"t{i}", torch.zeros(n)) for i, n in enumerate([3, 3, 10, 1])]  # fp32: 4 B each
    got = [([n for n, _ in b], last) for b, last in _buckets(iter(tensors), 24)]
    assert got == [(["t0", "t1"], False), (["t2"], False), (["t3"], True)]
    assert [([n for n, _ in b], last) for b, last in _buckets(iter(tensors), 1 << 20)] == [
        (["t0", "t1", "t2", "t3"], True)]
    assert list(_buckets(iter([]), 8)) == []


def test_transfer_serves_the_checkpoint_weights(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import serve_embedded
    from megatron.core import dist_checkpointing

    from megatron_a1.model.config import preset
    from megatron_a1.runtime import destroy, initialize

    initialize(seed=3)
    try:
        config = preset("tiny_test")
        source = serve_embedded.build_engine(preset="tiny_test", seed=1)
        (tmp_path / "ckpt").mkdir()
        dist_checkpointing.save(source.model.sharded_state_dict(), str(tmp_path / "ckpt"))
        served = serve_embedded.build_engine(preset="tiny_test", seed=0)  # other weights
        server = make_server(served, load_tensors=serve_embedded.tensor_loader(served.model,
                                                                                config))
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        http = HTTPEngine(server.url, backend="sglang", timeout_s=120, max_retries=0)
        prompts = [[5, 9, 2, 7], [3], [11, 4, 8]]
        sampling = SamplingParams(temperature=1.0, max_tokens=6, seed=4)
        want = [source.generate([p], sampling)[0] for p in prompts]
        before = http.generate(prompts, sampling)
        assert [g.logprobs for g in before] != [g.logprobs for g in want]

        with pytest.raises(EngineHTTPError, match="init_weights_update_group first"):
            HTTPClient(server.url, max_retries=0).request(
                "POST", "/update_weights_from_distributed",
                {"names": ["x"], "dtypes": ["float32"], "shapes": [[1]], "group_name": "none"})
        r = subprocess.run(
            [sys.executable, "-m", "megatron_a1.rollout.weight_transfer", "--checkpoint",
             str(tmp_path / "ckpt"), "--url", server.url, "--version", "7", "--address",
             "127.0.0.1", "--bucket-mb", "0.05", "--hf-config-json",
             json.dumps(config.to_hf_config_dict())],
            capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "sent" in r.stdout
        assert server.state.hits["/update_weights_from_distributed"] >= 3  # several buckets
        assert server.state.groups == {} and server.state.received == {}
        assert served.weight_version == 7
        for (name, a), (_, b) in zip(sorted(source.model.state_dict().items()),
                                     sorted(served.model.state_dict().items())):
            if isinstance(a, torch.Tensor):
                assert torch.equal(a, b), name
        after = http.generate(prompts, sampling)
        assert [g.token_ids for g in after] == [g.token_ids for g in want]
        assert [g.logprobs for g in after] == [g.logprobs for g in want]
        assert {g.weight_version for g in after} == {7}
        server.shutdown()
        server.server_close()
    finally:
        destroy()


def test_weight_transfer_help():
    r = subprocess.run([sys.executable, "-m", "megatron_a1.rollout.weight_transfer", "--help"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0 and "--checkpoint" in r.stdout
