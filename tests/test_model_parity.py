"""Our HybridModel equals transformers' ``Qwen3_5MoeForCausalLM`` (the oracle), and converts.

* several tiny random configs (layer counts and patterns, heads, GQA ratios, experts, top-k,
  RoPE fraction and base): a ``save_pretrained`` checkpoint goes through the converter, and our
  model's float32 logits equal transformers' within 1e-4, for one document and for a packed
  batch against each document run alone;
* conversion HF -> Megatron -> HF is bit-exact (fused and per-expert layouts, bf16, the
  multimodal ``model.language_model.`` prefix); unmapped, missing and mis-shaped tensors fail
  with an error naming them.
"""
import json
import os
import sys

import pytest
import torch

if sys.modules.get("fla") is not None:
    pytest.skip("fla was imported before transformers could be guarded", allow_module_level=True)
sys.modules["fla"] = None
sys.modules.setdefault("causal_conv1d", None)

from safetensors.torch import load_file, save_file  # noqa: E402

from megatron_a1.model import convert, parity  # noqa: E402
from megatron_a1.model.config import FULL, LINEAR, preset  # noqa: E402

BASE = preset("tiny_test")
CONFIGS = {
    # GE*E: 2 layers, 4 heads / 2 groups, 4 experts top-2, half the head dim rotated
    "base": BASE,
    # GEGE*E*E: 4 layers (two full in a row), MHA-like 2/2 heads, 6 experts top-3, 25% RoPE
    "wide": BASE.replace(
        layer_types=(LINEAR, LINEAR, FULL, FULL), num_attention_heads=2, num_key_value_heads=2,
        head_dim=32, partial_rotary_factor=0.25, rope_theta=1e6, num_experts=6,
        num_experts_per_tok=3, linear_num_key_heads=1, linear_num_value_heads=3,
        linear_key_head_dim=16, linear_value_head_dim=8,
    ),
    # *EGE: attention first, GQA 8:1, 8 experts top-4, full rotary
    "gqa8": BASE.replace(
        layer_types=(FULL, LINEAR), num_attention_heads=8, num_key_value_heads=1, head_dim=16,
        partial_rotary_factor=1.0, num_experts=8, num_experts_per_tok=4,
    ),
}
LENGTHS = [9, 1, 14]


@pytest.fixture(scope="module")
def runtime():
    from megatron_a1.runtime import destroy, initialize

    rt = initialize(seed=3)
    yield rt
    destroy()


@pytest.fixture(scope="module", params=list(CONFIGS))
def converted(request, runtime, tmp_path_factory):
    """(config, transformers model, our model) for one random tiny config."""
    cfg = CONFIGS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    hf = parity.random_hf_model(cfg, seed=len(request.param))
    hf.save_pretrained(root / "hf")
    convert.hf_to_megatron(str(root / "hf"), str(root / "mcore"), log=lambda *_: None)
    ours = parity.build_from_checkpoint(cfg, str(root / "mcore"), runtime.pg_collection)
    return cfg, hf, ours


def test_single_document_logits_match_transformers(converted):
    cfg, hf, ours = converted
    ids = torch.randint(0, cfg.vocab_size, (21,), generator=torch.Generator().manual_seed(0))
    ref = parity.hf_logits(hf, ids)
    got = parity.megatron_logits(ours, ids)
    assert ref.abs().max() > 0.1, "logits too small for the comparison to mean anything"
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)


def test_packed_logits_match_each_document_alone(converted):
    cfg, hf, ours = converted
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    ids = torch.randint(0, cfg.vocab_size, (int(cu[-1]),), generator=torch.Generator().manual_seed(1))
    ref = parity.hf_logits(hf, ids, cu)  # transformers, one document at a time
    got = parity.megatron_logits(ours, ids, cu)  # ours, one packed THD sequence
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------
def _tensors(path):
    out = {}
    for fn in sorted(os.listdir(path)):
        if fn.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, fn)))
    return out


def _write_hf(path, tensors, config):
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)


