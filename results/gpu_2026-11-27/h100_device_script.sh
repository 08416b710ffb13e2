# One call on the lent GPU (run from the repo root, .gpudata carried): bench, the paper's stage 1 with
# --test, then BALMS stage 2 with --test while pytest -m gpu runs beside it.
exec > >(tee $OUT/log.txt) 2>&1
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
T0=$(date +%s); mark() { echo "== [$(( $(date +%s) - T0 )) s] $*"; }
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpudata/*.whl && export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
git log --oneline -1 2>/dev/null
python3 .gpudata/make_cifar10.py /tmp/data >/dev/null; export LT_DATA_ROOT=/tmp/data
mark "bench"
timeout 90 python3 bench/throughput.py --device cuda --batch-sizes 512 --amp off bf16 --steps 60 --warmup 5 --eval-images 10000 2>&1 | grep -v Warning | tee $OUT/throughput.txt
mark "stage 1, paper schedule"; t=$(date +%s)
timeout 300 python3 stage1_train.py --cfg config/cifar10_lt/stage1_softmax.yaml train.device=cuda log_dir=/tmp/s1 2>&1 | grep -v "epoch [0-9]*/" | tail -5
echo "stage1 wall seconds: $(( $(date +%s) - t ))"
mark "pytest -m gpu in the background"
( timeout 200 python3 -m pytest -m gpu -q -p no:cacheprovider --durations=8 > $OUT/pytest_gpu.txt 2>&1; echo "pytest rc $?" >> $OUT/pytest_gpu.txt ) &
timeout 40 python3 stage1_train.py --cfg config/cifar10_lt/stage1_softmax.yaml log_dir=/tmp/s1 --test 2>&1 | tail -14
tar czf $OUT/stage1.tar.gz -C /tmp/s1 config.yaml metrics.jsonl test_metrics.json train.log
left=$(( 570 - ($(date +%s) - T0) )); mark "stage 2 balms (beside pytest), $left s left"; t=$(date +%s)
if [ $left -gt 40 ]; then
  timeout $(( left - 25 )) python3 stage2_classifier.py --cfg config/cifar10_lt/stage2_balms.yaml stage1.checkpoint=/tmp/s1/last.pt train.device=cuda log_dir=/tmp/s2 2>&1 | grep -v "epoch [0-9]*/" | tail -4
  echo "stage2 wall seconds: $(( $(date +%s) - t ))"
  timeout 20 python3 stage2_classifier.py --cfg config/cifar10_lt/stage2_balms.yaml stage1.checkpoint=/tmp/s1/last.pt log_dir=/tmp/s2 --test 2>&1 | tail -14
  tar czf $OUT/stage2.tar.gz -C /tmp/s2 config.yaml metrics.jsonl test_metrics.json train.log
fi
mark "waiting for pytest"; wait; tail -25 $OUT/pytest_gpu.txt
mark "done"
