#!/usr/bin/env bash
# The GPU check: one command for a fresh GPU machine (built for an H200: sm_90a) with no internet.
#
#   bash bench/gpu_check.sh            # from the repository root
#
# Stages, each recorded (exit code, seconds, log), each in its own process group under a time cap
# (killed whole when it runs over), none fatal to the others:
#   env        nvidia-smi (clocks, power, MIG), python / torch / nvcc versions
#   build      python setup.py build_ext --inplace, MOLE_EXT_FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST=9.0a
#              (GPU_CHECK_ARCHS overrides; an arch list the image exports is ignored: each arch is
#              a whole extra compile). If it fails, a CPU-only build follows, so the later stages
#              still run (the CUDA tests then fail on the missing kernels, saying so).
#   info       python -m mole_ext.info (which ops have a CUDA kernel)
#   tests      pytest, one process per file (a fault that breaks the CUDA context costs one file):
#              test_index_math, test_cuda_router, _permute, _load_balance, _grouped_lora, then the
#              CUDA cases (-k cuda) of the op, module and training tests, then test_build.py whole
#   bench      python bench/routing.py --quick, bench/grouped_gemm.py --quick and --profile, bench/mole_ffn.py
#   memcheck   compute-sanitizer --tool memcheck over bench/gpu_check_kernels.py (each kernel once,
#   racecheck  ... and --tool racecheck; the two run at the same time, PyTorch's caching allocator off)
#   train      python -m training.demo --model tiny (the main job on the GPU), then
#              python bench/train_step.py --config 7b (LLaVA-MoLE vs plain-LoRA LLaVA training step,
#              random bf16 7B weights): last, only with time left in the budget (a skip is not a
#              failure); `GPU_CHECK_STAGES="env info train"` runs it alone after a build
# Output: gpu_check.json and gpu_check.md (summary), gpu_check.log (every stage's output),
# junit.xml (all test files), the benchmarks' tables (routing-cuda.md, ...), in $OUT when set, else
# bench/results/gpu_check-<UTC date>/. At most 8 files, so a caller that brings back only a
# few files gets all of them. The whole run stays under 8 minutes: each stage gets a time cap,
# cut further to what is left of the budget (GPU_CHECK_BUDGET_S, default 470 s). Exit code: 0
# when every stage passed, else 1.
# GPU_CHECK_STAGES="env tests bench" runs a subset (e.g. after a build already done).
#
# Python packages the machine lacks travel as wheels in the git-ignored folder .whl/ at the
# repository root (download them on a machine with internet, for the GPU machine's Python, e.g.
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl NAME==VERSION
# ). When .whl/ holds wheels this script installs them with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
# and puts /tmp/site on PYTHONPATH. mole_ext itself needs only torch and numpy, which the H200
# image has, so .whl/ is normally absent.

set -u
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-470}
T0=$(date +%s)
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
DEST=${OUT:-$ROOT/bench/results/gpu_check-$STAMP}
mkdir -p "$DEST"
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
STAGES="$WORK/stages.tsv"
: > "$STAGES"
export PYTHONUNBUFFERED=1

# ---- environment ------------------------------------------------------------------------------
if ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$ROOT"/.whl/*.whl > "$WORK/wheels.log" 2>&1 && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${CUDA_HOME:-}" ]; then
  if [ -x /usr/local/cuda/bin/nvcc ]; then
    export CUDA_HOME=/usr/local/cuda
  elif command -v nvcc >/dev/null 2>&1; then
    export CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
  fi
fi
NPROC=$(nproc 2>/dev/null || echo 8)

# GPU_CHECK_STAGES picks stages (e.g. "env tests bench" to rerun without rebuilding).
WANTED=${GPU_CHECK_STAGES:-env build info tests memcheck racecheck bench train}
export ROOT PY WORK NPROC

