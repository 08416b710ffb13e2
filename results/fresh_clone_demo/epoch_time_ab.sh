export LT_DATA_ROOT=/work/main/datasets TQDM_DISABLE=1
PY=/work/main/.venv/bin/python
for i in 1 2; do
  for v in old new; do
    d=/work/main; [ $v = old ] && d=/tmp/ab_old
    rm -rf /tmp/ab_run_$v
    (cd $d && $PY stage1_train.py --cfg config/cifar10_lt/demo_stage1.yaml train.epochs=2 train.warmup=1 log_dir=/tmp/ab_run_$v 2>&1 | grep -o "epoch [0-9]/2.*train_seconds=[0-9.]*" | sed "s/loss.*train_seconds/train_seconds/; s/^/$v /")
  done
done
echo done
