# Short call: the augmentation draws in one pinned copy per chunk (working tree) against HEAD before it
# (.gpudata/base), bench/throughput.py at batch 512 on the same machine; then the GPU pipeline tests.
exec > >(tee $OUT/log.txt) 2>&1
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
T0=$(date +%s); mark() { echo "== [$(( $(date +%s) - T0 )) s] $*"; }
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpudata/*.whl && export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 .gpudata/make_cifar10.py /tmp/data >/dev/null; export LT_DATA_ROOT=/tmp/data
mark "before (c653e59), fp32"
(cd .gpudata/base && timeout 40 python3 bench/throughput.py --device cuda --batch-sizes 512 --amp off --steps 60 --warmup 5 --eval-images 10000 2>&1 | grep -v Warning | tee $OUT/throughput_before.txt)
mark "after, fp32 + bf16"
timeout 60 python3 bench/throughput.py --device cuda --batch-sizes 512 --amp off bf16 --steps 60 --warmup 5 --eval-images 10000 2>&1 | grep -v Warning | tee $OUT/throughput_after.txt
mark "gpu pipeline tests"
timeout 40 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu_pipeline.py tests/engine/test_device.py 2>&1 | tail -4 | tee $OUT/pytest_gpu_pipeline.txt
mark "done"
