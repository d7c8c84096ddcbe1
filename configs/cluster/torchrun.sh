#!/bin/bash
# prefl with torchrun: one process per GPU; Lightning's TorchElasticEnvironment reads the ranks
# torchrun sets. Run from the repository root.
#
# One node, 8 GPUs (DDP overlay; --standalone starts a local rendezvous):
#   bash configs/cluster/torchrun.sh
# One node, FSDP2:
#   OVERLAY=configs/cluster/fsdp.yaml bash configs/cluster/torchrun.sh
# Two nodes x 8 GPUs: run the same command on every node, the same HEAD (a host name or IP of
# one of the nodes that all can reach), port 29500 open:
#   NNODES=2 HEAD=node001 OVERLAY=configs/cluster/fsdp.yaml bash configs/cluster/torchrun.sh
# Another stage: CONFIG=configs/examples/ppo_hh.yaml (or reward_hh.yaml, sft_hh.yaml).
# Extra arguments are passed on to `prefl fit`, e.g. --ckpt_path last to resume.
#
# The command it runs (two nodes, FSDP), for reference:
#   torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint node001:29500 \
#     --rdzv-id prefl -m prefl fit -c configs/examples/dpo_hh.yaml -c configs/cluster/fsdp.yaml \
#     --trainer.num_nodes 2 --trainer.devices 8 --trainer.strategy.init_args.data_parallel_size 16
# (`python -m prefl` is the `prefl` command; torchrun -m runs it in each process.)

set -euo pipefail

NNODES=${NNODES:-1}
NPROC=${NPROC:-8}  # GPUs per node
HEAD=${HEAD:-localhost}
PORT=${PORT:-29500}
CONFIG=${CONFIG:-configs/examples/dpo_hh.yaml}
OVERLAY=${OVERLAY:-configs/cluster/ddp.yaml}

# FSDP2 (ModelParallelStrategy) needs data_parallel_size = world size; other overlays ignore it.
EXTRA=()
if grep -q ModelParallelStrategy "$OVERLAY"; then
  EXTRA+=(--trainer.strategy.init_args.data_parallel_size $((NNODES * NPROC)))
fi

if [ "$NNODES" -eq 1 ]; then
  LAUNCH=(torchrun --standalone --nproc-per-node "$NPROC")
else
  LAUNCH=(torchrun --nnodes "$NNODES" --nproc-per-node "$NPROC"
    --rdzv-backend c10d --rdzv-endpoint "$HEAD:$PORT" --rdzv-id prefl)
fi

"${LAUNCH[@]}" -m prefl fit \
  -c "$CONFIG" \
  -c "$OVERLAY" \
  --trainer.num_nodes "$NNODES" \
  --trainer.devices "$NPROC" \
  ${EXTRA[@]+"${EXTRA[@]}"} \
  "$@"
