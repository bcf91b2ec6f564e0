"""The GPU check: one run on a fresh H100 or H200 machine (no internet) that settles as much as
possible in at most 8 minutes and leaves at most 8 files. `bash bench/gpu_check.sh` calls it.

    bash bench/gpu_check.sh [OUT_DIR]          # OUT_DIR, else $OUT, else bench/results/gpu_check-<UTC time>
    GPU_CHECK_PLAN=1 bash bench/gpu_check.sh   # print the plan (stage NAME cap SECONDS, budget SECONDS); run nothing
    GPU_CHECK_STAGES="smoke hw_tests" ...      # only these stages; one left out counts as done (a rerun after
                                               # a build: the built extension must be in python/mole_ext)

Stages run one after the other in order of value, each under its own cap (its processes are
killed as a group past it); the caps add up to at most the budget (GPU_CHECK_BUDGET_S, default
470 s, never above 480), so the whole run, build included, ends within 8 minutes:

  env        the device (H100 / H200 / other, compute capability, SMs), versions, nvidia-smi, and
             the bandwidth of a 1 GiB copy measured now: every bandwidth is judged against a copy
             measured in the same run, never against a datasheet
  build      setup.py build_ext --inplace with every core (MAX_JOBS) for one architecture, the
             device's (9.0a on H100 / H200; GPU_CHECK_ARCHS overrides), then python -m mole_ext.info
  smoke      bench/gpu_check_kernels.py: every op forward and backward on a few shapes against the
             CPU kernels (seconds; a failure here explains most later ones)
  hw_tests   the tests only a GPU can answer: bit identity of the kernels' paths (vector / element,
             pipelined / plain), CUDA-graph replays, rerun determinism (tests/test_gpu_hardware.py
             and the matching cases of tests/test_cuda_*.py)
  bench_*    the quick benchmarks: grouped GEMM (r up to 128, 4096 -> 11008 and 11008 -> 4096, with
             the traffic model of bench/traffic.py), routing ops, MoLE FFN, decoding (bench/generate.py)
  ncu        Nsight Compute on the main kernels and a copy: DRAM bandwidth (and its fraction of the
             copy's), achieved occupancy, stall reasons
  cuda_tests every CUDA test file, one process each, all at once (the CPU references share the cores)
  memcheck   compute-sanitizer --tool memcheck over bench/gpu_check_kernels.py
  train_step bench/train_step.py --config 7b (LLaVA-MoLE vs plain-LoRA training step)
racecheck and the CPU-only tests are not here: they answer nothing a GPU is needed for.

Tools are probed first, while the build runs (ncu reading a hardware counter, compute-sanitizer
running a kernel); a stage whose tool or prerequisite is missing is "not run" with the reason, as
is a stage that the remaining budget cannot hold. A stage that started and ran out of time has
"timed out", a failure, and keeps its partial output. Exit code 0 when a GPU was there and every
stage passed or was not run for a stated reason other than a failed prerequisite, else 1.

Output (at most 8 files): gpu_check.md (the summary to read first: device, copy bandwidth, tools,
stages, test counts, the first failure's full traceback), gpu_check.json (the same, structured,
and every test's outcome), tests.txt (one line per test), failures.txt (every failure's
traceback), bench.md (the benchmark tables), ncu.md (the kernel summaries) and ncu.csv (ncu's raw
numbers), gpu_check.log (every stage's output, cut in the middle when long).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import glob
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
MAX_BUDGET_S = 480
DEFAULT_BUDGET_S = 470
GRACE_S = 3           # between SIGTERM and SIGKILL of a stage's process group
MAX_OUT_FILES = 8
LOG_STAGE_BYTES = 1_500_000  # per stage in gpu_check.log (head and tail kept)

# ---- the plan --------------------------------------------------------------------------------


@dataclasses.dataclass
class Cmd:
    argv: List[str]
    env: Dict[str, str] = dataclasses.field(default_factory=dict)
    label: str = ""
    stdout: Optional[str] = None  # a file for stdout (else the stage log)
    tests: bool = False           # a pytest run: outcomes come through bench/gpu_check_pytest.py


@dataclasses.dataclass
class Stage:
    name: str
    cap: int
    what: str
    cmds: Union[List[Cmd], Callable[["Context"], List[Cmd]]] = dataclasses.field(default_factory=list)
    needs: Tuple[str, ...] = ()   # earlier stages that must have passed, or tools that must work
    parallel: bool = False        # start every command at once (else one after the other)
    collect: Tuple[str, ...] = ()  # files (relative to ROOT) written by the stage, appended to bench.md
    log_tail: int = 0             # last lines of the stage's log for bench.md (always, or when no file came)
    judge: Optional[Callable[["StageResult", "Context"], None]] = None  # parses output, may fail the stage


@dataclasses.dataclass
class StageResult:
    name: str
    cap: int
    status: str = "not run"       # passed / failed / timed out / not run
    reason: str = ""
    seconds: float = 0.0
    limit: float = 0.0
    rcs: List[Optional[int]] = dataclasses.field(default_factory=list)
    log: str = ""                 # path of the stage's log
    notes: List[str] = dataclasses.field(default_factory=list)

    @property
    def failed(self) -> bool:
        return self.status in ("failed", "timed out")


@dataclasses.dataclass
class Context:
    work: str
    out: str
    python: str = sys.executable
    device: Dict[str, object] = dataclasses.field(default_factory=dict)
    results: Dict[str, StageResult] = dataclasses.field(default_factory=dict)
    bench_md: List[str] = dataclasses.field(default_factory=list)
    ncu_md: List[str] = dataclasses.field(default_factory=list)
    assume_gpu: bool = False      # tests of the orchestrator: judge the stages alone

    def tests_jsonl(self, label: str = "") -> str:
        """Where one pytest process appends its outcomes (one file each: parallel processes
        appending long tracebacks to one file could interleave them)."""
        return os.path.join(self.work, "tests-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", label or "run") + ".jsonl")


def budget_s() -> int:
    b = int(os.environ.get("GPU_CHECK_BUDGET_S", DEFAULT_BUDGET_S))
    if not 0 < b <= MAX_BUDGET_S:
        raise SystemExit(f"GPU_CHECK_BUDGET_S={b}: expected 1 .. {MAX_BUDGET_S} seconds")
    return b


def _py(ctx: Context, *args: str, **kw) -> Cmd:
    return Cmd([ctx.python, *args], **kw)


def hardware_test_files() -> List[str]:
    """The CUDA test files: tests/test_cuda_*.py without the CPU-only ones (the emulators and the
    SASS parser's tests, which run in make test)."""
    files = sorted(glob.glob(os.path.join(ROOT, "tests", "test_cuda_*.py")))
    cpu_only = ("emulated", "sass_check")
    return [os.path.relpath(f, ROOT) for f in files if not any(c in os.path.basename(f) for c in cpu_only)]


# pytest -k expression of the hardware-only cases in tests/test_cuda_*.py: bit identity of the
# kernels' paths, CUDA graphs, determinism of reruns
HW_K = ("gpu_hardware or bit_identical_reruns or agree_bit_for_bit or cuda_graph or is_deterministic or "
        "deterministic or graph_replay")


def pytest_cmd(ctx: Context, label: str, files: Sequence[str], k: Optional[str] = None, threads: int = 0) -> Cmd:
    argv = ["-m", "pytest", "-q", "-rfE", "--tb=long", "-p", "no:cacheprovider", "-p", "gpu_check_pytest", *files]
    if k:
        argv += ["-k", k]
    env = {"GPU_CHECK_TESTS": ctx.tests_jsonl(label)}
    if threads:
        env["MOLE_EXT_TEST_THREADS"] = str(threads)
    return _py(ctx, *argv, env=env, label=label, tests=True)


def cuda_test_cmds(ctx: Context) -> List[Cmd]:
    files = hardware_test_files()
    others = ["tests/test_router.py", "tests/test_permute.py", "tests/test_grouped_lora.py",
              "tests/test_load_balance.py", "tests/test_module.py"]
    others = [f for f in others if os.path.exists(os.path.join(ROOT, f))]
    procs = len(files) + 1
    threads = max(1, (os.cpu_count() or 8) // procs)
    cmds = [pytest_cmd(ctx, os.path.basename(f), [f], k=f"not ({HW_K})", threads=threads) for f in files]
    # the op, module and training tests' CUDA cases (ids containing "cuda")
    cmds.append(pytest_cmd(ctx, "cuda cases of the op tests", others, k="cuda", threads=threads))
    return cmds


def build_cmds(ctx: Context) -> List[Cmd]:
    archs = os.environ.get("GPU_CHECK_ARCHS") or ctx.device.get("arch") or "9.0a"
    env = {"MOLE_EXT_FORCE_CUDA": "1", "TORCH_CUDA_ARCH_LIST": str(archs),
           "MAX_JOBS": os.environ.get("MAX_JOBS", str(os.cpu_count() or 16))}
    return [_py(ctx, "setup.py", "build_ext", "--inplace", env=env, label=f"build for {archs}"),
            _py(ctx, "-m", "mole_ext.info", label="what was built (which ops have CUDA kernels)")]


# asked for by name as well as through the sections, so the summary has them whatever a section holds
NCU_METRICS = ["dram__bytes_read.sum", "dram__bytes_write.sum", "gpu__time_duration.sum",
               "dram__throughput.avg.pct_of_peak_sustained_elapsed", "launch__registers_per_thread",
               "sm__warps_active.avg.pct_of_peak_sustained_active", "sm__maximum_warps_per_active_cycle_pct"] + [
    f"smsp__average_warps_issue_stalled_{r}_per_issue_active.ratio"
    for r in ("long_scoreboard", "short_scoreboard", "barrier", "mio_throttle", "lg_throttle", "wait",
              "math_pipe_throttle", "no_instruction", "dispatch_stall", "membar")]


def ncu_cmds(ctx: Context) -> List[Cmd]:
    rep = os.path.join(ctx.work, "ncu_report")
    sections = ["SpeedOfLight", "Occupancy", "LaunchStats", "WarpStateStats"]
    argv = [tool_path("ncu"), "--profile-from-start", "off", "--target-processes", "all", "--force-overwrite",
            "--launch-count", "60", "--export", rep,
            "--metrics", ",".join(NCU_METRICS)]
    for s in sections:
        argv += ["--section", s]
    return [Cmd(argv + [ctx.python, "bench/gpu_check_kernels.py", "--ncu"], label="ncu profile"),
            Cmd([tool_path("ncu"), "--import", rep + ".ncu-rep", "--csv", "--page", "raw", "--print-units", "base"],
                stdout=os.path.join(ctx.work, "ncu.csv"), label="ncu export")]


def memcheck_cmds(ctx: Context) -> List[Cmd]:
    # only mole_ext's kernels are instrumented (torch's run plain), which keeps it short; PyTorch's
    # caching allocator off: inside one of its 2 MiB blocks an access past a small tensor would
    # still be in allocated memory, invisible to memcheck
    return [Cmd([tool_path("compute-sanitizer"), "--tool", "memcheck", "--error-exitcode", "99",
                 "--kernel-name", "kns=mole_ext", ctx.python, "bench/gpu_check_kernels.py"],
                env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}, label="memcheck")]


def plan() -> List[Stage]:
    """The stages in order, with their caps (seconds)."""
    P = lambda *a, **kw: (lambda ctx: [_py(ctx, *a, **kw)])  # noqa: E731
    return [
        Stage("env", 15, "device, versions, copy bandwidth", P("bench/gpu_check.py", "env", "--json", "{work}/env.json"),
              judge=judge_env),
        Stage("build", 140, "CUDA build, one arch, all cores", build_cmds, needs=("gpu",)),
        Stage("smoke", 20, "every op fwd+bwd vs the CPU kernels", P("bench/gpu_check_kernels.py"),
              needs=("gpu", "build")),
        Stage("hw_tests", 30, "bit identity of paths, CUDA graphs, rerun determinism",
              lambda ctx: [pytest_cmd(ctx, "hardware-only cases",
                                      ["tests/test_gpu_hardware.py", *hardware_test_files()], k=HW_K)],
              needs=("gpu", "build")),
        Stage("bench_grouped_gemm", 40, "grouped LoRA GEMM + traffic model", P("bench/grouped_gemm.py", "--quick"),
              needs=("gpu", "build"), collect=("bench/results/grouped_gemm-cuda.md",)),
        Stage("bench_routing", 15, "router / permute / unpermute / loss", P("bench/routing.py", "--quick"),
              needs=("gpu", "build"), collect=("bench/results/routing-cuda.md",)),
        Stage("bench_mole_ffn", 25, "MoLE FFN vs single LoRA + traffic model", P("bench/mole_ffn.py", "--gpu-check"),
              needs=("gpu", "build"), collect=("bench/results/mole_ffn-cuda.md",)),
        Stage("bench_generate", 30, "prefill / decode, 7B-shaped stack, with and without CUDA graphs",
              P("bench/generate.py", "--gpu-check"), needs=("gpu", "build"), collect=("bench/results/generate-cuda.md",)),
        Stage("ncu", 35, "Nsight Compute: bandwidth, occupancy, stalls", ncu_cmds, needs=("gpu", "build", "ncu"),
              judge=judge_ncu),
        Stage("cuda_tests", 55, "every CUDA test file, in parallel", cuda_test_cmds, needs=("gpu", "build"),
              parallel=True),
        Stage("memcheck", 25, "compute-sanitizer memcheck", memcheck_cmds,
              needs=("gpu", "build", "compute-sanitizer"), judge=judge_memcheck),
        Stage("train_step", 40, "7B training step, MoLE vs LoRA",
              P("bench/train_step.py", "--config", "7b", "--steps", "2", "--warmup", "1", "--no-save"),
              needs=("gpu", "build"), log_tail=30),
    ]


def print_plan(stages: Sequence[Stage], budget: int, file=None) -> None:
    for s in stages:
        print(f"stage {s.name} cap {s.cap}", file=file)
    print(f"budget {budget}", file=file)


# ---- tools -----------------------------------------------------------------------------------

def tool_path(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    cuda = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    for cand in [os.path.join(cuda, "bin", name), *sorted(glob.glob(os.path.join(cuda, "nsight-compute*", name))),
                 *sorted(glob.glob(f"/opt/nvidia/nsight-compute/*/{name}"))]:
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return name


_PROBE_KERNEL = "import torch; x = torch.ones(1 << 20, device='cuda'); (x * 2).sum().item(); torch.cuda.synchronize()"


class ToolProbes:
    """Starts each tool on a one-kernel program at once (in the background: they run while the
    build compiles) and, when asked, says whether it worked and if not why."""

    def __init__(self, python: str, work: str, timeout_s: float = 120):
        self.python, self.work, self.timeout_s = python, work, timeout_s
        self.procs: Dict[str, Tuple[subprocess.Popen, str, float]] = {}
        self.verdicts: Dict[str, Tuple[bool, str]] = {}

    def start(self) -> None:
        probes = {
            "ncu": [tool_path("ncu"), "--metrics", "dram__bytes_read.sum", "--launch-count", "1",
                    self.python, "-c", _PROBE_KERNEL],
            "compute-sanitizer": [tool_path("compute-sanitizer"), "--tool", "memcheck", "--error-exitcode", "99",
                                  self.python, "-c", _PROBE_KERNEL],
        }
        for name, argv in probes.items():
            if shutil.which(argv[0]) is None and not os.path.isfile(argv[0]):
                self.verdicts[name] = (False, f"{name} not found (PATH, $CUDA_HOME/bin)")
                continue
            log = os.path.join(self.work, f"probe_{name}.log")
            with open(log, "w") as f:
                p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, cwd=ROOT)
            self.procs[name] = (p, log, time.monotonic())

    def __call__(self, name: str) -> Optional[Tuple[bool, str]]:
        if name in self.verdicts:
            return self.verdicts[name]
        if name not in self.procs:
            return None
        p, log, t0 = self.procs[name]
        try:
            p.wait(timeout=max(1.0, self.timeout_s - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            _kill_group(p)
            self.verdicts[name] = (False, f"its probe (one kernel) did not finish in {self.timeout_s:.0f} s")
            return self.verdicts[name]
        text = open(log, errors="replace").read()
        self.verdicts[name] = classify_probe(name, p.returncode, text)
        return self.verdicts[name]

    def finish(self) -> Dict[str, Tuple[bool, str]]:
        """Verdicts of the probes that finished (asked for or not); the others are stopped."""
        for name, (p, _, _) in self.procs.items():
            if name in self.verdicts:
                continue
            if p.poll() is None:
                _kill_group(p)
                self.verdicts[name] = (False, "not needed by any stage that ran; its probe was stopped")
            else:
                self(name)
        return dict(self.verdicts)


def classify_probe(name: str, rc: int, text: str) -> Tuple[bool, str]:
    """(works, reason) from a probe's exit code and output."""
    errors = [ln.strip() for ln in text.splitlines() if "ERR_NVGPUCTRPERM" in ln or "==ERROR==" in ln
              or re.search(r"=+ Error", ln) or "not supported" in ln.lower()]
    if name == "ncu":
        if "ERR_NVGPUCTRPERM" in text:
            return False, "ncu cannot read the GPU's performance counters (ERR_NVGPUCTRPERM)"
        if rc == 0 and "dram__bytes_read.sum" in text and not errors:
            return True, "ok"
    else:
        if rc == 0 and re.search(r"ERROR SUMMARY: 0 errors", text) and not errors:
            return True, "ok"
    tail = errors[:2] or [ln.strip() for ln in text.strip().splitlines()[-2:]]
    return False, f"{name} probe failed (exit {rc}): " + " | ".join(tail)[:300]


# ---- running ---------------------------------------------------------------------------------

def _kill_group(p: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(p.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            p.wait(timeout=GRACE_S)
            return
        except subprocess.TimeoutExpired:
            continue


class Runner:
    """Runs stages in order under a budget. `tools(name)` -> (works, reason) or None (unknown)."""

    def __init__(self, ctx: Context, budget: float, tools: Callable[[str], Optional[Tuple[bool, str]]],
                 clock: Callable[[], float] = time.monotonic, left_out: Sequence[str] = ()):
        self.ctx, self.budget, self.tools, self.clock = ctx, budget, tools, clock
        self.left_out = set(left_out)  # stages of the plan that GPU_CHECK_STAGES did not select
        self.t0 = clock()

    def remaining(self) -> float:
        return self.budget - (self.clock() - self.t0)

    def missing(self, stage: Stage) -> Optional[str]:
        for need in stage.needs:
            if need in self.left_out:  # not selected: a rerun after it, e.g. with the build in place
                if need == "build" and not glob.glob(os.path.join(ROOT, "python", "mole_ext", "_C*.so")):
                    return "needs stage build, which was not selected, and no built extension is in python/mole_ext"
                continue
            done = self.ctx.results.get(need)
            if done is not None:
                if done.status != "passed":
                    return f"needs stage {need}, which {'was not run' if done.status == 'not run' else done.status}"
                continue
            verdict = self.tools(need)
            if verdict is None:
                return f"needs {need}, which nothing provided"
            if not verdict[0]:
                return verdict[1]
        return None

    def run(self, stages: Sequence[Stage]) -> List[StageResult]:
        out = []
        for i, stage in enumerate(stages):
            res = StageResult(stage.name, stage.cap, log=os.path.join(self.ctx.work, f"{stage.name}.log"))
            self.ctx.results[stage.name] = res
            out.append(res)
            why = self.missing(stage)  # first: it may wait for a tool's probe
            later = sum(s.cap for s in stages[i + 1:])
            left = self.remaining()
            # a stage may use what earlier stages left unused, never what later ones need
            res.limit = min(left, max(stage.cap, left - later))
            if why:
                res.reason = why
            elif res.limit < 0.75 * stage.cap:
                res.reason = f"{max(left, 0):.0f} s of the budget left, the stage's cap is {stage.cap} s"
            else:
                self._run_stage(stage, res)
            print(f"== {stage.name}: {res.status}" + (f" ({res.reason})" if res.reason else "") +
                  (f" in {res.seconds:.0f} s of {res.limit:.0f}" if res.status != "not run" else ""), flush=True)
        return out

    def _run_stage(self, stage: Stage, res: StageResult) -> None:
        start = self.clock()
        deadline = start + res.limit - GRACE_S
        cmds = stage.cmds(self.ctx) if callable(stage.cmds) else list(stage.cmds)
        timed_out = False
        with open(res.log, "w") as log:
            log.write(f"# stage {stage.name} (cap {stage.cap} s, limit {res.limit:.0f} s): {stage.what}\n")
            log.flush()
            batches = [cmds] if stage.parallel else [[c] for c in cmds]
            for batch in batches:
                procs = []
                for c in batch:
                    argv = [a.replace("{work}", self.ctx.work) for a in c.argv]
                    log.write(f"## {c.label or ' '.join(argv)}\n$ {' '.join(argv)}\n")
                    log.flush()
                    env = {**os.environ, **c.env}
                    # parallel commands each write their own file, appended to the stage log after
                    sink = (open(c.stdout, "w") if c.stdout else
                            open(res.log + f".{len(procs)}", "w") if stage.parallel else log)
                    procs.append((subprocess.Popen(argv, stdout=sink, stderr=log if c.stdout else subprocess.STDOUT,
                                                   stdin=subprocess.DEVNULL, env=env, cwd=ROOT,
                                                   start_new_session=True), sink, c))
                for p, sink, c in procs:
                    try:
                        p.wait(timeout=max(0.0, deadline - self.clock()))
                    except subprocess.TimeoutExpired:
                        timed_out = True
                        _kill_group(p)
                    res.rcs.append(p.returncode)
                    if sink is not log:
                        sink.close()
                        if stage.parallel and not c.stdout:
                            log.write(f"## output of {c.label}\n" + open(sink.name, errors="replace").read())
                            os.unlink(sink.name)
                if timed_out or any(rc != 0 for rc in res.rcs):
                    break
        res.seconds = self.clock() - start
        if timed_out:
            res.status = "timed out"
            res.reason = f"stopped at its {res.limit:.0f} s limit; the output so far is kept"
        elif any(rc != 0 for rc in res.rcs):
            res.status = "failed"
            res.reason = f"exit codes {res.rcs}"
        else:
            res.status = "passed"
        if stage.judge is not None:
            try:
                stage.judge(res, self.ctx)
            except Exception as exc:  # a parser must not hide the stage's own outcome
                res.notes.append(f"could not read the stage's output: {exc!r}")
        got = 0
        for rel in stage.collect:
            path = os.path.join(ROOT, rel)
            if os.path.exists(path) and os.path.getmtime(path) >= time.time() - res.seconds - 1:
                self.ctx.bench_md.append(f"<!-- {rel}, stage {stage.name} -->\n" + open(path).read())
                got += 1
        if (stage.log_tail and not stage.collect) or (stage.collect and not got and res.status != "not run"):
            tail = open(res.log, errors="replace").read().splitlines()[-(stage.log_tail or 60):]
            self.ctx.bench_md.append(f"## stage {stage.name} ({res.status}): the last lines of its output\n\n```\n" +
                                     "\n".join(tail) + "\n```\n")


# ---- stage judges ----------------------------------------------------------------------------

def arch_of(cc: Sequence[int]) -> str:
    """The one architecture to build for: Hopper's 'a' variant (wgmma / TMA) on 9.0."""
    major, minor = int(cc[0]), int(cc[1])
    return f"{major}.{minor}a" if (major, minor) == (9, 0) else f"{major}.{minor}"


def device_kind(name: str) -> str:
    for kind in ("H200", "H100", "A100"):
        if kind in name:
            return kind
    return "other"


def judge_env(res: StageResult, ctx: Context) -> None:
    path = os.path.join(ctx.work, "env.json")
    if os.path.exists(path):
        ctx.device.update(json.load(open(path)))
    if not ctx.device.get("cuda_available"):
        res.notes.append("torch sees no CUDA device")


def parse_ncu_csv(text: str) -> List[Dict[str, object]]:
    """Rows of `ncu --import R --csv --page raw --print-units base`: a header, a units row, one
    row per profiled kernel. Returns one dict per kernel with the summary's fields."""
    lines = [ln for ln in text.splitlines() if ln.startswith('"')]
    rows = list(csv.reader(io.StringIO("\n".join(lines))))
    at = next((i for i, r in enumerate(rows) if "Kernel Name" in r), None)
    if at is None:
        return []
    head = rows[at]
    ident = head.index("ID") if "ID" in head else 0
    body = [r for r in rows[at + 1:] if len(r) > ident and r[ident].strip()]  # the units row has no ID

    def num(row, col):
        try:
            return float(row[head.index(col)].replace(",", ""))
        except (ValueError, IndexError):
            return None

    out = []
    for row in body:
        if len(row) != len(head):
            continue
        name = row[head.index("Kernel Name")] if "Kernel Name" in head else row[4]
        ns = num(row, "gpu__time_duration.sum")
        rd, wr = num(row, "dram__bytes_read.sum"), num(row, "dram__bytes_write.sum")
        stalls = []
        for col in head:
            m = re.match(r"smsp__average_warps_issue_stalled_(\w+)_per_issue_active\.ratio$", col)
            v = num(row, col) if m else None
            if m and v is not None and m.group(1) not in ("selected", "not_selected"):
                stalls.append((v, m.group(1)))
        stalls.sort(reverse=True)
        out.append({
            "kernel": name, "grid": row[head.index("Grid Size")] if "Grid Size" in head else "",
            "block": row[head.index("Block Size")] if "Block Size" in head else "",
            "regs": num(row, "launch__registers_per_thread"),
            "us": ns / 1e3 if ns else None,
            "dram_bytes": (rd or 0) + (wr or 0) if rd is not None or wr is not None else None,
            "dram_GBps": ((rd or 0) + (wr or 0)) / ns if ns and (rd is not None or wr is not None) else None,
            "dram_pct_peak": num(row, "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed")
            or num(row, "dram__throughput.avg.pct_of_peak_sustained_elapsed"),
            "occupancy_achieved": num(row, "sm__warps_active.avg.pct_of_peak_sustained_active"),
            "occupancy_theoretical": num(row, "sm__maximum_warps_per_active_cycle_pct"),
            "stalls": stalls[:3],
        })
    return out


def _short_kernel(name: str, width: int = 70) -> str:
    name = re.sub(r"\(.*$", "", name) if not name.startswith("void") else re.sub(r"^void ", "", name)
    return name if len(name) <= width else name[:width - 3] + "..."


def ncu_markdown(kernels: List[Dict[str, object]]) -> str:
    copies = [k["dram_GBps"] for k in kernels if k["dram_GBps"] and re.search(r"copy|elementwise", str(k["kernel"]))]
    copy_bw = max(copies) if copies else None
    out = ["| kernel | grid | block | regs | us | DRAM GB/s | of copy | DRAM % peak | occupancy achieved / theor. % | "
           "top stalls (warps per issue) |", "|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for k in kernels:
        frac = k["dram_GBps"] / copy_bw if copy_bw and k["dram_GBps"] else None
        stalls = ", ".join(f"{n} {v:.2f}" for v, n in k["stalls"]) or "-"
        out.append(f"| {_short_kernel(str(k['kernel']))} | {k['grid']} | {k['block']} | {f(k['regs'], '.0f')} | "
                   f"{f(k['us'], '.1f')} | {f(k['dram_GBps'], '.0f')} | {f(frac, '.0%')} | "
                   f"{f(k['dram_pct_peak'], '.0f')} | {f(k['occupancy_achieved'], '.0f')} / "
                   f"{f(k['occupancy_theoretical'], '.0f')} | {stalls} |")
    head = (f"Copy kernel under ncu: {copy_bw:.0f} GB/s (the 'of copy' column's reference; ncu locks the clocks "
            "to base, for every kernel alike).\n\n" if copy_bw else "No copy kernel was profiled: no 'of copy' column.\n\n")
    return head + "\n".join(out) + "\n"


def judge_ncu(res: StageResult, ctx: Context) -> None:
    path = os.path.join(ctx.work, "ncu.csv")
    if not os.path.exists(path):
        res.notes.append("ncu wrote no CSV")
        return
    text = open(path, errors="replace").read()
    kernels = parse_ncu_csv(text)
    ctx.ncu_md.append(ncu_markdown(kernels) if kernels else "ncu's CSV held no kernel rows; see ncu.csv\n")
    if not kernels and res.status == "passed":
        res.status, res.reason = "failed", "ncu profiled no kernel"


def judge_memcheck(res: StageResult, ctx: Context) -> None:
    text = open(res.log, errors="replace").read()
    counts = [int(x) for x in re.findall(r"ERROR SUMMARY: (\d+) error", text)]
    res.notes.append(f"memcheck error summaries: {counts}")
    if any(counts) and res.status == "passed":
        res.status, res.reason = "failed", f"memcheck reported {sum(counts)} errors"


# ---- the env stage's body (run as its own process) -------------------------------------------

def env_main(json_path: str) -> int:
    """Prints the machine and writes what later stages need (arch, device kind, copy bandwidth)."""
    try:
        subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap,mig.mode.current,clocks.sm,clocks.max.sm,"
                        "clocks.mem,power.draw,power.limit,memory.total,driver_version", "--format=csv"], check=False)
    except OSError as exc:
        print(f"nvidia-smi: {exc}")
    import torch

    info: Dict[str, object] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                               "cuda_available": torch.cuda.is_available(), "cores": os.cpu_count(),
                               "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(name=p.name, kind=device_kind(p.name), cc=[p.major, p.minor], arch=arch_of((p.major, p.minor)),
                    sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2 ** 30, 1),
                    l2_mib=round(getattr(p, "L2_cache_size", 0) / 2 ** 20, 1))
        n = 1 << 30
        src = torch.empty(n, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        for _ in range(3):
            dst.copy_(src)
        times = []
        for _ in range(10):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            dst.copy_(src)
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        times.sort()
        info["copy_GBps"] = round(2 * n / times[len(times) // 2] / 1e9, 1)
    print(json.dumps(info, indent=1))
    with open(json_path, "w") as f:
        json.dump(info, f)
    return 0


# ---- the report ------------------------------------------------------------------------------

def read_tests(path: str) -> Tuple[List[dict], List[str]]:
    """(results, nodeids started but never finished: running when the process died) of one
    outcome file, or of every tests-*.jsonl file in a folder (in the order they were written)."""
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "tests-*.jsonl")), key=os.path.getmtime)
        parts = [read_tests(f) for f in files]
        return [r for p in parts for r in p[0]], [u for p in parts for u in p[1]]
    results, started = [], {}
    if not os.path.exists(path):
        return results, []
    for line in open(path, errors="replace"):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if rec.get("event") == "start":
            started[rec["nodeid"]] = True
        else:
            started.pop(rec["nodeid"], None)
            results.append(rec)
    return results, list(started)


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[: limit // 3] + f"\n[... {len(text) - limit} bytes cut ...]\n" + text[-(2 * limit) // 3:]


def write_report(ctx: Context, results: List[StageResult], budget: float, total_s: float,
                 tools: Dict[str, Tuple[bool, str]]) -> int:
    """Writes the output folder (at most MAX_OUT_FILES files); returns the exit code."""
    tests, unfinished = read_tests(ctx.work)
    fails = [t for t in tests if t["outcome"] in ("failed", "error")]
    counts: Dict[str, int] = {}
    for t in tests:
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    dev = ctx.device
    # passed: no stage failed, none was kept from running by a failed prerequisite, and a GPU was there
    ok = all(not r.failed and not (r.status == "not run" and r.reason.startswith("needs stage")) for r in results)
    if not dev.get("cuda_available") and not ctx.assume_gpu:
        ok = False
    md = ["# mole_ext GPU check", ""]
    kind = dev.get("kind", "unknown" if dev.get("cuda_available") else "no GPU")
    md.append(f"**{'PASSED' if ok else 'FAILED'}** in {total_s:.0f} s of a {budget:.0f} s budget. Device: "
              f"{dev.get('name', 'unknown')} (kind **{kind}**, cc {dev.get('cc')}, "
              f"{dev.get('sms')} SMs, L2 {dev.get('l2_mib')} MiB), torch {dev.get('torch')} (CUDA {dev.get('cuda')}), "
              f"{dev.get('cores')} cores. Copy bandwidth measured in this run (1 GiB copy_, read + write): "
              f"**{dev.get('copy_GBps', '-')} GB/s**; every fraction below is of a copy measured in the same run.")
    md += ["", "Tools: " + "; ".join(f"{k}: {'works' if v[0] else 'not usable: ' + v[1]}"
                                     for k, v in tools.items()), ""]
    md += ["| stage | status | seconds | cap | why / notes |", "|---|---|---|---|---|"]
    for r in results:
        why = "; ".join([r.reason] * bool(r.reason) + r.notes)
        md.append(f"| {r.name} | {r.status} | {r.seconds:.0f} | {r.cap} | {why} |")
    tally = ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "none ran"
    md += ["", f"Tests: {tally} (every outcome: tests.txt)."]
    if unfinished:
        md.append(f"Running when their process was stopped or died: {', '.join(unfinished[:10])}")
    if fails:
        md.append("Failed: " + ", ".join(t["nodeid"] for t in fails[:30]) + (" ..." if len(fails) > 30 else ""))
        md += ["", "## First failure (full traceback)", "", f"`{fails[0]['nodeid']}`", "", "```",
               _cut(fails[0].get("traceback", ""), 60000), "```"]
    failed_stages = [r for r in results if r.failed]
    if failed_stages and not fails:
        r = failed_stages[0]
        tail = open(r.log, errors="replace").read().splitlines()[-40:] if os.path.exists(r.log) else []
        md += ["", f"## First failed stage: {r.name} (last lines of its log)", "", "```", *tail, "```"]
    md += ["", "Files: gpu_check.md, gpu_check.json, gpu_check.log, tests.txt, failures.txt, bench.md, ncu.md, ncu.csv "
           "(those the run produced). Command: `bash bench/gpu_check.sh`."]
    files = {"gpu_check.md": "\n".join(md) + "\n"}
    files["gpu_check.json"] = json.dumps({
        "passed": ok, "total_seconds": round(total_s, 1), "budget_seconds": budget, "device": dev,
        "tools": {k: {"works": v[0], "reason": v[1]} for k, v in tools.items()},
        "stages": [dataclasses.asdict(r) for r in results], "test_counts": counts, "unfinished_tests": unfinished,
        "tests": [{k: v for k, v in t.items() if k != "traceback"} for t in tests],
    }, indent=1, default=str)
    files["tests.txt"] = "".join(f"{t['outcome']:8s} {t.get('seconds', 0):8.2f}s {t['nodeid']}"
                                 f"{'  # ' + t['reason'] if t.get('reason') else ''}\n" for t in tests) + \
        "".join(f"unfinished        {n}\n" for n in unfinished)
    if fails:
        files["failures.txt"] = "\n\n".join(f"==== {t['nodeid']} ({t['when']})\n{t.get('traceback', '')}"
                                            for t in fails)
    if ctx.bench_md:
        files["bench.md"] = (f"# Benchmarks of the GPU check\n\n{dev.get('name')}; copy bandwidth in the env stage "
                             f"{dev.get('copy_GBps')} GB/s (each benchmark measures its own copy too).\n\n" +
                             "\n\n".join(ctx.bench_md))
    if ctx.ncu_md:
        files["ncu.md"] = "# Nsight Compute summary\n\n" + "\n".join(ctx.ncu_md)
    if os.path.exists(os.path.join(ctx.work, "ncu.csv")):
        files["ncu.csv"] = _cut(open(os.path.join(ctx.work, "ncu.csv"), errors="replace").read(), 4_000_000)
    log = []
    for r in results:
        if os.path.exists(r.log):
            log.append(f"################ {r.name}: {r.status}\n" + _cut(open(r.log, errors="replace").read(),
                                                                         LOG_STAGE_BYTES))
    for name in sorted(glob.glob(os.path.join(ctx.work, "probe_*.log"))):
        log.append(f"################ {os.path.basename(name)}\n" + _cut(open(name, errors="replace").read(), 20000))
    files["gpu_check.log"] = "\n".join(log)
    assert len(files) <= MAX_OUT_FILES
    os.makedirs(ctx.out, exist_ok=True)
    for name, text in files.items():
        with open(os.path.join(ctx.out, name), "w") as f:
            f.write(text)
    print(files["gpu_check.md"])
    print(f"gpu_check: {len(files)} files in {ctx.out}")
    return 0 if ok else 1


# ---- entry -----------------------------------------------------------------------------------

def select(stages: List[Stage]) -> List[Stage]:
    wanted = os.environ.get("GPU_CHECK_STAGES")
    if not wanted:
        return stages
    names = wanted.split()
    unknown = set(names) - {s.name for s in stages}
    if unknown:
        raise SystemExit(f"GPU_CHECK_STAGES: unknown stages {sorted(unknown)}; expected some of "
                         f"{[s.name for s in stages]}")
    return [s for s in stages if s.name in names]


def gpu_tool(ctx: Context):
    """Tools callback: 'gpu' from the env stage, ncu / compute-sanitizer from the probes."""
    probes = ToolProbes(ctx.python, ctx.work)

    def tools(name: str):
        if name == "gpu":
            if "env" not in ctx.results and not ctx.device:
                judge_env(StageResult("env", 0), ctx)  # GPU_CHECK_STAGES without env: ask here
                if not ctx.device:
                    subprocess.run([ctx.python, os.path.join(BENCH, "gpu_check.py"), "env", "--json",
                                    os.path.join(ctx.work, "env.json")], cwd=ROOT, check=False,
                                   stdout=subprocess.DEVNULL)
                    judge_env(StageResult("env", 0), ctx)
            if ctx.device.get("cuda_available"):
                return True, "ok"
            if not ctx.device:
                env = ctx.results.get("env")
                return False, f"the env stage reported no device ({env.status if env else 'not run'})"
            return False, "torch sees no CUDA device"
        return probes(name)

    return probes, tools


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["env"]:
        return env_main(argv[argv.index("--json") + 1])
    budget = budget_s()
    everything = plan()
    stages = select(everything)
    if os.environ.get("GPU_CHECK_PLAN") == "1":
        print_plan(stages, budget)
        return 0
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = argv[0] if argv else os.environ.get("OUT") or os.path.join(BENCH, "results", f"gpu_check-{stamp}")
    work = os.path.join("/tmp", f"gpu_check-{stamp}-{os.getpid()}")
    os.makedirs(work, exist_ok=True)
    os.environ["PYTHONPATH"] = os.pathsep.join([os.path.join(ROOT, "python"), ROOT, BENCH] +
                                               [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    if not os.environ.get("CUDA_HOME") and os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    ctx = Context(work=work, out=out)
    probes, tools = gpu_tool(ctx)
    t0 = time.monotonic()
    probes.start()
    try:
        chosen = {s.name for s in stages}
        left_out = [s.name for s in everything if s.name not in chosen]
        results = Runner(ctx, budget, tools, left_out=left_out).run(stages)
    finally:
        verdicts = probes.finish()
    return write_report(ctx, results, budget, time.monotonic() - t0, verdicts)


if __name__ == "__main__":
    sys.exit(main())
