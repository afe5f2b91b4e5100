"""Regenerate the tiny test assets: a 300-line text sample, a 512-token BPE tokenizer and a
2-block random Llama (for mechanics only; it says nothing about science).

    python tests/assets/make_tiny.py ../shared/data/wikitext2/train_head.jsonl
"""

import json
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

here = Path(__file__).parent
src = Path(sys.argv[1])
lines = [json.loads(l)["text"].strip() for l in src.read_text().splitlines()]
lines = [l for l in lines if len(l.split()) >= 8][:300]
with open(here / "tiny_corpus.jsonl", "w") as f:
    for l in lines:
        f.write(json.dumps({"text": l}) + "\n")

tok = Tokenizer(models.BPE(unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<s>", "</s>", "<pad>"]))
tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
out = here / "tiny-llama"
fast.save_pretrained(out)
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=3)
LlamaForCausalLM(cfg).save_pretrained(out)
print("wrote", out, len(lines), "lines")
