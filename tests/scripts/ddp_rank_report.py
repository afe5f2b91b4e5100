"""Run the tiny recipe under DDP and write each rank's trainable-parameter fingerprint (used by test_distributed)."""
import json
import sys
from pathlib import Path

import torch

from mi_tune.train import main

out = Path(sys.argv[1])
trainer = main(sys.argv[2:])
model = trainer.accelerator.unwrap_model(trainer.model)
params = {n: p.detach().double() for n, p in model.named_parameters() if p.requires_grad}
report = {"rank": trainer.args.process_index, "world_size": trainer.args.world_size,
          "sum": sum(float(v.sum()) for v in params.values()), "abs_sum": sum(float(v.abs().sum()) for v in params.values()),
          "global_step": trainer.state.global_step}
(out / f"rank{report['rank']}.json").write_text(json.dumps(report))
