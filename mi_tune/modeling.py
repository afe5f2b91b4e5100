"""The ONLY place that decides dtype, device, quantization and PEFT wrapping.

Everything downstream (trainer, probe, evaluation) receives a ready model and never branches on
hardware. Decoders are loaded with their causal-LM class (so adapters saved here load with plain
``PeftModel.from_pretrained(AutoModelForCausalLM...)``) but the recoverability path calls only the
backbone: the vocabulary-sized LM logits are computed only when the next-token loss is on.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

from . import gguf_cache
from .config import LoraSettings, ModelConfig
from .errors import UserError, field_error, log  # log lives in errors.py (no torch); `from .modeling import log` still works
from .sources import ModelLocation, resolve_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: torch.nn.Module  # the full model (causal LM for decoders), maybe PEFT-wrapped later
    tokenizer: object
    kind: str  # "decoder" | "encoder"
    num_blocks: int
    location: ModelLocation
    dtype: torch.dtype
    device: torch.device

    @property
    def num_hidden_states(self) -> int:
        return self.num_blocks + 1


def resolve_dtype(cfg: ModelConfig) -> tuple[torch.dtype, str]:
    """Decide the compute dtype once, with the reason."""
    if cfg.dtype != "auto":
        return DTYPES[cfg.dtype], "set in the recipe"
    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "CUDA GPU with bf16 support"
        return torch.float16, "CUDA GPU without bf16 support"
    return torch.float32, "CPU: float32 (CPU half-precision matmuls are slower and lose precision)"


def local_device() -> torch.device:
    """This process's device: the GPU of its local rank (LOCAL_RANK, set by torchrun and accelerate launch; 0 when
    run plainly), or the CPU. Everything loaded here (a 4-bit model's device_map too) goes there."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    rank, n = int(os.environ.get("LOCAL_RANK") or 0), torch.cuda.device_count()
    if rank < n:
        return torch.device("cuda", rank)
    if n == 1:  # each process sees only its own GPU (CUDA_VISIBLE_DEVICES set per rank)
        return torch.device("cuda", 0)
    raise UserError(f"LOCAL_RANK: got {rank}, but this machine has {n} GPUs (0..{n - 1}). Allowed: one process per GPU. "
                    f"Fix: launch at most {n} processes (accelerate launch --num_processes {n}).")


def pretrained_source(loc: ModelLocation, weights: bool = False) -> tuple[str, dict]:
    """What ``from_pretrained`` reads for ``loc``: a local GGUF's converted folder (``gguf_cache``, converted on first
    use; ``weights`` converts the weights too), else the location itself with its revision and GGUF file name.
    Whatever is read, the loaded objects are named by ``loc.path`` (peft records it as base_model_name_or_path)."""
    folder = gguf_cache.hf_folder(loc, weights)
    if folder is not None:
        return str(folder), {}
    return loc.path, {"revision": loc.revision, **({"gguf_file": loc.gguf_file} if loc.gguf_file else {})}


def load_config(cfg: ModelConfig):
    """The model's transformers config, without weights (used by --dry-run)."""
    from transformers import AutoConfig

    loc = resolve_model(cfg.source, cfg.revision, cfg.gguf_file)
    try:
        path, kwargs = pretrained_source(loc)
        config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code, **kwargs)
        config.name_or_path = loc.path
        return config, loc
    except OSError as exc:
        raise UserError(
            f"model.source: could not read the config of {cfg.source!r} ({str(exc).splitlines()[0]}). Allowed: a Hub id "
            f"reachable from here, a local folder with config.json, or a .gguf file. Fix: check the name, your network "
            f"(HF_HUB_OFFLINE), or download the model and point model.source at the folder."
        ) from None


def num_blocks_of(config) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        n = getattr(text, name, None)
        if isinstance(n, int):
            return n
    raise UserError(f"model: cannot tell the number of blocks of model_type={config.model_type!r} (no num_hidden_layers in its config).")


def model_kind(config, requested: str = "auto") -> str:
    if requested != "auto":
        return requested
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
        return "decoder"
    if archs:
        return "encoder"
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    mt = config.model_type
    if mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mt not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "decoder"
    return "encoder"


