#!/usr/bin/env bash
# One prepared run on a lent accelerator (an H200 here; issue 13), from the repository root:
#   bash benchmarks/accelerator_run.sh            # logs and JSON under $OUT (default /tmp/r1jax-out)
# 1. the GPU-meaningful unit tests (model, HF parity, sampler, losses, kernels) with
#    JAX_PLATFORMS=cuda, at the same time as 4. (neither is a timing)
# 2. benchmarks/pallas_kernels_bench.py with R1JAX_MOSAIC_GPU=1: compiled kernels against their
#    references, then FP8 vs bf16 GEMM timings at DeepSeek-V3 shapes
# 3. benchmarks/accelerator_steps.py: SFT and GRPO step throughput and MFU (dense ~0.5B, MoE ~1B
#    active); STEPS_CAP=300 STEPS_ARGS="--models moe --kinds sft --moe_impls ragged_dot --fp8 xla,mosaic"
#    times the FP8 recipe beside bf16 (what decides the full-size configs' default)
# 4. configs/r1_tiny.py end to end, with its wall time (started first, in the background; the
#    benchmarks wait for it or for its time cap)
# PHASES (default tests,recipe,kernels,steps) picks the phases and their order; the recipe always
# starts first, in the background, and the timed phases wait for it.
# Packages the machine lacks travel as wheels in .whl/ (see the device README). Each phase has
# its own time cap and prints one summary line; a failing phase does not stop the later ones.
set -u
OUT=${OUT:-/tmp/r1jax-out}
mkdir -p "$OUT"
T0=$(date +%s)
say() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "$OUT/summary.txt"; }
RECIPE_CAP=${RECIPE_CAP:-240}
TESTS_CAP=${TESTS_CAP:-200}
KERNELS_CAP=${KERNELS_CAP:-90}
STEPS_CAP=${STEPS_CAP:-150}
PHASES=${PHASES:-tests,recipe,kernels,steps}

if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { say "FAILED: installing the carried wheels"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
say "$(python3 -c 'import jax, flax, optax, orbax.checkpoint as o, grain, sys
print("python", sys.version.split()[0], "jax", jax.__version__, "flax", flax.__version__,
      "optax", optax.__version__, "orbax", o.__version__, "devices", jax.devices())' 2>&1 | tail -1)"
say "$(nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader 2>&1)"

recipe_pid=
if [[ $PHASES == *recipe* ]]; then
  (
    s=$(date +%s)
    JAX_PLATFORMS=cuda timeout -k 5 "$RECIPE_CAP" python3 -m r1jax.launch \
      --config configs/r1_tiny.py --workdir /tmp/r1_tiny_gpu \
      --compilation_cache /tmp/r1jax-jax-cache > "$OUT/recipe.log" 2>&1
    echo "rc $? wall_s $(( $(date +%s) - s ))" >> "$OUT/recipe.log"
  ) &
  recipe_pid=$!
fi

phase_tests() {
  # SIGINT at the cap: pytest then still prints its summary of the failures so far
  JAX_PLATFORMS=cuda JAX_DEFAULT_MATMUL_PRECISION=highest timeout -s INT -k 15 "$TESTS_CAP" \
    python3 -m pytest -p no:cacheprovider -p no:benchmark -n "${PYTEST_N:-8}" -q -rf \
    --tb=line --durations=5 ${TEST_FILES:-tests/test_model.py tests/test_hf_parity.py \
    tests/test_qwen3.py tests/test_sampler.py tests/test_losses.py tests/test_grpo_onpolicy.py} \
    ${TEST_K:+-k "$TEST_K"} > "$OUT/tests.log" 2>&1
  say "tests (rc $?): $(grep -E '(passed|failed|error)' "$OUT/tests.log" | tail -1)"
  # the failures again under XLA's deterministic GPU ops: tells nondeterminism from other causes
  failed=$(grep -oE '^FAILED [^ ]+' "$OUT/tests.log" | cut -d' ' -f2 | head -12)
  if [ -n "$failed" ] && [ "${DETERMINISTIC_RERUN:-1}" = 1 ]; then
    XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_deterministic_ops=true" JAX_PLATFORMS=cuda \
      JAX_DEFAULT_MATMUL_PRECISION=highest timeout -s INT -k 15 "${RERUN_CAP:-90}" \
      python3 -m pytest -p no:cacheprovider -p no:benchmark -n "${PYTEST_N:-8}" -q -rf \
      --tb=line $failed > "$OUT/tests_deterministic.log" 2>&1
    say "failures rerun with --xla_gpu_deterministic_ops (rc $?): $(grep -E '(passed|failed|error)' "$OUT/tests_deterministic.log" | tail -1)"
  fi
}

wait_recipe() {  # the timed phases run alone
  [ -n "$recipe_pid" ] || return 0
  wait "$recipe_pid"
  cp /tmp/r1_tiny_gpu/summary.json "$OUT/recipe_summary.json" 2>/dev/null
  say "r1_tiny: $(tail -1 "$OUT/recipe.log"); $(python3 -c '
import json, sys
s = json.load(open(sys.argv[1]))
print("stages", [(st["name"], round(st.get("wall_seconds", 0)), st.get("eval", {}).get("accuracy"),
       st.get("eval", {}).get("heldout", {}).get("accuracy")) for st in s["stages"]])
' /tmp/r1_tiny_gpu/summary.json 2>&1 | tail -1)"
  recipe_pid=
}

phase_kernels() {
  R1JAX_MOSAIC_GPU=1 timeout -k 5 "$KERNELS_CAP" python3 benchmarks/pallas_kernels_bench.py \
    > "$OUT/kernels.log" 2>&1
  rc=$?
  cp benchmarks/results/kernels.json "$OUT/kernels.json" 2>/dev/null
  say "kernels (rc $rc): $(grep -E 'fp8 (matmul|mosaic)|bf16 jnp.dot|G=' "$OUT/kernels.log" | tr -s ' ' | head -12 | tr '\n' ';')"
}

phase_steps() {
  timeout -k 5 "$STEPS_CAP" python3 benchmarks/accelerator_steps.py \
    --budget_s $(( STEPS_CAP - 45 )) ${STEPS_ARGS:-} --out "$OUT/accelerator_steps.json" > "$OUT/steps.log" 2>&1
  say "steps (rc $?):"
  grep -E '^(moe|dense)' "$OUT/steps.log" | tee -a "$OUT/summary.txt"
}

# the phases in the order PHASES names them (the recipe started above, in the background)
for phase in ${PHASES//,/ }; do
  case $phase in
    tests) phase_tests ;;
    kernels) wait_recipe; phase_kernels ;;
    steps) wait_recipe; phase_steps ;;
    recipe) ;;
    *) say "unknown phase $phase" ;;
  esac
done
wait_recipe
say "done"
