exec > >(tee $OUT/log.txt) 2>&1
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpudata/*.whl && export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 .gpudata/make_cifar10.py /tmp/data >/dev/null; export LT_DATA_ROOT=/tmp/data
echo "== bench"; date
timeout 150 python3 bench/throughput.py --device cuda --batch-sizes 128 512 --amp off bf16 --steps 60 --warmup 5 --eval-images 10000 2>&1 | grep -v Warning | tee $OUT/throughput_gpu.txt
echo "== stage1 paper schedule"; t=$(date +%s)
timeout 330 python3 stage1_train.py --cfg config/cifar10_lt/stage1_softmax.yaml train.device=cuda train.amp=bf16 log_dir=/tmp/s1 2>&1 | grep -v "epoch [0-9]*/" | tail -5
echo "stage1 wall seconds: $(( $(date +%s) - t ))"
timeout 60 python3 stage1_train.py --cfg config/cifar10_lt/stage1_softmax.yaml log_dir=/tmp/s1 --test 2>&1 | tail -12
cp /tmp/s1/metrics.jsonl $OUT/s1_metrics.jsonl; cp /tmp/s1/config.yaml $OUT/s1_config.yaml; cp /tmp/s1/test_metrics.json $OUT/s1_test_metrics.json; cp /tmp/s1/train.log $OUT/s1_train.log
echo "== pytest -m gpu"; date
timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider 2>&1 | tail -15 | tee $OUT/pytest_gpu.txt
echo "== compile"; date
timeout 100 python3 bench/throughput.py --device cuda --batch-sizes 512 --amp bf16 --steps 60 --warmup 5 --eval-images 10000 --compile 2>&1 | grep -v Warning | tee $OUT/throughput_gpu_compile.txt
date