def default_pooling(kind: str) -> str:
    # Our default: encoders are trained with mean pooling (sentence-transformers convention);
    # a causal decoder's last real token is the only position that has attended to the whole
    # sentence, and it is what LLM embedders (E5-Mistral, SFR) use.
    return "mean" if kind == "encoder" else "last"


def quantization_config(cfg: ModelConfig, dtype: torch.dtype):
    if cfg.quantization == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError(
            f"model.quantization: {cfg.quantization} needs bitsandbytes. Run pip install \"mi_tune[quant]\" or set quantization: none."
        ) from None
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = dtype if cfg.bnb_4bit_compute_dtype == "auto" else DTYPES[cfg.bnb_4bit_compute_dtype]
    extra = {}
    if cfg.bnb_4bit_quant_storage:  # FSDP / DeepSpeed shard the 4-bit weights only if stored as the compute dtype
        extra["bnb_4bit_quant_storage"] = {"uint8": torch.uint8, **DTYPES}[cfg.bnb_4bit_quant_storage]
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=cfg.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=compute,
        **extra,
    )


def load_tokenizer(loc: ModelLocation, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path, kwargs = pretrained_source(loc)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    tok.name_or_path = loc.path
    if tok.pad_token_id is None:
        # Pad positions are masked out of pooling and targets, so any id works; eos is the convention.
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    tok.padding_side = "right"  # pooling finds the last real token from the mask; positions stay 0..n-1
    return tok


def load_model(cfg: ModelConfig, for_training: bool = False) -> LoadedModel:
    """Load model + tokenizer with dtype, quantization and device decided here, once."""
    from transformers import AutoModel, AutoModelForCausalLM

    config, loc = load_config(cfg)
    kind = model_kind(config, cfg.kind)
    dtype, reason = resolve_dtype(cfg)
    log(f"dtype: {str(dtype).replace('torch.', '')} ({reason})")
    if cfg.trust_remote_code:
        log("trust_remote_code is ON: code from the model repository will run on this machine")
    qconf = quantization_config(cfg, dtype)
    device = local_device()
    kwargs = dict(trust_remote_code=cfg.trust_remote_code, dtype=dtype)
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if qconf is not None:
        kwargs["quantization_config"] = qconf
        kwargs["device_map"] = {"": device.index if device.type == "cuda" else "cpu"}  # the whole model on this rank's GPU
    cls = AutoModelForCausalLM if kind == "decoder" else AutoModel
    log(f"loading {cfg.source} as {cls.__name__} ({kind}, {num_blocks_of(config)} blocks)")
    try:
        path, source_kwargs = pretrained_source(loc, weights=True)
        kwargs.update(source_kwargs)
        try:
            model = cls.from_pretrained(path, **kwargs)
        except ValueError as exc:  # sdpa, our default, is missing for some architectures (MPNet); eager computes the same
            if kwargs.get("attn_implementation") != "sdpa" or "scaled_dot_product_attention" not in str(exc):
                raise
            log(f"model.attn_implementation: {config.model_type} has no sdpa attention in transformers; using eager (same result)")
            kwargs["attn_implementation"] = "eager"
            model = cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "attn_implementation" in str(exc) or "does not support" in str(exc):
            raise UserError(field_error("model.attn_implementation", cfg.attn_implementation, "an attention backend this model supports (sdpa, eager)",
                                        f"set model.attn_implementation: eager ({first})")) from None
        raise UserError(f"model.source: could not load the weights of {cfg.source!r} ({first}). Fix: check the path or id, "
                        f"the revision, and that the files are complete.") from None
    if qconf is None:
        model.to(device)
    model.name_or_path = model.config.name_or_path = loc.path
    model.config.use_cache = False
    tok = load_tokenizer(loc, cfg.trust_remote_code)
    return LoadedModel(model, tok, kind, num_blocks_of(config), loc, dtype, device)


def backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer body (no LM head): PeftModel -> CausalLM -> base model."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model = model.get_base_model()
    return getattr(model, "base_model", model)


def check_layer(layer: int, num_hidden_states: int, model_name: str) -> int:
    """Normalise a hidden_states index (negative counts from the end) or raise the house error."""
    if not -num_hidden_states <= layer < num_hidden_states:
        raise UserError(
            f"layer={layer} is out of range for {model_name!r}, which returns {num_hidden_states} hidden states "
            f"(0 = embeddings, {num_hidden_states - 1} = last block). Use a value in [-{num_hidden_states}, {num_hidden_states - 1}]."
        )
    return layer % num_hidden_states


# ---------------------------------------------------------------------------------------------
# adapters


def resolve_target_modules(model: torch.nn.Module, spec) -> list[str]:
    """'all-linear' -> the distinct names of linear layers inside the blocks (PEFT's
    ``layers_to_transform`` needs a list, not the 'all-linear' shortcut)."""
    if spec != "all-linear":
        return [spec] if isinstance(spec, str) else list(spec)
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and block_index(name) is not None:
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def lora_config(settings: LoraSettings, num_blocks: int, kind: str, model: torch.nn.Module):
    from peft import LoraConfig

    layers = list(range(num_blocks - 1)) if settings.exclude_final_block else list(range(num_blocks))
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=resolve_target_modules(model, settings.target_modules),
        layers_to_transform=layers,
        task_type="CAUSAL_LM" if kind == "decoder" else "FEATURE_EXTRACTION",
    )


