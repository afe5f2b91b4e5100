"""The linear decoder f(E) = W E + b over the full vocabulary, with a config that says what it reads."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import UserError

HEAD_DIR = "head"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


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
    def __init__(self, config: HeadConfig):
        super().__init__()
        self.config = config
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.reset_parameters()

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

    @torch.no_grad()
    def load_decoder(self, dec, layer_index: int = 0) -> None:
        """Copy a fitted ``decoders.LinearDecoders`` (z-scored features) into this head, folding the
        standardisation in: W' = W / std, b' = b - (mean / std) W."""
        from .decoders import expand_scores

        # the decoder stores columns for the ids seen in training plus one shared column: expand to (D, V)
        W = expand_scores(dec.W[layer_index], dec.active, dec.vocab_size) / dec.std[layer_index].reshape(-1, 1)  # (D, V)
        b = expand_scores(dec.b[layer_index], dec.active, dec.vocab_size).reshape(-1) \
            - (dec.mean[layer_index].reshape(1, -1) @ W).reshape(-1)  # (V,)
        self.decoder.weight.copy_(W.T.to(self.decoder.weight))
        self.decoder.bias.copy_(b.to(self.decoder.bias))

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.decoder(embedding.to(self.decoder.weight.dtype))  # (B, D) -> (B, V)

    @classmethod
    def from_model(cls, loaded, layer: int, pooling: str, init: str = "prior", expected_bag_size: float = 32.0):
        cfg = loaded.model.config if not hasattr(loaded.model, "get_base_model") else loaded.model.get_base_model().config
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        vocab = loaded.model.get_input_embeddings().num_embeddings
        head_cfg = HeadConfig(loaded.location.spec, layer, pooling, text.hidden_size, vocab, loaded.num_hidden_states,
                              init, expected_bag_size)
        return cls(head_cfg).to(loaded.device)

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2))
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(path / WEIGHTS_NAME))

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
