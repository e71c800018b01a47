"""`swarm-bootstrap export`: the swarm's model as a Hugging Face folder.

    swarm-bootstrap export --checkpoint archive/ --out my-model/ [--tokenizer data/tokenizer.json]

The state comes from a checkpoint (a file, or the newest in a folder: an archivist's or a
peer's). Which model it is comes from the checkpoint's own description (peers save it); a state
saved by a node that does not know the model (an archivist) needs the run's --model.* flags, and
the model's fingerprint must then match the checkpoint's, so a wrong guess is one line, never a
silently scrambled model.

Llama and other transformers models are written with `save_pretrained`. The embedded GPT is
written as a GPT-2 (`GPT2LMHeadModel`): the same architecture (pre-LayerNorm blocks, learned
positions, tied embeddings, biases), with exact GELU and its Linear weights transposed into
GPT-2's Conv1D layout. Either way `AutoModelForCausalLM.from_pretrained(out)` loads it and
gives the swarm's logits (tests/test_hf.py compares them).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from averaging.errors import ConfigError
from peer.cmdline import OneLineParser
from peer.config import ModelConfig
from peer.settings import CLI_SOURCE, Flags, validate


def gpt_to_gpt2(model: torch.nn.Module) -> torch.nn.Module:
    """The embedded GPT (peer.model.GPT) as a transformers GPT2LMHeadModel with the same weights."""
    from peer.hf import _transformers

    tf = _transformers()
    c = model.cfg
    cfg = tf.GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                        n_head=c.n_head, activation_function="gelu", layer_norm_epsilon=1e-5, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True, bos_token_id=None, eos_token_id=None)
    gpt2 = tf.GPT2LMHeadModel(cfg)
    ours = model.state_dict()
    # Conv1D stores [in, out]: our nn.Linear weights [out, in] go in transposed.
    conv = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    with torch.no_grad():
        for name, p in gpt2.state_dict().items():
            if name.endswith(".attn.bias") or name.endswith(".attn.masked_bias") or name == "lm_head.weight":
                continue  # causal-mask buffers of older versions; lm_head is tied to wte
            src = ours[name]
            p.copy_(src.t() if name.endswith(conv) else src)
    gpt2.tie_weights()
    return gpt2


def export(checkpoint: str | Path, out: str | Path, *, model_cfg: ModelConfig | None = None,
           tokenizer: str | Path | None = None) -> tuple[Path, int]:
    """Write the checkpoint's model to the Hugging Face folder `out`. Returns (out, round).
    Raises ConfigError or StateError (one line); nothing is written then."""
    from averaging.flat import parameter_schema, schema_fingerprint, write_flat_
    from peer.hf import HFCausalLM, build_from_card, export_pretrained
    from peer.model import build_model
    from peer.state import CheckpointDir

    path = Path(checkpoint)
    if path.is_dir():
        latest = CheckpointDir(path).latest()
        if latest is None:
            raise ConfigError(f"export: no checkpoint in {path}")
        path = latest
    state, card = CheckpointDir.load_with_model(path, fingerprint=None, numel=None)
    if model_cfg is not None:
        model = build_model(model_cfg)
    elif card:
        model = build_from_card(card)
    else:
        raise ConfigError(f"export: {path} does not say which model it holds (saved by an archivist or an older "
                          f"version): give the run's --model.* flags")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # A transformers model given to Peer as it is (Python API) names its parameters without the
    # wrapper's "hf." prefix: the same tensors in the same order, another fingerprint.
    fps = {schema_fingerprint(parameter_schema(named))}
    if isinstance(model, HFCausalLM):
        fps.add(schema_fingerprint(parameter_schema(model.hf.named_parameters())))
    if state.fingerprint not in fps:
        raise ConfigError(f"export: {path} holds model {state.fingerprint}, the --model flags describe {min(fps)} "
                          f"({sum(p.numel() for _, p in named):,} parameters): not the run's model")
    if tokenizer is not None and not Path(tokenizer).is_file():
        raise ConfigError(f"export: tokenizer {tokenizer} does not exist")
    if isinstance(model, HFCausalLM):
        return export_pretrained(model, state.theta_sync, out, tokenizer_file=tokenizer), state.round
    write_flat_([p for _, p in named], state.theta_sync)
    return _export_gpt(model, out, tokenizer), state.round


def _export_gpt(model: torch.nn.Module, out: str | Path, tokenizer: str | Path | None) -> Path:
    from averaging.flat import flatten_params
    from peer.hf import HFCausalLM, export_pretrained

    wrapped = HFCausalLM(gpt_to_gpt2(model))
    return export_pretrained(wrapped, flatten_params(wrapped.parameters()), out, tokenizer_file=tokenizer)


def parser() -> Flags:
    """The command's flags: its own, and ModelConfig's as --model.* (`.parser` is the argparse parser)."""
    p = OneLineParser(prog="swarm-bootstrap export", allow_abbrev=False,
                      description="Write the swarm's model (from a checkpoint) as a Hugging Face folder that "
                                  "AutoModelForCausalLM.from_pretrained loads.")
    p.add_argument("--checkpoint", required=True, help="a checkpoint file, or a folder (its newest checkpoint)")
    p.add_argument("--out", required=True, help="the folder to write (must not exist, or be empty)")
    p.add_argument("--tokenizer", help="tokenizer.json to put beside the model (e.g. the shard folder's)")
    return Flags(p, ModelConfig, prefix="model")


def main(argv: list[str]) -> int:
    flags = parser()
    ns = flags.parse(argv)
    given = flags.values(ns).get("model")
    from averaging.errors import SwarmError

    try:
        model_cfg = validate(ModelConfig, given, sources=[(CLI_SOURCE, given)]) if given else None
        out, rnd = export(ns.checkpoint, ns.out, model_cfg=model_cfg, tokenizer=ns.tokenizer)
    except (ConfigError, SwarmError, ValueError, OSError) as e:
        print(f"swarm-bootstrap export: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}: the swarm's model at round {rnd}; load it with "
          f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0
