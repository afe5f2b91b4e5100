"""One embedding path for training, the probe and downstream evaluation.

``hidden_states`` runs the backbone (never the LM head); ``pooled_layers`` pools chosen layers
of one forward pass; ``embed_texts`` does it for a list of texts, batched and sorted by length
with dynamic padding.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .modeling import backbone
from .pooling import pool


def hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """All L+1 hidden states of one forward pass through the backbone (no LM logits). Each (B, T, D)."""
    out = backbone(model)(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
    return out.hidden_states


def pooled_layers(model, input_ids, attention_mask, layers: Sequence[int], pooling: str) -> torch.Tensor:
    """(B, len(layers), D) pooled embeddings from one forward pass."""
    hs = hidden_states(model, input_ids, attention_mask)
    return torch.stack([pool(hs[l], attention_mask, pooling) for l in layers], dim=1)


def tokenize(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, add_special_tokens=True)
    return enc["input_ids"]


def pad_batch(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


@torch.inference_mode()  # cheaper than no_grad: no version counters or views tracked; outputs leave as numpy
def embed_token_ids(model, seqs: list[list[int]], pad_id: int, layers: Sequence[int], pooling: str,
                    batch_size: int = 32, device=None, progress: str | None = None) -> np.ndarray:
    """Pooled embeddings (N, len(layers), D) float32 for pre-tokenized sequences, one forward per batch."""
    from tqdm.auto import tqdm

    device = device or next(model.parameters()).device
    order = np.argsort([-len(s) for s in seqs], kind="stable")  # longest first: memory peak shows up at once
    out = None
    was_training = model.training
    model.eval()
    batches = range(0, len(seqs), batch_size)
    for start in tqdm(batches, desc=progress or "embedding", disable=progress is None, leave=False):
        idx = order[start: start + batch_size]
        ids, mask = pad_batch([seqs[i] for i in idx], pad_id)
        emb = pooled_layers(model, ids.to(device), mask.to(device), layers, pooling).float().cpu().numpy()
        if out is None:
            out = np.empty((len(seqs),) + emb.shape[1:], dtype=np.float32)
        out[idx] = emb
    model.train(was_training)
    return out


def embed_texts(model, tokenizer, texts: Sequence[str], layer: int = -1, pooling: str = "mean", max_length: int = 128,
                batch_size: int = 32, progress: str | None = None) -> np.ndarray:
    """texts -> (N, D) float32 embeddings of one hidden-state layer."""
    seqs = tokenize(tokenizer, texts, max_length)
    return embed_token_ids(model, seqs, tokenizer.pad_token_id, [layer], pooling, batch_size, progress=progress)[:, 0]
