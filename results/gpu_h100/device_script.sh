# One call on the lent GPU: pytest -m gpu, bench/throughput.py (augmentation chunk on/off, amp, NHWC,
# TF32 off), then the BALMS paper's stage 1 (default config) and BALMS stage 2 on it, each with --test.
exec > >(tee $OUT/log.txt) 2>&1
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
T0=$(date +%s); mark() { echo "== [$(( $(date +%s) - T0 )) s] $*"; }
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpudata/*.whl && export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
python3 .gpudata/make_cifar10.py /tmp/data >/dev/null; export LT_DATA_ROOT=/tmp/data
mark "pytest -m gpu"
timeout 130 python3 -m pytest -m gpu -q -p no:cacheprovider 2>&1 | tail -15 | tee $OUT/pytest_gpu.txt
mark "bench"
timeout 120 python3 bench/throughput.py --device cuda --batch-sizes 512 --amp off bf16 --augment-chunk 512 8192 --steps 60 --warmup 5 --eval-images 10000 2>&1 | grep -v Warning | tee $OUT/throughput.txt
mark "bench tf32 off"
timeout 45 python3 bench/throughput.py --device cuda --batch-sizes 512 --amp off --tf32 off --steps 60 --warmup 5 --eval-images 10000 2>&1 | grep -v Warning | tee $OUT/throughput_tf32_off.txt
mark "stage 1, paper schedule"; t=$(date +%s)
timeout 250 python3 stage1_train.py --cfg config/cifar10_lt/stage1_softmax.yaml train.device=cuda log_dir=/tmp/s1 2>&1 | grep -v "epoch [0-9]*/" | tail -4
echo "stage1 wall seconds: $(( $(date +%s) - t ))"
timeout 40 python3 stage1_train.py --cfg config/cifar10_lt/stage1_softmax.yaml log_dir=/tmp/s1 --test 2>&1 | tail -14
mkdir -p $OUT/stage1 && cp /tmp/s1/config.yaml /tmp/s1/metrics.jsonl /tmp/s1/test_metrics.json /tmp/s1/train.log $OUT/stage1/
left=$(( 560 - ($(date +%s) - T0) )); mark "stage 2 balms, $left s left"; t=$(date +%s)
if [ $left -gt 40 ]; then
  timeout $(( left - 25 )) python3 stage2_classifier.py --cfg config/cifar10_lt/stage2_balms.yaml stage1.checkpoint=/tmp/s1/last.pt train.device=cuda log_dir=/tmp/s2 2>&1 | grep -v "epoch [0-9]*/" | tail -4
  echo "stage2 wall seconds: $(( $(date +%s) - t ))"
  timeout 20 python3 stage2_classifier.py --cfg config/cifar10_lt/stage2_balms.yaml stage1.checkpoint=/tmp/s1/last.pt log_dir=/tmp/s2 --test 2>&1 | tail -14
  mkdir -p $OUT/stage2 && cp /tmp/s2/config.yaml /tmp/s2/metrics.jsonl /tmp/s2/test_metrics.json /tmp/s2/train.log $OUT/stage2/ 2>/dev/null
fi
mark "done"
