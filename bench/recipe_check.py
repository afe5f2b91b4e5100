"""Train a recipe for a few steps, print the peak memory, and check the adapter it saved.

    python bench/recipe_check.py recipes/mistral7b.yaml model.source=/tmp/mistral-7b-random training.max_steps=20 ...

Arguments are `python -m mi_tune.train`'s (bench/gpu_check.sh names every override). Prints the peak GPU memory
(torch.cuda.max_memory_allocated over the whole run: load, warm start, steps, evaluation) or, on a CPU, the peak
resident set size. Then checks the run folder's adapter: LoRA weights in every block but the final one, each
block's lora_B moved away from its zero start (trained), and nothing of the final block adapted or trainable.
Exits 1 when a check fails.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def adapter_problems(run_dir: Path, peft_model) -> list[str]:
    """What is wrong with the adapter of a run: [] when blocks 0..L-2 are adapted and trained and block L-1 untouched."""
    from safetensors.torch import load_file

    from mi_tune.modeling import block_index

    blocks = json.loads((run_dir / "run_info.json").read_text())["num_blocks"]
    final = blocks - 1
    saved = load_file(str(run_dir / "adapter_model.safetensors"))
    adapted = sorted({block_index(n) for n in saved} - {None})
    trained = sorted({block_index(n) for n, w in saved.items() if "lora_B" in n and bool(w.abs().max() > 0)} - {None})
    problems = []
    if adapted != list(range(final)):
        problems.append(f"adapted blocks {adapted}, expected 0..{final - 1}")
    if trained != list(range(final)):
        problems.append(f"blocks whose lora_B left zero: {trained}, expected 0..{final - 1}")
    trainable = [n for n, p in peft_model.named_parameters() if block_index(n) == final and p.requires_grad]
    if trainable:
        problems.append(f"final block {final} has trainable parameters: {trainable[:3]}")
    print(f"adapter: {len(adapted)} of {blocks} blocks adapted ({len(trained)} trained), final block {final} "
          f"{'untouched' if final not in adapted and not trainable else 'ADAPTED'}; {len(saved)} tensors in {run_dir}")
    return problems


def main(argv: list[str]) -> int:
    import torch

    from mi_tune.config import load_recipe
    from mi_tune.train import main as train

    trainer = train(argv)
    if torch.cuda.is_available():
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB allocated, "
              f"{torch.cuda.max_memory_reserved() / 2**30:.2f} GiB reserved ({torch.cuda.get_device_name()})")
    else:
        print(f"peak RSS (CPU): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    recipe = load_recipe(argv[0], [x for x in argv[1:] if not x.startswith("--")])
    problems = adapter_problems(recipe.run_dir, trainer.model.peft)
    for p in problems:
        print(f"CHECK FAILED: {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
