#!/usr/bin/env bash
# Every GPU check and timing of visualad in one call of a device session (about 15 minutes of device time in
# all, one command of at most 10): run it as the command, with a timeout that leaves time to rerun a part.
#
#     bash benchmarks/device_check.sh            # from the repository root, on the device machine
#
# The device image has torch, timm, OpenCV, safetensors and huggingface_hub, not open_clip: the CLIP ViT-L
# steps (floor and training step, the paper's backbone) run only when its wheels travel. Prepare them here once
# (ignored by git), and name .whl in the run's carry:
#
#     echo /.whl/ >> .git/info/exclude
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#         open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth
#
# Steps, each bounded by `timeout` and logged to $OUT (at most 8 files come back):
#   1. cuda_check.py: head, references and batch mode on CUDA (bf16) against fp32 on the CPU; a CUDA finetune
#   2. mode_speed.py in the default dtype and in fp32: issue 30's ratios on CUDA (random weights)
#   3. floor.py: bf16 predict against the GEMM floor (ViT-S at 518 px; CLIP ViT-L at 518 px with open_clip)
#   4. train_step_gpu.py: the paper's training step, with and without gradient checkpointing (open_clip)
set -u
OUT=${OUT:-/tmp/visualad-device-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # visualad from this checkout (it is not installed there)
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
status=0

step() {  # step NAME SECONDS COMMAND...: the command's output to the terminal and $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit} s): $*"
    timeout "$limit" "$@" > >(tee "$OUT/$name.log") 2>&1
    local rc=$?
    echo "== $name: exit $rc"
    [ "$rc" -eq 0 ] || status=1
}

step env 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
    $PY -c 'import torch, timm; print(torch.__version__, timm.__version__, torch.cuda.get_device_name())'"
step cuda_check 120 "$PY" benchmarks/cuda_check.py --device cuda
step mode_speed_auto 120 "$PY" benchmarks/mode_speed.py --device cuda --random-weights --dtype auto
step mode_speed_fp32 120 "$PY" benchmarks/mode_speed.py --device cuda --random-weights --dtype fp32
step floor_vits 45 "$PY" benchmarks/floor.py --device cuda --model dinov2-s-imgfocus --size 518 --batch 32 --dtype bf16
if "$PY" -c "import open_clip" 2> /dev/null; then
    step floor_clipl 60 "$PY" benchmarks/floor.py --device cuda --model clip-l --size 518 --batch 32 --dtype bf16
    step train_step 90 "$PY" benchmarks/train_step_gpu.py --device cuda
else
    echo "== open_clip is not installed here: the CLIP ViT-L floor and training step are left out (see the header)"
fi
exit $status
