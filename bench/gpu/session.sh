#!/usr/bin/env bash
# One call on a lent GPU, after bench/gpu/prepare.sh here: run(command="bash bench/gpu/session.sh",
# carry=[".gpudata"], timeout_s=420). Most needed first, each step bounded, so that what finishes comes
# back under $OUT: (1) pytest -m gpu, verbose, the tests never run on a GPU first; (2) bench/throughput.py's
# ratios, fp32 + bf16, prefetch off/on, then cudnn_benchmark on (one round each: a row a setting);
# (3) stage 1 on the paper schedule's settings shortened to 2,000 steps (its own whole cosine schedule), timed,
# with --test; (4) BALMS stage 2 on it, 500 steps. Commit what comes back under results/gpu_<date>/ with a
# README naming the card.
exec > >(tee "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
T0=$(date +%s); BUDGET=${BUDGET:-400}
mark() { echo "== [$(( $(date +%s) - T0 )) s] $*"; }
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpudata/*.whl && export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())"
git log --oneline -1 2>/dev/null || true
python3 .gpudata/make_cifar10.py /tmp/data > /dev/null && export LT_DATA_ROOT=/tmp/data
mark "pytest -m gpu"
timeout 170 python3 -m pytest -m gpu -v -p no:cacheprovider --durations=15 tests/test_gpu_pipeline.py \
    tests/data/test_transfer.py tests/engine/test_device.py tests/test_gpu_cli.py \
    > "$OUT/pytest_gpu.txt" 2>&1; echo "pytest rc $?" >> "$OUT/pytest_gpu.txt"; grep -E "PASS|FAIL|ERROR|SKIP|rc " "$OUT/pytest_gpu.txt" | tail -20
mark "throughput: fp32 + bf16, prefetch off/on"
# --warmup 25: a whole epoch of CIFAR-10-LT IF 100 at batch 512 (24 full batches and one of 118), so that the
# short batch's first run (cuDNN's search with cudnn_benchmark, a recompile with compile) is not timed.
timeout 70 python3 bench/throughput.py --device cuda --batch-sizes 512 --amp off bf16 --prefetch off on \
    --rounds 1 --steps 60 --warmup 25 --eval-images 10000 2>&1 | grep -v Warning | tee "$OUT/throughput.txt"
mark "throughput: fp32, cudnn_benchmark on"
timeout 50 python3 bench/throughput.py --device cuda --batch-sizes 512 --amp off --prefetch off on \
    --cudnn-benchmark on --rounds 1 --steps 60 --warmup 25 --eval-images 10000 2>&1 | grep -v Warning \
    | tee "$OUT/throughput_cudnn.txt"
if [ "$(left)" -gt 60 ]; then
    mark "stage 1, the paper schedule's settings, 2,000 steps"; t=$(date +%s)
    timeout $(( $(left) - 30 )) python3 stage1_train.py --cfg config/cifar10_lt/stage1_softmax.yaml train.device=cuda \
        train.iterations=2000 log_dir=/tmp/s1 2>&1 | grep -v "epoch [0-9]*/" | tail -4
    echo "stage1 wall seconds: $(( $(date +%s) - t ))"
    timeout 30 python3 stage1_train.py --cfg config/cifar10_lt/stage1_softmax.yaml log_dir=/tmp/s1 --test 2>&1 | tail -6
    tar czf "$OUT/stage1.tar.gz" -C /tmp/s1 config.yaml metrics.jsonl test_metrics.json train.log 2>/dev/null
fi
if [ -f /tmp/s1/last.pt ] && [ "$(left)" -gt 45 ]; then
    mark "stage 2, BALMS (image relaxation), 500 steps"; t=$(date +%s)
    timeout $(( $(left) - 20 )) python3 stage2_classifier.py --cfg config/cifar10_lt/stage2_balms.yaml \
        stage1.checkpoint=/tmp/s1/last.pt train.device=cuda train.iterations=500 log_dir=/tmp/s2 2>&1 \
        | grep -v "epoch [0-9]*/" | tail -4
    echo "stage2 wall seconds: $(( $(date +%s) - t ))"
    timeout 20 python3 stage2_classifier.py --cfg config/cifar10_lt/stage2_balms.yaml \
        stage1.checkpoint=/tmp/s1/last.pt log_dir=/tmp/s2 --test 2>&1 | tail -6
    tar czf "$OUT/stage2.tar.gz" -C /tmp/s2 config.yaml metrics.jsonl test_metrics.json train.log 2>/dev/null
fi
mark "done"
