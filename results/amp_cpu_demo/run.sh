#!/bin/bash
# fp32 vs bf16 (train.amp) on the CPU demo (run from logs/amp_cmp/ on 2026-11-27, two cores, nothing else running;
# the run directories here are copies without checkpoints): stage 1 (20 epochs) + --test, stage 2 balanced softmax + --test; seeds 0, 1.
cd "$(dirname "$0")/../.." && source .venv/bin/activate && export LT_DATA_ROOT=$PWD/datasets TQDM_DISABLE=1
mkdir -p logs/amp_cmp
for seed in 0 1; do for amp in off bf16; do
  d=logs/amp_cmp/s1_${amp}_seed${seed}
  s=$(date +%s)
  python stage1_train.py --cfg config/cifar10_lt/demo_stage1.yaml train.amp=$amp train.seed=$seed train.num_threads=2 log_dir=$d > $d.out 2>&1
  rc=$?; echo "stage1 $amp seed $seed: $(( $(date +%s) - s )) s rc $rc" >> logs/amp_cmp/times.txt
  python stage1_train.py --cfg config/cifar10_lt/demo_stage1.yaml train.amp=$amp train.seed=$seed train.num_threads=2 log_dir=$d --test >> $d.out 2>&1
  d2=logs/amp_cmp/s2bs_${amp}_seed${seed}
  s=$(date +%s)
  python stage2_classifier.py --cfg config/cifar10_lt/demo_stage2_balanced_softmax.yaml stage1.checkpoint=$d/best.pt train.amp=$amp train.seed=$seed train.num_threads=2 log_dir=$d2 > $d2.out 2>&1
  rc=$?; echo "stage2 $amp seed $seed: $(( $(date +%s) - s )) s rc $rc" >> logs/amp_cmp/times.txt
  python stage2_classifier.py --cfg config/cifar10_lt/demo_stage2_balanced_softmax.yaml stage1.checkpoint=$d/best.pt train.amp=$amp train.seed=$seed train.num_threads=2 log_dir=$d2 --test >> $d2.out 2>&1
done; done
echo done >> logs/amp_cmp/times.txt
