"""python -m mi_tune.eval probe [options]        the layer probe (see mi_tune/eval/probe.py)
python -m mi_tune.eval downstream [options]   downstream tasks (see mi_tune/eval/downstream.py)
python -m mi_tune.eval SUITE.yaml [options]   a suite file; its `task:` key says probe or downstream
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import UserError, cli_main


@cli_main
def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    first = argv[0]
    if first == "probe":
        from .probe import main as probe_main

        return probe_main(argv[1:])
    if first == "downstream":
        from .downstream import main as downstream_main

        return downstream_main(argv[1:])
    if first.endswith((".yaml", ".yml")):
        from ..config import read_yaml

        path = Path(first)
        task = read_yaml(path, "suite").get("task")
        if task == "probe":
            from .probe import run_suite_file
        elif task == "downstream":
            from .downstream import run_suite_file
        else:
            raise UserError(f"suite {first}: task: got {task!r}; allowed: probe, downstream. Fix: add `task: probe` or `task: downstream` at the top.")
        return run_suite_file(path, argv[1:])
    raise UserError(f"mi_tune.eval: got {first!r}; allowed: probe, downstream, or a suite .yaml file. Fix: e.g. python -m mi_tune.eval eval/probe-cpu.yaml")


if __name__ == "__main__":
    main()
