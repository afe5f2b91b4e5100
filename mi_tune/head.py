"""The linear decoder f(E) = W E + b over the full vocabulary, with a config that says what it reads."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError

HEAD_DIR = "head"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def corpus_token_ids(seqs, exclude: set) -> list[int]:
    """Sorted ids of the tokens that occur in the (truncated) training sequences, special tokens excluded: the
    columns of a ``head.columns: corpus`` head."""
    present = torch.unique(torch.as_tensor([t for s in seqs for t in s], dtype=torch.long))
    return [int(t) for t in present.tolist() if int(t) not in exclude]


@dataclass
class HeadConfig:
    base_model: str  # the model source the head was trained on (a head means nothing without it)
    layer: int  # hidden_states index it reads (0 = embeddings), normalised to >= 0
    pooling: str  # how the sentence vector is formed
    hidden_size: int
    vocab_size: int
    num_hidden_states: int
    init: str = "prior"
    expected_bag_size: float = 32.0


class RecoverabilityHead(nn.Module):
    """Scores every vocabulary token from one pooled vector: (B, D) -> (B, V) logits.

    ``active_ids=None``: one column per token (V x D parameters). ``active_ids`` given (the tokens of the
    training text): one column per active token plus ONE column shared by all other tokens. Tokens that
    never occur in the training text are never positives, start from the same column (every init does
    that) and receive identical gradients, so in a full head their columns stay equal forever: the
    shared column is the same model with ~V/|active| times fewer parameters, gradients and Adam states
    (49,152 -> 21,099 columns for SmolLM2 on BBC News). Its weight gradient is scaled so that it counts
    as the sqrt(V - |active|) tied columns would in the gradient norm (clipping sees what it would see
    for the full head; Adam's update is scale-free up to its eps). Logits, losses, metrics and the saved files are
    full-vocabulary either way.
    """

    def __init__(self, config: HeadConfig, active_ids=None):
        super().__init__()
        self.config = config
        columns = config.vocab_size
        self.register_buffer("active_ids", None, persistent=False)
        if active_ids is not None:
            ids = torch.as_tensor(sorted({int(i) for i in active_ids}), dtype=torch.long)
            if ids.numel() and (ids[0] < 0 or ids[-1] >= config.vocab_size):
                raise ValueError(f"active_ids must lie in [0, {config.vocab_size}); got {int(ids[0])}..{int(ids[-1])}")
            self.register_buffer("active_ids", ids, persistent=False)
            columns = ids.numel() + 1
            self.n_shared = config.vocab_size - ids.numel()
        self.decoder = nn.Linear(config.hidden_size, columns)
        self.reset_parameters()
        self.register_buffer("grad_scale", None, persistent=False)
        if self.active_ids is not None and self.n_shared > 1:
            scale = torch.ones(columns, 1)  # (C, 1); a buffer: it moves with the head, no copy to the device per backward
            scale[-1] = 1.0 / math.sqrt(self.n_shared)
            self.register_buffer("grad_scale", scale, persistent=False)
            self.decoder.weight.register_hook(lambda g: g * self.grad_scale)
            self.decoder.bias.register_hook(lambda g: g * self.grad_scale.reshape(-1))

    @property
    def compact(self) -> bool:
        return self.active_ids is not None

    def _shared_id(self) -> int | None:
        """A token id outside active_ids (its full-head column is the shared column), or None if all are active."""
        if not self.compact or self.n_shared == 0:
            return None
        present = torch.zeros(self.config.vocab_size, dtype=torch.bool)
        present[self.active_ids.cpu()] = True
        return int((~present).nonzero()[0])

    def full_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(V, D) weight and (V,) bias of the equivalent full-vocabulary head."""
        W, b = self.decoder.weight.detach(), self.decoder.bias.detach()
        if not self.compact:
            return W, b
        return self._spread(W, 0), self._spread(b, 0)

    def _spread(self, compact: torch.Tensor, dim: int) -> torch.Tensor:
        """Compact columns (active..., shared) along ``dim`` -> |V| along ``dim``: the shared one everywhere, active at their ids."""
        shared = compact.narrow(dim, compact.shape[dim] - 1, 1)
        size = list(compact.shape)
        size[dim] = self.config.vocab_size
        return shared.expand(size).index_copy(dim, self.active_ids, compact.narrow(dim, 0, compact.shape[dim] - 1))

    @torch.no_grad()
    def load_full_weights(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Set this head from a full-vocabulary (V, D) weight and (V,) bias (a saved head, a fitted decoder)."""
        if not self.compact:
            self.decoder.weight.copy_(weight.to(self.decoder.weight))
            self.decoder.bias.copy_(bias.to(self.decoder.bias))
            return
        ids = self.active_ids.to(weight.device)
        shared = self._shared_id()
        self.decoder.weight[:-1].copy_(weight[ids].to(self.decoder.weight))
        self.decoder.bias[:-1].copy_(bias[ids].to(self.decoder.bias))
        if shared is not None:
            self.decoder.weight[-1].copy_(weight[shared].to(self.decoder.weight))
            self.decoder.bias[-1].copy_(bias[shared].to(self.decoder.bias))

    def reset_parameters(self) -> None:
        # ("fit", our default, starts here and then loads a decoder fitted on frozen base features:
        # train.py.) ("prior"): W = 0 and every bias = logit(k/|V|), the log-odds of a token being
        # in a bag of the expected size. The first step then starts from the right base rate
        # instead of p = 0.5 for 49k tokens (a huge, uninformative initial loss), and W = 0 makes
        # the early gradient reach the adapters only through what the head learns.
        nn.init.zeros_(self.decoder.weight)
        if self.config.init == "prior":
            p = min(self.config.expected_bag_size / self.config.vocab_size, 0.5)
            nn.init.constant_(self.decoder.bias, math.log(p / (1 - p)))
        else:
            nn.init.zeros_(self.decoder.bias)

    def warm_start(self, X, Y, sentences: int, epochs: int, seed: int) -> None:
        """Start from a BCE decoder fitted on frozen base features ``X`` (1, N, D) and bags ``Y`` of the first
        ``sentences`` training sentences, instead of from the prior."""
        from .decoders import fit_bce

        self.load_decoder(fit_bce(X[:, :sentences], Y[:sentences], epochs=epochs, lr=1e-2, seed=seed, device=self.decoder.weight.device))

    @torch.no_grad()
    def load_decoder(self, dec, layer_index: int = 0) -> None:
        """Copy a fitted ``decoders.LinearDecoders`` (z-scored features) into this head, folding the
        standardisation in: W' = W / std, b' = b - (mean / std) W."""
        from .decoders import expand_scores

        # the decoder stores columns for the ids seen in training plus one shared column: expand to (D, V)
        W = expand_scores(dec.W[layer_index], dec.active, dec.vocab_size) / dec.std[layer_index].reshape(-1, 1)  # (D, V)
        b = expand_scores(dec.b[layer_index], dec.active, dec.vocab_size).reshape(-1) \
            - (dec.mean[layer_index].reshape(1, -1) @ W).reshape(-1)  # (V,)
        self.load_full_weights(W.T, b)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        # float32 (or wider) on purpose, also inside bf16/fp16 autocast, which would run this matmul in half precision
        # and quantise logits near -10 to steps of ~0.06 (ties in top-k accuracy)
        dtype = torch.promote_types(self.decoder.weight.dtype, torch.float32)
        with torch.autocast(embedding.device.type, enabled=False):
            W, b = self.decoder.weight.to(dtype), self.decoder.bias.to(dtype)
            scores = F.linear(embedding.to(dtype), W, b)  # (B, D) -> (B, V) or (B, |active| + 1)
        if not self.compact:
            return scores
        # full-vocabulary logits: the shared score everywhere, the active columns at their ids. (B, V) is
        # small (it is the V x D weight that is large); gradients of the shared positions sum into one column.
        return self._spread(scores, 1)

    @classmethod
    def from_model(cls, loaded, layer: int, pooling: str, init: str = "prior", expected_bag_size: float = 32.0, active_ids=None):
        cfg = loaded.model.config if not hasattr(loaded.model, "get_base_model") else loaded.model.get_base_model().config
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        vocab = loaded.model.get_input_embeddings().num_embeddings
        head_cfg = HeadConfig(loaded.location.spec, layer, pooling, text.hidden_size, vocab, loaded.num_hidden_states,
                              init, expected_bag_size)
        return cls(head_cfg, active_ids).to(loaded.device)

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2))
        weight, bias = self.full_weights()  # always the full-vocabulary layout: readers need not know about shared columns
        save_file({"decoder.weight": weight.contiguous().cpu(), "decoder.bias": bias.contiguous().cpu()}, str(path / WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> "RecoverabilityHead":
        from safetensors.torch import load_file

        path = Path(path)
        if (path / HEAD_DIR / CONFIG_NAME).exists():
            path = path / HEAD_DIR
        if not (path / CONFIG_NAME).exists() or not (path / WEIGHTS_NAME).exists():
            raise UserError(f"head: {path} does not hold {CONFIG_NAME} and {WEIGHTS_NAME}. Allowed: a head folder written by mi_tune "
                            f"(safetensors only; pickle files are refused). Fix: point at adapters/<run>/head.")
        head = cls(HeadConfig(**json.loads((path / CONFIG_NAME).read_text())))
        head.load_state_dict(load_file(str(path / WEIGHTS_NAME)))
        return head.to(device)