@pytest.fixture(scope="module")
def hf_checkpoint(runtime, tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    parity.random_hf_model(BASE, seed=7).save_pretrained(root / "hf")
    return root, _tensors(root / "hf"), json.load(open(root / "hf" / "config.json"))


def _round_trip(root, name):
    convert.hf_to_megatron(str(root / name), str(root / f"{name}_mc"), log=lambda *_: None)
    convert.megatron_to_hf(str(root / f"{name}_mc"), str(root / f"{name}_back"),
                           max_shard_bytes=40_000, log=lambda *_: None)
    return _tensors(root / f"{name}_back")


def _assert_bit_exact(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_round_trip_is_bit_exact(hf_checkpoint):
    root, tensors, _ = hf_checkpoint
    back = _round_trip(root, "hf")
    _assert_bit_exact(tensors, back)
    index = json.load(open(root / "hf_back" / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 1  # several shards were written


def test_round_trip_bf16_per_expert_multimodal_prefix(hf_checkpoint):
    """The released checkpoint's shapes: ``model.language_model.``, bf16; experts one by one."""
    root, tensors, config = hf_checkpoint
    e, f = BASE.num_experts, BASE.moe_intermediate_size
    out = {}
    for k, t in tensors.items():
        k2 = k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else k
        t = t.to(torch.bfloat16)
        if k.endswith("experts.gate_up_proj"):
            for x in range(e):
                out[k2.replace("gate_up_proj", f"{x}.gate_proj.weight")] = t[x, :f].clone()
                out[k2.replace("gate_up_proj", f"{x}.up_proj.weight")] = t[x, f:].clone()
        elif k.endswith("experts.down_proj"):
            for x in range(e):
                out[k2.replace("down_proj", f"{x}.down_proj.weight")] = t[x].clone()
        else:
            out[k2] = t
    out["mtp.fc.weight"] = torch.zeros(2, 2, dtype=torch.bfloat16)  # skipped: not the text model
    mm_config = {"model_type": "qwen3_5_moe", "tie_word_embeddings": False, "text_config": config}
    _write_hf(root / "mm", out, mm_config)
    back = _round_trip(root, "mm")
    del out["mtp.fc.weight"]
    _assert_bit_exact(out, back)


@pytest.mark.parametrize("damage, message", [
    ("extra", "1 unmapped"),
    ("drop", "1 missing"),
    ("reshape", "1 mis-shaped"),
])
def test_conversion_names_bad_tensors(hf_checkpoint, damage, message):
    root, tensors, config = hf_checkpoint
    tensors = dict(tensors)
    name = "model.layers.1.self_attn.k_proj.weight"
    if damage == "extra":
        name = "model.layers.1.self_attn.rogue.weight"
        tensors[name] = torch.zeros(3)
    elif damage == "drop":
        del tensors[name]
    else:
        tensors[name] = tensors[name][:-1].clone()
    _write_hf(root / damage, tensors, config)
    with pytest.raises(convert.ConversionError, match=message) as err:
        convert.hf_to_megatron(str(root / damage), str(root / f"{damage}_mc"), log=lambda *_: None)
    assert name in str(err.value)


def test_checkpoint_of_another_architecture_is_refused(hf_checkpoint):
    root, _, config = hf_checkpoint
    if not (root / "hf_mc").exists():
        convert.hf_to_megatron(str(root / "hf"), str(root / "hf_mc"), log=lambda *_: None)
    other = dict(config, moe_intermediate_size=BASE.moe_intermediate_size * 2)
    with pytest.raises(convert.ConversionError, match="mis-shaped"):
        convert.megatron_to_hf(str(root / "hf_mc"), str(root / "other"), hf_config=other,
                               log=lambda *_: None)


def test_command_line_tools(hf_checkpoint, tmp_path):
    """tools/convert_checkpoint.py both ways and tools/check_parity.py, as a user runs them."""
    import subprocess

    import numpy as np

    root, tensors, _ = hf_checkpoint
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    dist_env = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    env = {k: v for k, v in os.environ.items() if k not in dist_env}  # a fresh single process
    env["TRITON_INTERPRET"] = "0"

    def run(*args):
        proc = subprocess.run([sys.executable, *args], cwd=repo, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    run("tools/convert_checkpoint.py", "hf-to-mcore", "--hf", str(root / "hf"), "--mcore", str(tmp_path / "mc"))
    run("tools/convert_checkpoint.py", "mcore-to-hf", "--mcore", str(tmp_path / "mc"), "--hf", str(tmp_path / "back"))
    _assert_bit_exact(tensors, _tensors(tmp_path / "back"))
    np.save(tmp_path / "ids.npy", np.arange(20) % BASE.vocab_size)
    np.save(tmp_path / "cu.npy", np.array([0, 5, 20]))
    out = run("tools/check_parity.py", "--hf-model", str(root / "hf"), "--input-ids", str(tmp_path / "ids.npy"),
              "--cu-seqlens", str(tmp_path / "cu.npy"), "--output", str(tmp_path / "logits.npy"))
    assert "max |ours - transformers|" in out
    assert np.load(tmp_path / "logits.npy").shape == (20, BASE.vocab_size)