# run_stage NAME CAP_SECONDS FUNCTION: runs the (exported) shell function in its own process
# group under a time cap (the cap, or what is left of the budget), logs to $WORK/NAME.log,
# records "name rc seconds". Over the cap the whole group is killed (TERM, then KILL 10 s
# later), children included, and rc is 124.
run_stage() {
  local name=$1 cap=$2 fn=$3
  local now left limit rc start pid wd
  case " $WANTED " in *" $name "*) ;; *) return ;; esac
  now=$(date +%s)
  left=$((BUDGET - (now - T0) - 15))
  limit=$cap
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 5 ]; then
    echo "skipped: out of the time budget" > "$WORK/$name.log"
    printf '%s\t%s\t%s\n' "$name" "skipped" 0 >> "$STAGES"
    echo "== $name: skipped (out of the time budget)"
    return
  fi
  start=$(date +%s)
  echo "== $name (cap ${limit}s)"
  setsid bash -c "$fn" > "$WORK/$name.log" 2>&1 < /dev/null &
  pid=$!
  ( sleep "$limit"; touch "$WORK/$name.timeout"; kill -TERM -- "-$pid" 2>/dev/null
    sleep 10; kill -KILL -- "-$pid" 2>/dev/null ) &
  wd=$!
  wait "$pid"
  rc=$?
  kill "$wd" 2>/dev/null
  wait "$wd" 2>/dev/null
  if [ -e "$WORK/$name.timeout" ]; then
    rc=124
    echo "[gpu_check: stopped at the ${limit}s cap]" >> "$WORK/$name.log"
  fi
  printf '%s\t%s\t%s\n' "$name" "$rc" $(( $(date +%s) - start )) >> "$STAGES"
  echo "   -> $name rc=$rc in $(( $(date +%s) - start ))s"
  tail -n 5 "$WORK/$name.log" | sed "s/^/   | $name: /"
}

env_stage() {
  nvidia-smi || true
  nvidia-smi --query-gpu=name,mig.mode.current,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,pstate,temperature.gpu \
    --format=csv || true
  echo "python: $(command -v "$PY") $("$PY" --version 2>&1)"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
  echo "CUDA_HOME=${CUDA_HOME:-unset}  TORCH_CUDA_ARCH_LIST in the image: ${TORCH_CUDA_ARCH_LIST:-unset} (the build uses ${GPU_CHECK_ARCHS:-9.0a})"
  "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" --version || nvcc --version || true
  command -v compute-sanitizer || echo "compute-sanitizer not on PATH"
  echo "cores: $NPROC"
  git -C "$ROOT" log --oneline -1 || true
}

build_stage() {
  cd "$ROOT" || return 2
  local rc=0
  # only this script's arch list: an image-wide TORCH_CUDA_ARCH_LIST (NGC images export several)
  # would compile every .cu once per arch and overrun the cap
  echo "== CUDA build, TORCH_CUDA_ARCH_LIST=${GPU_CHECK_ARCHS:-9.0a}"
  MOLE_EXT_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${GPU_CHECK_ARCHS:-9.0a}" \
    MAX_JOBS="${MAX_JOBS:-$NPROC}" "$PY" setup.py build_ext --inplace || rc=$?
  if [ "$rc" -ne 0 ]; then
    # keep the rest of the session useful: CPU kernels (the CUDA tests then fail, naming the
    # missing kernels; MoLEFFN on CUDA runs through the references), and report the build failed
    echo "== the CUDA build failed (rc=$rc): building the CPU kernels only (MOLE_EXT_SKIP_CUDA=1)"
    MOLE_EXT_SKIP_CUDA=1 MAX_JOBS="${MAX_JOBS:-$NPROC}" "$PY" setup.py build_ext --inplace
    echo "== CPU-only build rc=$?"
  fi
  return $rc
}

info_stage() {
  cd "$ROOT" && "$PY" -m mole_ext.info
}

