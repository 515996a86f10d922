#!/usr/bin/env bash
# usage: bash run.sh MODE [NGPUS] [extra args...]
#   MODE   base | c | cs | cr   -> configs/${DATASET}_${MODE}.json (base -> configs/${DATASET}.json)
#          demo                 -> the CPU demo: all four modes on the built-in dataset, then a summary
#   NGPUS  processes to launch (default 1; 0 or no CUDA -> CPU with gloo)
#   DATASET=celeba64 bash run.sh cs 6       CUDA_VISIBLE_DEVICES=0,1,3,5 bash run.sh cr 4 --train.lr=1e-4
#   PYTHON=/path/to/python bash run.sh c    the interpreter to use (default: python3 on PATH)
set -euo pipefail
cd "$(dirname "$0")"
usage() { sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//' >&"${2:-2}"; exit "${1:-2}"; }
python=${PYTHON:-python3}
command -v "$python" >/dev/null || { echo "run.sh: no Python interpreter '$python' (set PYTHON=/path/to/python)" >&2; exit 2; }
mode=${1:-}; [ $# -gt 0 ] && shift
dataset=${DATASET:-celeba32}
case "$mode" in
  -h|--help|help) usage 0 1 ;;
  base) config=configs/${dataset}.json ;;
  c|cs|cr) config=configs/${dataset}_${mode}.json ;;
  demo) set -x; exec "$python" diffcl.py demo "$@" ;;
  *) echo "run.sh: unknown mode '${mode}'" >&2; usage ;;
esac
[ -f "$config" ] || { echo "run.sh: no config $config (DATASET=$dataset)" >&2; usage; }
ngpus=1
if [ $# -gt 0 ] && [[ $1 != --* ]]; then
  [[ $1 =~ ^[0-9]+$ ]] || { echo "run.sh: NGPUS must be a number, got '$1'" >&2; usage; }
  ngpus=$1; shift
fi
# One Python start: the process count (NGPUS; 0 or no CUDA -> CPU gloo processes, 2 on a 2-core laptop is plenty),
# and the config, its batch split and the dataset checked once, here, so a mistake is one line (exit 2), not one per
# rank.
procs=$("$python" -c 'import sys, diffcl; sys.exit(diffcl.preflight(sys.argv[2:], int(sys.argv[1])))' \
    "$ngpus" --config-path "$config" "$@") || exit 2
# torchrun's own launcher, through diffcl.torchrun: a run that stops on a user error exits 2 after its one line
# (plain torchrun would add its failure report and exit 1).
args=(--standalone --nproc_per_node="$procs" diffcl.py train --config-path "$config" "$@")
echo "+ $python -m torch.distributed.run ${args[*]}" >&2
exec "$python" -c 'import sys, diffcl; sys.exit(diffcl.torchrun(sys.argv[1:]))' "${args[@]}"