_BLOCK_RE = re.compile(r"\.(?:layers|layer|h|block|blocks)\.(\d+)\.")


def block_index(module_name: str) -> int | None:
    m = _BLOCK_RE.search("." + module_name + ".")
    return int(m.group(1)) if m else None


def adapted_modules(peft_model) -> list[str]:
    """Names of the modules that carry LoRA weights (relative to the base model)."""
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    names = []
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            names.append(name[len(prefix):] if name.startswith(prefix) else name)
    return names


def add_adapters(loaded: LoadedModel, settings: LoraSettings, gradient_checkpointing: bool = False):
    """Wrap with LoRA on blocks 0..L-2 (final block frozen). Returns the PeftModel."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    model = loaded.model
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif gradient_checkpointing:
        # the current transformers name; gradient_checkpointing_enable (all that older releases have) is now its deprecated alias
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    try:
        peft_model = get_peft_model(model, lora_config(settings, loaded.num_blocks, loaded.kind, model))
    except ValueError as exc:
        raise UserError(field_error("lora.target_modules", settings.target_modules, "module names present in the model, or 'all-linear'",
                                    f"fix the names ({str(exc).splitlines()[0]})")) from None
    names = adapted_modules(peft_model)
    final = loaded.num_blocks - 1
    if settings.exclude_final_block and any(block_index(n) == final for n in names):
        raise RuntimeError(f"internal: adapters landed on the final block {final}: {[n for n in names if block_index(n) == final][:3]}")
    if not names:
        raise UserError(field_error("lora.target_modules", settings.target_modules, "names matching linear layers inside the blocks",
                                    "use 'all-linear' or names such as q_proj, v_proj"))
    if settings.fused_mlp:
        from .fused import fuse_gated_mlps

        n = fuse_gated_mlps(peft_model)
        if n:
            log(f"fused LoRA MLP in {n} blocks (gate and up kept for backward, the rest recomputed; lora.fused_mlp: false turns it off)")
    loaded.model = peft_model
    return peft_model


def adapter_plan(cfg: ModelConfig, settings: LoraSettings) -> dict:
    """Which modules would receive adapters, computed on a weightless (meta) model. Used by --dry-run."""
    from accelerate import init_empty_weights
    from peft import get_peft_model
    from transformers import AutoModel, AutoModelForCausalLM

    config, loc = load_config(cfg)
    kind = model_kind(config, cfg.kind)
    n = num_blocks_of(config)
    cls = AutoModelForCausalLM if kind == "decoder" else AutoModel
    with init_empty_weights():
        model = cls.from_config(config, trust_remote_code=cfg.trust_remote_code)
    peft_model = get_peft_model(model, lora_config(settings, n, kind, model))
    names = adapted_modules(peft_model)
    blocks = sorted({b for b in (block_index(x) for x in names) if b is not None})
    return {"kind": kind, "num_blocks": n, "modules": names, "blocks_with_adapters": blocks,
            "final_block": n - 1, "final_block_has_adapters": (n - 1) in blocks,
            "model_type": config.model_type, "location": loc}