# one pytest process per file, each under its own cap, verbose (failures appear as they happen),
# its own junit file (merged in the summary); a fault in one file leaves the others' results
tests_stage() {
  cd "$ROOT" || return 2
  local rc=0 f r name
  export MOLE_EXT_TEST_THREADS=$NPROC  # the CPU references dominate the tests' time
  pyt() {  # pyt NAME CAP ARGS...
    local name=$1 cap=$2
    shift 2
    echo "== pytest $name: $*"
    timeout --kill-after=5 "$cap" "$PY" -m pytest -v -p no:cacheprovider -rfEs --tb=short \
      --junitxml="$WORK/junit_$name.xml" "$@"
    r=$?
    [ "$r" -eq 124 ] && echo "== pytest $name: stopped at its ${cap}s cap"
    # exit code 5 = nothing collected
    [ "$r" -ne 0 ] && [ "$r" -ne 5 ] && rc=$r
    return 0
  }
  pyt index_math 30 tests/test_index_math.py
  for f in router permute load_balance grouped_lora; do
    [ -f "tests/test_cuda_$f.py" ] && pyt "cuda_$f" 90 "tests/test_cuda_$f.py"
  done
  # everyone else's CUDA cases (ids containing "cuda"): the op families and the module
  pyt others 90 -k cuda tests/test_router.py tests/test_permute.py tests/test_grouped_lora.py \
    tests/test_load_balance.py tests/test_module.py
  # the training package's CUDA cases, apart: they import transformers, which the image has in
  # another version than requirements.txt pins (a failed import then costs this file only)
  pyt training 40 -k cuda tests/test_training.py
  # the build checks, whole (none has "cuda" in its id)
  pyt build 30 tests/test_build.py
  return $rc
}

# sanitizer_stage TOOL: compute-sanitizer over bench/gpu_check_kernels.py. Only kernels whose
# name contains mole_ext are instrumented (torch's own kernels run uninstrumented), which keeps
# the run short; without that filter option (an older compute-sanitizer) it checks everything.
# PyTorch's caching allocator is off: inside one of its 2 MiB blocks an access past a small
# tensor would still be in allocated memory, invisible to memcheck.
sanitizer_stage() {
  cd "$ROOT" || return 2
  local tool=$1 cs rc
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1
  cs=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
  "$cs" --tool "$tool" --error-exitcode 99 --kernel-name kns=mole_ext "$PY" bench/gpu_check_kernels.py 2>&1 \
    | tee "$WORK/$tool.raw"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ] && grep -qi -e "unrecognized option" -e "unknown option" -e "invalid option" "$WORK/$tool.raw"; then
    echo "== retrying without --kernel-name"
    "$cs" --tool "$tool" --error-exitcode 99 "$PY" bench/gpu_check_kernels.py
    rc=$?
  fi
  return $rc
}
memcheck_stage() { sanitizer_stage memcheck; }
racecheck_stage() { sanitizer_stage racecheck; }

bench_stage() {
  cd "$ROOT" || return 2
  local rc=0 b
  # Each benchmark is time-boxed so that all four fit the stage's 150 s cap (the timeouts sum to
  # 145 s); grouped_gemm prints each case as it finishes, so a cut run still leaves numbers.
  timeout 30 "$PY" bench/routing.py --quick --json "$WORK/routing.json" || rc=$?
  # grouped_gemm --quick: 16 of the 72 configurations; the full table is
  # `python bench/grouped_gemm.py` (a few minutes on an H200)
  if [ -f bench/grouped_gemm.py ]; then
    echo "== bench/grouped_gemm.py --quick"
    timeout 50 "$PY" bench/grouped_gemm.py --quick || rc=$?
    echo "== bench/grouped_gemm.py --profile (mole_ext's kernels, each one's share of its call)"
    timeout 20 "$PY" bench/grouped_gemm.py --profile || rc=$?
  fi
  if [ -f bench/mole_ffn.py ]; then
    echo "== bench/mole_ffn.py"
    timeout 45 "$PY" bench/mole_ffn.py || rc=$?
  fi
  return $rc
}

