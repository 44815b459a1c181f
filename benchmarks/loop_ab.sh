#!/bin/bash
# A/B of the stage loop, interleaved: configs/sft_tiny.py through the launcher (200 steps, a
# metrics record every step, each side with its own compilation cache, warm after round 1), at
# commit OLD (a git worktree) and at the working tree. Prints each run's loop period (ms per step
# over steps 20-200, from metrics.jsonl's `time`) and its final loss.
#   bash benchmarks/loop_ab.sh OLD_COMMIT [ROUNDS]
# Run it on an idle machine, from the repository root, in the project's virtualenv.
set -e
old=$1; rounds=${2:-3}; root=$(pwd); tmp=$(mktemp -d)
git worktree add -f "$tmp/old" "$old" -q
for round in $(seq "$rounds"); do
  for side in old new; do
    if [ $side = old ]; then dir=$tmp/old; else dir=$root; fi
    rm -rf "$tmp/run_$side"
    (cd "$dir" && python -m r1jax.launch --config configs/sft_tiny.py --workdir "$tmp/run_$side" \
      --compilation_cache "$tmp/cc_$side" --config.stages.sft.steps=200 \
      --config.log.every_steps=1 > "$tmp/${side}_$round.log" 2>&1)
    python - "$tmp/run_$side/metrics.jsonl" "$side" "$round" <<'PY'
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
recs = [r for r in recs if r.get("stage") == "sft" and "loss" in r]
t = {r["step"]: r["time"] for r in recs}
print(f"{sys.argv[2]} round {sys.argv[3]}: period {(t[200] - t[20]) / 180 * 1e3:.1f} ms/step "
      f"(steps 20-200), final loss {recs[-1]['loss']:.8f}")
PY
  done
done
git worktree remove --force "$tmp/old"
