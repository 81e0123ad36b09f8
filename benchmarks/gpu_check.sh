#!/usr/bin/env bash
# GPU check for one CUDA machine (under 8 minutes on one H100): run from the repository root,
#
#     benchmarks/gpu_check.sh [--steps 20] [--repeats 5] [--keep]        on a CUDA machine
#     benchmarks/gpu_check.sh --cpu --tiny [--steps 4] [--repeats 2]     every piece on a CPU, test-size model
#
# 1. a random-weight Qwen2-VL base at 2B geometry (2 decoder layers, 2 vision blocks, real hidden size, heads and
#    151,936-row vocabulary), converted to Vedas;
# 2. equivalences of the latent forward: sdpa vs eager (fp32), bf16 vs fp32, and flash-attention-2 vs sdpa (bf16)
#    when flash_attn is installed: each prints its error and PASS / FAIL;
# 3. --steps DeepSpeed ZeRO-2 training steps (1 process, bf16 on CUDA): tokens/s and peak memory;
# 4. generate latency: latent / No-CoT (goal <= 1.3x) and CoT / latent (goal >= 5x).
#
# Needs the `deepspeed` extra (pip install -e ".[deepspeed]"); on a CPU, DeepSpeed also compiles its communication
# op once (a C++ compiler and ninja, a few minutes). Prints numbers, asserts none; exits non-zero when an
# equivalence fails or a piece errors. The model folder is a temporary folder, removed at the end unless --keep.
set -euo pipefail
cd "$(dirname "$0")/.."

CPU="" TINY="" STEPS=20 REPEATS=5 KEEP=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --cpu) CPU="--cpu" ;;
        --tiny) TINY="--tiny" ;;
        --steps) STEPS="$2"; shift ;;
        --repeats) REPEATS="$2"; shift ;;
        --keep) KEEP=1 ;;
        -h|--help) sed -n 2,18p "$0"; exit 0 ;;
        *) echo "gpu_check.sh: error: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [[ -n "$CPU" ]]; then export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}" DS_ACCELERATOR=cpu; fi
WORK="$(mktemp -d)"
if [[ -z "$KEEP" ]]; then trap 'rm -rf "$WORK"' EXIT; else echo "model folder: $WORK"; fi
PORT=$(python3 -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")

section() { echo; echo "== $1 ($(date -u +%H:%M:%S))"; }
started=$SECONDS
python3 - <<'EOF'
import platform, torch, transformers
cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
print(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, {cuda}")
EOF
section "1. build the model"
python3 benchmarks/gpu_check.py build "$WORK" $TINY
section "2. equivalences"
status=0
python3 benchmarks/gpu_check.py equiv "$WORK" $CPU || status=$?
section "3. ZeRO-2 training, $STEPS steps"
accelerate launch --config_file examples/configs/deepspeed_zero2.yaml --num_processes 1 --main_process_port "$PORT" \
    benchmarks/gpu_check.py train "$WORK" --steps "$STEPS" $CPU 2>&1 | grep -v "it/s]\|s/it]" | tail -n 25
section "4. generate latency"
python3 benchmarks/gpu_check.py latency "$WORK" --repeats "$REPEATS" $CPU
echo
echo "gpu_check.sh: done in $((SECONDS - started)) s; equivalences $([[ $status -eq 0 ]] && echo passed || echo FAILED)"
exit $status
