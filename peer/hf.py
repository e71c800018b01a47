"""Hugging Face `transformers` causal language models in a swarm, and their export.

`HFCausalLM` wraps any `AutoModelForCausalLM` so the trainer can call it like the embedded GPT,
`model(x, y) -> (logits, loss)`, with the model's own loss (`shift_labels=y`: the sampler has
already shifted the targets, so every position of the window is predicted). Its parameters are the
wrapped model's, prefixed `hf.`, in the model's order: the flat vector [P] that peers average is
the concatenation of exactly the tensors `save_pretrained` writes, so export is a copy.

Every peer must start from bit-identical weights: a model built from a config is initialised on
the CPU under a forked RNG seeded with the run's seed (as `peer.model.build_model` does); one
loaded with `init_from` comes from the same local folder on every peer. Nothing is downloaded:
configs and weights are local files (`local_files_only`).

`transformers` is an optional extra (pip install "swarmtrain[hf]"); it is imported only here,
when a Llama or `hf` model is asked for.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from averaging.errors import ConfigError

from .config import ModelConfig


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ConfigError('Llama and Hugging Face models need the transformers package: '
                          'pip install "swarmtrain[hf]"') from None
    transformers.logging.set_verbosity_error()  # its "you should train this model" notes are for fine-tuning
    transformers.utils.logging.disable_progress_bar()  # no bars in a peer's log
    return transformers


def llama_config(cfg: ModelConfig) -> Any:
    """The `LlamaConfig` of a model.arch "llama" config (preset or fields)."""
    tf = _transformers()
    inter = cfg.intermediate_size or -(-8 * cfg.n_embd // 3 // 64) * 64  # SwiGLU's 8/3·C, a multiple of 64
    return tf.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=inter,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head or cfg.n_head, max_position_embeddings=cfg.block_size,
        tie_word_embeddings=False, attention_dropout=cfg.dropout, rms_norm_eps=1e-5,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )


def hf_config(cfg: ModelConfig) -> Any:
    """The transformers config a ModelConfig describes: a Llama of its sizes, a config.json, or a
    from_pretrained folder's. Raises ConfigError (one line) for a missing or unreadable file."""
    tf = _transformers()
    if cfg.arch == "llama":
        return llama_config(cfg)
    src = cfg.init_from or cfg.hf_config
    path = Path(src).expanduser()
    if not path.exists():
        raise ConfigError(f"model.{'init_from' if cfg.init_from else 'hf_config'}: {src} does not exist")
    try:
        if path.is_dir():
            return tf.AutoConfig.from_pretrained(str(path), local_files_only=True)
        with path.open() as f:
            obj = json.load(f)
        if not isinstance(obj, dict) or "model_type" not in obj:
            raise ConfigError(f"model.hf_config: {src} is not a transformers config.json (no model_type)")
        return tf.AutoConfig.for_model(**obj)
    except ConfigError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:  # bad JSON, unknown model_type, bad fields
        raise ConfigError(f"model: cannot read the transformers config {src}: {str(e).splitlines()[0][:160]}") from e


class HFCausalLM(nn.Module):
    """A transformers causal LM behind the embedded GPT's interface."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.hf = model
        self.config = model.config
        self.block_size = int(getattr(model.config, "max_position_embeddings", 0)
                              or getattr(model.config, "n_positions", 0) or 1 << 30)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx, targets: LongTensor [B, T], targets[:, t] the token after idx[:, t].
        Returns (logits [B, T, V], the model's mean cross-entropy or None)."""
        if targets is None:
            return self.hf(input_ids=idx, use_cache=False).logits, None
        # labels=targets only switches the loss on; shift_labels=targets says they are already shifted.
        out = self.hf(input_ids=idx, labels=targets, shift_labels=targets, use_cache=False)
        return out.logits, out.loss


def build_hf_model(cfg: ModelConfig, seed: int) -> HFCausalLM:
    """A transformers model whose weights depend only on (cfg, seed), or on cfg.init_from's files."""
    tf = _transformers()
    config = hf_config(cfg)
    if cfg.init_from:
        try:
            model = tf.AutoModelForCausalLM.from_pretrained(cfg.init_from, local_files_only=True, dtype=torch.float32)
        except Exception as e:  # transformers raises OSError, ValueError, pickle errors, ... for a bad folder
            raise ConfigError(f"model.init_from: cannot load {cfg.init_from}: {str(e).splitlines()[0][:160]}") from e
    else:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return HFCausalLM(model.float()).train()  # from_pretrained returns eval mode; a peer trains


def describe_model(model: nn.Module) -> dict | None:
    """What a checkpoint records of the model, enough to rebuild it for export: the transformers
    config (an HFCausalLM, or a transformers model given to the Python API as it is), or the
    embedded GPT's sizes. None for any other module (export then needs the model's flags)."""
    inner = model.hf if isinstance(model, HFCausalLM) else model
    config = getattr(inner, "config", None)
    if config is not None and hasattr(config, "to_json_string") and hasattr(inner, "save_pretrained"):
        return {"arch": "hf", "transformers_config": json.loads(config.to_json_string(use_diff=False))}
    cfg = getattr(model, "cfg", None)
    if isinstance(cfg, ModelConfig) and cfg.arch == "gpt":
        return {"arch": "gpt", **{k: getattr(cfg, k) for k in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd")}}
    return None


def build_from_card(card: dict) -> nn.Module:
    """The model a checkpoint's model card describes (inverse of `model_card`), with throwaway
    weights: export overwrites every one of them with θ_sync."""
    if not isinstance(card, dict) or card.get("arch") not in ("gpt", "hf"):
        raise ConfigError(f"checkpoint: unrecognized model description {str(card)[:80]!r}")
    if card["arch"] == "gpt":
        from .model import build_model
        return build_model(ModelConfig(**{k: v for k, v in card.items() if k != "arch"}))
    config = dict(card.get("transformers_config") or {})
    if "model_type" not in config:
        raise ConfigError("checkpoint: the model description has no transformers config")
    tf = _transformers()
    try:
        hf_cfg = tf.AutoConfig.for_model(**config)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"checkpoint: cannot rebuild its model: {str(e).splitlines()[0][:160]}") from e
    return HFCausalLM(tf.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32))


def export_pretrained(model: HFCausalLM, theta: torch.Tensor, out: str | Path, *, tokenizer_file: str | Path | None = None) -> Path:
    """Write θ (the swarm's flat fp32 vector [P]) as a Hugging Face folder: config.json,
    model.safetensors and, if given, tokenizer.json. `AutoModelForCausalLM.from_pretrained(out)`
    loads it. The folder is written beside its final name and renamed into place: a failed export
    leaves no half-written model."""

    from averaging.flat import write_flat_

    from .fsutil import atomic_folder

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"export: {out} exists and is not empty (nothing was written)")
    write_flat_(list(model.parameters()), theta)  # raises ValueError on a size mismatch, before writing anything
    with atomic_folder(out) as tmp:
        model.hf.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer_file is not None:
            _write_tokenizer(Path(tokenizer_file), tmp, model.config)
    return out


def _write_tokenizer(tokenizer_file: Path, folder: Path, config: Any) -> None:
    """tokenizer.json plus the tokenizer_config.json that lets AutoTokenizer load it."""
    import shutil

    shutil.copyfile(tokenizer_file, folder / "tokenizer.json")
    tok_cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast",
                               "model_max_length": int(getattr(config, "max_position_embeddings", 0) or 1 << 30)}
    with (folder / "tokenizer_config.json").open("w") as f:
        json.dump(tok_cfg, f, indent=1)
