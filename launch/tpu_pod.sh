#!/usr/bin/env bash
# Train r1jax on a Cloud TPU VM slice: create (or reuse) the slice, install r1jax on every worker,
# start the launcher on all workers at once and stream worker 0's log. See `--help`.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_pod.sh --name NAME --zone ZONE --accelerator TYPE --config CONFIG
                         --workdir DIR [options] [--config.KEY=VALUE ...]

Creates (or, with --reuse, reuses) the Cloud TPU VM slice NAME, installs r1jax on every worker
(a Python venv at ~/r1jax-venv with jax[tpu], the source at ~/r1jax), starts
`python -m r1jax.launch --config CONFIG --workdir DIR` on all workers (on a multi-host slice,
r1jax finds its peers in the VM metadata and starts jax.distributed) and streams worker 0's log
until the run ends; the exit status is the run's. The run does not depend on this terminal: Ctrl-C stops only the
streaming.

required:
  --name NAME          TPU VM name
  --zone ZONE          e.g. us-east5-a
  --accelerator TYPE   accelerator type, e.g. v5p-256, v5litepod-64, v6e-16, v4-32
  --config CONFIG      config file, relative to the repository root (configs/NAME.py[:ARG])
  --workdir DIR        run directory all workers share: gs://BUCKET/PATH, or a shared mount
                       (NFS, gcsfuse; see launch/README.md); running again with the same DIR
                       resumes the run

options:
  --project PROJECT    GCP project (default: gcloud's core/project)
  --version RUNTIME    TPU software version (default by accelerator: v6e v2-alpha-tpuv6e,
                       v5p v2-alpha-tpuv5, v5litepod/v5e v2-alpha-tpuv5-lite,
                       otherwise tpu-ubuntu2204-base)
  --repo URL|DIR       where the workers get r1jax: a git URL (cloned on every worker) or a
                       local git checkout (its --ref is packed with `git archive` and copied to
                       every worker; uncommitted changes are not included). Default: the checkout
                       holding this script
  --ref REF            git branch, tag or commit (default: the remote's default branch for a
                       URL, HEAD for a local checkout)
  --reuse              use the slice NAME if it exists (create it otherwise)
  --delete_after       delete the slice once the run has ended (not on Ctrl-C)
  --dry_run            print every command (each line starting with "+ ") without running any
  --config.KEY=VALUE   config overrides, passed on to r1jax.launch unchanged
  -h, --help           this text

example:
  launch/tpu_pod.sh --name r1-v5p --zone us-east5-a --project my-proj --accelerator v5p-256 \
      --config configs/deepseek_v3_671b.py --workdir gs://my-bucket/runs/v3 \
      --config.stages.grpo.steps=100 --delete_after
EOF
}

die() {  # a usage error: one line on stderr, exit status 2
  echo "error: $1 (see --help)" >&2
  exit 2
}

name="" zone="" project="" accelerator="" version="" config="" workdir=""
repo="" ref="" reuse=0 delete_after=0 dry_run=0
overrides=()

value_flags=" name zone project accelerator version config workdir repo ref "
while [[ $# -gt 0 ]]; do
  flag="${1%%=*}"
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --reuse) reuse=1 ;;
    --delete_after) delete_after=1 ;;
    --dry_run) dry_run=1 ;;
    --config.*) overrides+=("$1") ;;
    --*=*)  # --flag=VALUE
      [[ "$value_flags" == *" ${flag#--} "* ]] || die "unknown flag: $flag"
      declare "${flag#--}=${1#*=}" ;;
    --*)  # --flag VALUE
      [[ "$value_flags" == *" ${flag#--} "* ]] || die "unknown flag: $1"
      [[ $# -ge 2 ]] || die "$1 needs a value"
      declare "${flag#--}=$2"
      shift ;;
    *) die "unknown argument: $1" ;;
  esac
  shift
done

for flag in name zone accelerator config workdir; do
  [[ -n "${!flag}" ]] || die "--$flag is required"
done

if [[ -z "$version" ]]; then
  case "$accelerator" in
    v6e-*) version=v2-alpha-tpuv6e ;;
    v5p-*) version=v2-alpha-tpuv5 ;;
    v5litepod-*|v5e-*) version=v2-alpha-tpuv5-lite ;;
    *) version=tpu-ubuntu2204-base ;;
  esac