train_stage() {
  cd "$ROOT" || return 2
  local rc=0 cfg=7b
  # the README's main job on the GPU, at the tiny model size (the SmolLM2 weights and the gguf
  # package are not on the image): both stages under bf16 autocast, evaluation, heatmaps
  echo "== python -m training.demo --model tiny"
  timeout 60 "$PY" -m training.demo --model tiny --out "$WORK/demo" > "$WORK/demo_run.log" 2>&1 || rc=1
  grep -v 'it/s\]' "$WORK/demo_run.log" | tail -n 20  # without the progress bars
  # two providers, each its own process: import, random 7B init on the GPU, 1 warm-up + 3 steps
  # (without a GPU, as when this script is checked on a CPU machine: the tiny configuration)
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || cfg=tiny
  echo "== bench/train_step.py --config $cfg"
  timeout 110 "$PY" bench/train_step.py --config "$cfg" --steps 3 --warmup 1 --no-save || rc=1
  return $rc
}

export -f train_stage env_stage build_stage info_stage tests_stage sanitizer_stage memcheck_stage racecheck_stage bench_stage
export CUDA_HOME BUDGET

touch "$WORK/t0"
run_stage env 30 env_stage
run_stage build 240 build_stage
run_stage info 30 info_stage
run_stage tests 150 tests_stage
# the benchmarks before the sanitizers: their numbers are what a GPU session is for, and the
# sanitizers' two runs share the rest (concurrently: tiny workloads on one GPU)
run_stage bench 150 bench_stage
run_stage memcheck 90 memcheck_stage &
SAN1=$!
run_stage racecheck 90 racecheck_stage &
SAN2=$!
wait "$SAN1" "$SAN2"
run_stage train 180 train_stage

# ---- summary: gpu_check.json, gpu_check.md, gpu_check.log (+ rows, junit) ---------------------
{
  for f in env build info tests bench memcheck racecheck train; do
    [ -f "$WORK/$f.log" ] && { echo "################ $f"; cat "$WORK/$f.log"; }
  done
} > "$WORK/all.log"
# keep the log under 15 MiB (the file limit of the device tool): head and tail of it
if [ "$(stat -c %s "$WORK/all.log")" -gt 15000000 ]; then
  { head -c 5000000 "$WORK/all.log"; echo; echo "[... log cut ...]"; tail -c 9000000 "$WORK/all.log"; } > "$DEST/gpu_check.log"
else
  cp "$WORK/all.log" "$DEST/gpu_check.log"
fi
# the benchmarks' latest tables (bench/harness.py writes bench/results/<name>-cuda.md); their
# rows are appended to bench/results/<name>.jsonl in the tree
for f in routing mole_ffn grouped_gemm; do
  [ -f "bench/results/$f-cuda.md" ] && [ "bench/results/$f-cuda.md" -nt "$WORK/t0" ] && cp "bench/results/$f-cuda.md" "$DEST/"
done

"$PY" - "$WORK" "$DEST" "$(( $(date +%s) - T0 ))" <<'PYEOF'
import json, os, re, sys, xml.etree.ElementTree as ET
work, dest, total = sys.argv[1], sys.argv[2], int(sys.argv[3])
stages = []
for line in open(os.path.join(work, "stages.tsv")):
    name, rc, secs = line.rstrip("\n").split("\t")
    log = open(os.path.join(work, name + ".log"), errors="replace").read() if os.path.exists(os.path.join(work, name + ".log")) else ""
    st = {"stage": name, "rc": rc, "seconds": int(secs),
          "status": "skipped" if rc == "skipped" else ("ok" if rc == "0" else ("timeout" if rc in ("124", "137") else "failed")),
          "tail": log.strip().splitlines()[-15:]}
    if name in ("memcheck", "racecheck"):
        m = re.findall(r"ERROR SUMMARY: (\d+) error", log)
        st["sanitizer_errors"] = [int(x) for x in m]
        st["hazards"] = re.findall(r"RACECHECK SUMMARY: .*", log)
    stages.append(st)
