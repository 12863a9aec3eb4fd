#!/bin/bash
# The GPU checks of issue 20 as one call on a lent GPU machine, which has about 15 minutes for everything:
#   1. the CUDA-graph tests (`pytest tests -k cuda`: graph replays against eager steps, resume on CUDA);
#   2. tests/bench.py, eager against cuda-graph, for every update and the online loops, then again with a fused Adam;
#   3. CORL's eager IQL trainer and iql.py back to back on the same GPU (ratios from one run);
#   4. short real runs through main() of iql, idql, sac_20min, rlpd and (where EGL works) fastrlap, side by side;
#   5. torch.compile against eager, with the time that is left.
# Each stage has its own time limit and writes its log to $OUT, so a failing stage costs its limit only.
#
# Set-up, on this side (the files stay out of the repository; $FILES defaults to .gpu):
#   mkdir -p .gpu && echo /.gpu/ >> .git/info/exclude
#   cp ../shared/gpu-wheels/*.whl ../shared/data/hopper-medium-local.hdf5 ../shared/peers/peer_iql_bench.py .gpu/
#   cp CORL/algorithms/offline/iql.py .gpu/corl_iql.py      # optional: stage 3 is skipped without it
# then run `bash tests/gpu_check.sh` on the device with `.gpu` carried (about 60 MiB of the 64 allowed).
# DRY=1 runs every stage on a CPU with tiny sizes and no install: a check of this script, not of a GPU.
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
export MUJOCO_GL=disable  # the GPU image has no libEGL: `import mujoco` fails under egl there
FILES=${FILES:-.gpu}
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
R=$(mktemp -d)  # the runs' folders
T0=$(date +%s)
stamp() { echo "=== $1 at +$(( $(date +%s) - T0 ))s"; }
left() { echo $(( T0 + ${BUDGET:-540} - $(date +%s) )); }
if [ -n "$DRY" ]; then
  IQL=300; IDQL=200; ONL=1100; FAST=600; PRE=50; BENCH=5; EV=150; EPISODES=1; RUN_S=240; MODES="eager"
else
  IQL=100000; IDQL=20000; ONL=6000; FAST=4000; PRE=3000; BENCH=300; EV=25000; EPISODES=10; RUN_S=150; MODES="eager cuda-graph"
fi

stamp setup
if [ -z "$DRY" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target .site "$FILES"/*.whl 2>&1 | tail -3
  export PYTHONPATH=$PWD/.site
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
fi
python3 -c "import sys, torch, gymnasium, mujoco, tyro; print('python', sys.version.split()[0], 'torch', torch.__version__,
  'cuda:', torch.cuda.is_available() and torch.cuda.get_device_name(), 'gymnasium', gymnasium.__version__, 'mujoco', mujoco.__version__)"

stamp runs  # first, in the background: the tests and benches below share the GPU with them (so the runs' speed is not the bench's)
D=$FILES/hopper-medium-local.hdf5
COMMON="--eval-episodes $EPISODES --seed 0"
timeout $RUN_S python3 iql.py --env hopper-medium-v2 --dataset $D --max-steps $IQL --eval-interval $EV $COMMON \
  --log-interval $((IQL / 10)) --run-dir $R/iql > $R/iql.log 2>&1 &
timeout $RUN_S python3 idql.py --env hopper-medium-v2 --dataset $D --max-steps $IDQL --eval-interval $((IDQL / 2)) $COMMON \
  --run-dir $R/idql > $R/idql.log 2>&1 &
timeout $RUN_S python3 sac_20min.py --env Hopper-v4 --total-timesteps $ONL --eval-interval $((ONL / 2)) $COMMON \
  --run-dir $R/sac_20min > $R/sac_20min.log 2>&1 &
timeout $RUN_S python3 rlpd.py --env hopper-medium-v2 --dataset $D --total-timesteps $ONL --learning-starts 1000 \
  --eval-interval $((ONL / 2)) $COMMON --run-dir $R/rlpd > $R/rlpd.log 2>&1 &
# fastrlap renders its camera, so it needs an OpenGL context (the earlier GPU image had none: then it is skipped)
if MUJOCO_GL=egl timeout 30 python3 -c "import mujoco; mujoco.Renderer(mujoco.MjModel.from_xml_string('<mujoco/>'), 8, 8)" 2>/dev/null; then
  MUJOCO_GL=egl timeout $RUN_S python3 fastrlap.py --pretrain-courses 2 --pretrain-drive-steps 500 --pretrain-steps $PRE \
    --total-timesteps $FAST --eval-interval $((FAST / 2)) \
    --seed 0 --run-dir $R/fastrlap > $R/fastrlap.log 2>&1 &
else
  echo "fastrlap run skipped: no EGL context for its camera" > $R/fastrlap.log
fi

stamp tests
timeout 150 python3 -m pytest tests -k cuda -q -rs -p no:cacheprovider > "$OUT/tests.log" 2>&1
tail -4 "$OUT/tests.log"

stamp bench
timeout 150 python3 tests/bench.py --scripts iql idql idql-select sac_20min rlpd fastrlap fastrlap-pretrain revind \
  --modes $MODES --steps $BENCH > "$OUT/bench.log" 2>&1
timeout 60 python3 tests/bench.py --scripts sac_20min-env rlpd-env --modes $MODES --steps $((BENCH / 5 + 1)) 2>&1 \
  | tail -2 >> "$OUT/bench.log"  # the two rows only (the table header is already there)
cat "$OUT/bench.log"

stamp fused-adam  # what a fused Adam step would buy (changes the last bits; see bench.py)
timeout 100 python3 tests/bench.py --fused-adam --scripts iql sac_20min rlpd fastrlap --modes $MODES --steps $BENCH \
  > "$OUT/bench_fused.log" 2>&1
cat "$OUT/bench_fused.log"

stamp peer  # CORL's eager trainer, then ours, back to back
if [ -f "$FILES/corl_iql.py" ]; then
  DEV=$(python3 -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
  timeout 40 python3 "$FILES/peer_iql_bench.py" --corl-iql "$FILES/corl_iql.py" --device $DEV --seconds 3 --repeats 3 > "$OUT/peer.log" 2>&1
  timeout 40 python3 tests/bench.py --scripts iql --modes $MODES --steps $((BENCH * 5)) >> "$OUT/peer.log" 2>&1
  tail -4 "$OUT/peer.log"
else
  echo "no $FILES/corl_iql.py: skipped"
fi

stamp runs-wait
wait
for n in iql idql sac_20min rlpd fastrlap; do
  echo "##### $n"; tail -4 $R/$n.log; cat $R/$n/evaluations.csv 2>/dev/null
done > "$OUT/runs.log" 2>&1
cat "$OUT/runs.log"

stamp compile  # with what is left of the budget
L=$(left)
if [ "$L" -gt 60 ]; then
  timeout $((L - 15)) python3 tests/bench.py --scripts iql idql sac_20min rlpd --modes eager compile --steps $BENCH \
    > "$OUT/compile.log" 2>&1
  cat "$OUT/compile.log"
else
  echo "skipped: $L s left"
fi
rm -rf "$R"
stamp end