fi

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
repo="${repo:-$here}"
if [[ "$repo" == *://* || "$repo" == git@* ]]; then
  from_git_url=1
else
  from_git_url=0
  [[ -d "$repo" ]] || die "--repo $repo is neither a git URL nor a directory"
  ref="${ref:-HEAD}"
fi

# One word of shell, quoted only if it needs to be (for the remote shell and for printing); in
# --flag=VALUE only the value is quoted.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  elif [[ "$1" =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then
    printf '%s%s' "${BASH_REMATCH[1]}" "$(quote "${BASH_REMATCH[2]}")"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

quote_all() {
  local out="" word
  for word in "$@"; do out+="${out:+ }$(quote "$word")"; done
  printf '%s' "$out"
}

run() {  # print the command; run it unless --dry_run
  echo "+ $(quote_all "$@")"
  if [[ $dry_run -eq 0 ]]; then "$@"; fi
}

where=(--zone="$zone")
[[ -n "$project" ]] && where+=(--project="$project")
tpu=(gcloud compute tpus tpu-vm)

# 1. The slice.
create=("${tpu[@]}" create "$name" "${where[@]}" --accelerator-type="$accelerator"
        --version="$version")
if [[ $reuse -eq 1 ]]; then
  [[ $dry_run -eq 1 ]] && echo "# --reuse: the create below runs only if describe fails"
  if ! run "${tpu[@]}" describe "$name" "${where[@]}" --format="value(state)" ||
      [[ $dry_run -eq 1 ]]; then
    run "${create[@]}"
  fi
else
  run "${create[@]}"
fi

# 2. r1jax on every worker: source at ~/r1jax, a venv with jax[tpu] at ~/r1jax-venv (the TPU VM
# images' system Python can be older than r1jax needs; uv brings its own).
if [[ $from_git_url -eq 1 ]]; then
  fetch="rm -rf ~/r1jax && git clone --quiet $(quote "$repo") ~/r1jax"
  [[ -n "$ref" ]] && fetch+=" && git -C ~/r1jax checkout --quiet $(quote "$ref")"
else
  if [[ "$ref" == HEAD && -n "$(git -C "$repo" status --porcelain --untracked-files=no)" ]]; then
    echo "warning: $repo has uncommitted changes; the workers get HEAD without them" >&2
  fi
  tarball="${TMPDIR:-/tmp}/r1jax-$name.tar.gz"
  run git -C "$repo" archive --format=tar.gz --prefix=r1jax/ -o "$tarball" "$ref"
  run "${tpu[@]}" scp "$tarball" "$name:r1jax.tar.gz" "${where[@]}" --worker=all
  fetch="rm -rf ~/r1jax && tar -xzf ~/r1jax.tar.gz -C ~"
fi
install="set -e; $fetch"
install+="; command -v uv >/dev/null || [ -x ~/.local/bin/uv ]"
install+=" || curl -LsSf https://astral.sh/uv/install.sh | sh"
install+="; export PATH=\$HOME/.local/bin:\$PATH"
install+="; [ -x ~/r1jax-venv/bin/python ] || uv venv --quiet --python 3.11 ~/r1jax-venv"
install+="; uv pip install --quiet --python ~/r1jax-venv/bin/python -e \"\$HOME/r1jax[gcs]\""
install+=" \"jax[tpu]\""
run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="$install"

# 3. The run, on every worker, detached from the ssh session (a previous run started by this
# script is stopped first: it would hold the TPU). ~/r1jax-run.rc gets the exit status.
# On a multi-host slice r1jax reads the worker list from the VM metadata and starts
# jax.distributed (r1jax/parallel/distributed.py).
launch=(python -m r1jax.launch --config "$config" --workdir "$workdir" "${overrides[@]}")
start="cd ~/r1jax"
start+="; if [ -f ~/r1jax-run.pid ] && kill -0 \$(cat ~/r1jax-run.pid) 2>/dev/null;"
start+=" then kill -- -\$(cat ~/r1jax-run.pid); sleep 10; fi"
start+="; rm -f ~/r1jax-run.rc"
start+="; PATH=~/r1jax-venv/bin:\$PATH setsid nohup bash -c '\"\$@\" >~/r1jax-run.log 2>&1;"
start+=" echo \$? >~/r1jax-run.rc' r1jax $(quote_all "${launch[@]}")"
start+=" </dev/null >/dev/null 2>&1 & echo \$! >~/r1jax-run.pid"
run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="$start"

# 4. Worker 0's log until the run ends; then its exit status.
follow="tail -n +1 -F --pid=\$(cat ~/r1jax-run.pid) ~/r1jax-run.log 2>/dev/null"
follow+="; exit \$(cat ~/r1jax-run.rc 2>/dev/null || echo 1)"
trap 'echo; echo "stopped streaming; the run goes on. Follow it with:"
      echo "  $(quote_all "${tpu[@]}" ssh "$name" "${where[@]}" --worker=0 \
                --command="tail -F ~/r1jax-run.log")"; exit 130' INT
status=0
run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=0 --command="$follow" || status=$?
trap - INT

if [[ $delete_after -eq 1 ]]; then
  run "${tpu[@]}" delete "$name" "${where[@]}" --quiet
fi
exit "$status"
