"""Serve our own model (EmbeddedEngine, one process, CPU or one GPU) over vLLM's and SGLang's
token-in/token-out HTTP protocols, so rollout code written for vLLM runs against it unchanged.

    python tools/serve_embedded.py --preset tiny --seed 0 --port 8000          # random weights
    python tools/serve_embedded.py --checkpoint ckpt/ --port 8000               # trained weights
    curl -s localhost:8000/inference/v1/generate -d '{"token_ids": [1, 2, 3],
         "sampling_params": {"max_tokens": 8, "logprobs": 0}}'
    curl -s localhost:8000/v1/completions -d '{"prompt": [1, 2, 3], "max_tokens": 1,
         "prompt_logprobs": 5}'                    # a served OPD teacher's top-5 per position

``--checkpoint`` is a Hugging Face safetensors directory (``config.json`` + ``*.safetensors``,
what ``tools/convert_checkpoint.py mcore-to-hf`` writes) or a ``dist_checkpointing`` directory
written by ``tools/convert_checkpoint.py hf-to-mcore`` (its ``hf_conversion.json`` names the
architecture). Weight updates (``POST /collective_rpc`` ``reload_weights`` for vLLM clients,
``POST /update_weights_from_disk`` for SGLang clients) take either kind of directory, of the same
architecture, and bump the weight version. SGLang's distributed updates
(``/init_weights_update_group`` + ``/update_weights_from_distributed``, sent by
``python -m megatron_a1.rollout.weight_transfer``) are received over gloo. Routes and semantics:
``megatron_a1/rollout/server.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _architecture(checkpoint: str):
    from megatron_a1.model.config import A1ModelConfig
    from megatron_a1.model.convert import HF_CONFIG, SIDECAR

    for name, key in ((HF_CONFIG, None), (SIDECAR, "hf_config")):
        path = os.path.join(checkpoint, name)
        if os.path.exists(path):
            with open(path) as f:
                d = json.load(f)
            return A1ModelConfig.from_hf_config(d[key] if key else d)
    raise SystemExit(f"{checkpoint}: neither {HF_CONFIG} (HF) nor {SIDECAR} (dist_checkpointing)")


def load_weights(model, checkpoint: str) -> None:
    """Load an HF or ``dist_checkpointing`` directory into ``model`` in place."""
    from megatron.core import dist_checkpointing

    from megatron_a1.model import convert

    if os.path.exists(os.path.join(checkpoint, convert.HF_CONFIG)):
        with tempfile.TemporaryDirectory() as tmp:
            convert.hf_to_megatron(checkpoint, tmp, log=lambda *_: None)
            model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), tmp))
    else:
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), checkpoint))


def build_engine(*, preset: str | None = "tiny", seed: int = 0, checkpoint: str | None = None,
                 vocab_size: int | None = None, max_context: int = 4096):
    """An EmbeddedEngine on a random ``preset`` model (seeded) or on ``checkpoint``'s weights.

    Needs megatron_a1.runtime.initialize() (one rank) to have run.
    """
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_a1.model.build import build_model
    from megatron_a1.model.config import preset as get_preset
    from megatron_a1.rollout.embedded import EmbeddedEngine
    from megatron_a1.runtime.parallel import seed_everything

    cfg = _architecture(checkpoint) if checkpoint else get_preset(preset)
    seed_everything(seed)
    max_len = min(cfg.max_position_embeddings, max_context)
    model = build_model(cfg, cfg.to_transformer_config(None),
                        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
                        backend="local", max_seq_len=max_len)
    if checkpoint:
        load_weights(model, checkpoint)
    return EmbeddedEngine(model.eval(), vocab_size=vocab_size, seed=seed, max_context=max_len)


def tensor_loader(model, config):
    """``load_tensors`` for the server's distributed updates: once the HF-named tensors received
    make a whole model (either expert layout), load them into ``model``."""
    from megatron_a1.model import convert

    layouts = [set(convert.mapping(config, per_expert=p).hf_names()) for p in (False, True)]

    def load(received: dict) -> bool:
        names = next((n for n in layouts if n <= received.keys()), None)
        if names is None:
            return False
        with tempfile.TemporaryDirectory() as tmp:
            writer = convert.HFWriter(tmp, max_shard_bytes=2**40)
            for name in sorted(names):
                writer.add(name, received[name])
            writer.close()
            with open(os.path.join(tmp, convert.HF_CONFIG), "w") as f:
                json.dump(config.to_hf_config_dict(), f)
            load_weights(model, tmp)
        return True

    return load


def vocab_size(engine) -> int:
    return engine.vocab_size


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="HF safetensors dir or converted dist_checkpointing dir")
    src.add_argument("--preset", default="tiny", help="random model of this preset "
                     "(megatron_a1.model.config: tiny, tiny_test, ...) when no --checkpoint")
    ap.add_argument("--seed", type=int, default=0, help="weight init and sampling seed")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000, help="0: any free port (printed)")
    ap.add_argument("--vocab-size", type=int, help="tokenizer vocabulary: never sample the "
                    "padded output rows above it (default: the whole output layer)")
    ap.add_argument("--max-context", type=int, default=4096, help="tokens per sequence")
    ap.add_argument("--verbose", action="store_true", help="log every request")
    args = ap.parse_args(argv)

    # SIGTERM (a launcher, a scheduler, a test's terminate()) stops the server as Ctrl-C does:
    # through the finally blocks and a normal interpreter exit, whose multiprocessing finalisers
    # shut down the process megatron-core's checkpoint writer starts in every process that saves
    # a dist checkpoint (loading HF weights converts through one); a death by the default SIGTERM
    # action would leave that process running
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.modules.setdefault("fla", None)  # CPU serving: never bind fla's GPU kernels
    from megatron_a1.rollout.server import make_server
    from megatron_a1.runtime import destroy, initialize

    initialize(seed=args.seed)
    try:
        engine = build_engine(preset=args.preset, seed=args.seed, checkpoint=args.checkpoint,
                              vocab_size=args.vocab_size, max_context=args.max_context)

        def reload(path: str):
            load_weights(engine.model, path)

        from megatron_a1.model.config import preset as get_preset

        config = _architecture(args.checkpoint) if args.checkpoint else get_preset(args.preset)
        server = make_server(engine, args.host, args.port, reload=reload,
                             load_tensors=tensor_loader(engine.model, config),
                             verbose=args.verbose)
        print(f"serving {args.checkpoint or 'random ' + args.preset} at {server.url} "
              f"(vLLM: /inference/v1/generate, SGLang: /generate)", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
    finally:
        destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