tests = {}
merged = ET.Element("testsuites")
for jn in sorted(f for f in os.listdir(work) if f.startswith("junit_") and f.endswith(".xml")):
    name = jn[len("junit_"):-len(".xml")]
    try:
        root = ET.parse(os.path.join(work, jn)).getroot()
        suites = [root] if root.tag == "testsuite" else list(root)
        agg = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
        fails = [f"{c.get('classname')}::{c.get('name')}" for s in suites for c in s
                 if c.find("failure") is not None or c.find("error") is not None]
        agg["failed_cases"] = fails[:50]
        tests[name] = agg
        for su in suites:
            su.set("name", name)
            merged.append(su)
    except Exception as exc:  # a file cut off by a timeout
        tests[name] = {"parse_error": repr(exc)}
if len(merged):
    ET.ElementTree(merged).write(os.path.join(dest, "junit.xml"), encoding="utf-8", xml_declaration=True)
bench = None
p = os.path.join(work, "routing.json")
if os.path.exists(p):
    bench = json.load(open(p))
env_log = open(os.path.join(work, "env.log"), errors="replace").read() if os.path.exists(os.path.join(work, "env.log")) else ""
summary = {"total_seconds": total, "stages": stages, "tests": tests, "env_log": env_log.splitlines()[:40],
           "routing_bench": bench}
json.dump(summary, open(os.path.join(dest, "gpu_check.json"), "w"), indent=1, default=str)

md = ["# mole_ext GPU check", ""]
if bench:
    e = bench["env"]
    md.append(f"{e.get('device')} · torch {e.get('torch')} (CUDA {e.get('cuda')}) · commit {e.get('git_commit')} · {e.get('date')} · {total} s in all")
    md.append("")
md += ["| stage | status | rc | seconds |", "|---|---|---|---|"]
for s in stages:
    extra = ""
    if "sanitizer_errors" in s:
        extra = f" (errors: {s['sanitizer_errors']})"
    md.append(f"| {s['stage']} | {s['status']}{extra} | {s['rc']} | {s['seconds']} |")
md.append("")
if tests:
    md += ["| test file | tests | failures | errors | skipped | failed cases |", "|---|---|---|---|---|---|"]
    for name, t in tests.items():
        if "parse_error" in t:
            md.append(f"| {name} | junit unreadable: {t['parse_error']} | | | | |")
        else:
            md.append(f"| {name} | {t['tests']} | {t['failures']} | {t['errors']} | {t['skipped']} | "
                      f"{', '.join(t['failed_cases'][:10])} |")
    md.append("")
if bench:
    md += ["## bench/routing.py (--quick)", "",
           "| op | mode | N | K | d | mole_ext us (p20-p80) | GB/s | of copy | reference us | speed-up | target |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    refs = {(r["op"], r["mode"], r["n"], r["k"]): r for r in bench["rows"] if r["provider"] == "reference"}
    for r in bench["rows"]:
        if r["provider"] != "mole_ext":
            continue
        rf = refs.get((r["op"], r["mode"], r["n"], r["k"]), {})
        md.append(f"| {r['op']} | {r['mode']} | {r['n']} | {r['k']} | {r['d']} | {r['median_us']:.1f} ({r['p20_us']:.1f}-{r['p80_us']:.1f}) | "
                  f"{r['gbps']:.0f} | {r['frac_of_copy']:.0%} | {rf.get('median_us', float('nan')):.1f} | "
                  f"{r.get('speedup_vs_reference', float('nan')):.2f}x | {r.get('target') or '-'} |")
    md.append("")
md.append("Command: `bash bench/gpu_check.sh`; every stage's output is in gpu_check.log.")
open(os.path.join(dest, "gpu_check.md"), "w").write("\n".join(md) + "\n")
print("\n".join(md))
PYEOF
echo "gpu_check: results in $DEST ($(ls "$DEST" | tr '\n' ' '))"
# exit 1 unless every stage that was asked for ran and passed (train may be skipped for time)
FAILED=$(awk -F'\t' '$2 != "0" && !($1 == "train" && $2 == "skipped") {print $1}' "$STAGES" | tr '\n' ' ')
rm -rf "$WORK"
if [ -n "$FAILED" ]; then
  echo "gpu_check: stages not passed: $FAILED"
  exit 1
fi
exit 0
