"""The GPU check's orchestration (bench/gpu_check.py), on the CPU: the plan fits its budget, and
the runner reports a passing, a failing, a timed-out, a budget-starved stage and a missing tool
the way the report promises, in at most 8 files. Cheap: fake stages of a few seconds."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import gpu_check as gc  # noqa: E402


def run_plan(**env):
    out = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh")], capture_output=True, text=True,
                         env={**os.environ, "GPU_CHECK_PLAN": "1", **env}, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_plan_fits_the_budget_and_keeps_the_order():
    lines = run_plan()
    assert lines, "no plan printed"
    for ln in lines[:-1]:
        assert re.fullmatch(r"stage [a-z_]+ cap \d+", ln), ln
    m = re.fullmatch(r"budget (\d+)", lines[-1])
    assert m, lines[-1]
    budget = int(m.group(1))
    caps = {ln.split()[1]: int(ln.split()[3]) for ln in lines[:-1]}
    assert sum(caps.values()) <= budget <= 480
    names = list(caps)
    order = ["env", "build", "smoke", "hw_tests", "bench_grouped_gemm", "ncu", "cuda_tests", "memcheck",
             "train_step"]
    assert [n for n in names if n in order] == order
    assert all(names.index("hw_tests") < names.index(b) < names.index("ncu") for b in names if b.startswith("bench_"))
    assert "racecheck" not in names


def test_plan_rejects_a_budget_over_480():
    out = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh")], capture_output=True, text=True,
                         env={**os.environ, "GPU_CHECK_PLAN": "1", "GPU_CHECK_BUDGET_S": "600"}, timeout=60)
    assert out.returncode != 0 and "GPU_CHECK_BUDGET_S=600" in out.stderr


def test_plan_subset_and_unknown_stage():
    assert run_plan(GPU_CHECK_STAGES="smoke ncu")[:2] == ["stage smoke cap 20", "stage ncu cap 35"]
    out = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh")], capture_output=True, text=True,
                         env={**os.environ, "GPU_CHECK_PLAN": "1", "GPU_CHECK_STAGES": "racecheck"}, timeout=60)
    assert out.returncode != 0 and "unknown stages ['racecheck']" in out.stderr


def test_hardware_test_files_leave_out_the_cpu_emulators():
    files = gc.hardware_test_files()
    assert "tests/test_cuda_grouped_lora.py" in files
    assert not [f for f in files if "emulated" in f]


FAKE_TESTS = '''
import pytest

def test_passes():
    assert 1 + 1 == 2

def helper_that_fails(v):
    marker = "FIRST-FAILURE-MARKER"
    assert v == 2, marker

def test_fails():
    helper_that_fails(3)

def test_fails_too():
    assert False, "SECOND"

def test_skipped():
    pytest.skip("no device here")
'''


def test_runner_reports_each_kind_of_outcome(tmp_path):
    py = sys.executable
    (tmp_path / "test_fake.py").write_text(FAKE_TESTS)
    ctx = gc.Context(work=str(tmp_path / "work"), out=str(tmp_path / "out"), assume_gpu=True)
    os.makedirs(ctx.work)
    S, C = gc.Stage, gc.Cmd
    stages = [
        S("ok", 20, "passes", [C([py, "-c", "print('hello from ok')"])], log_tail=5),
        S("bench_cut", 20, "a benchmark that wrote no table", [C([py, "-c", "print('case 1: 12 us')"])],
          collect=("bench/results/no-such-table.md",)),
        S("fails", 20, "exits 3", [C([py, "-c", "import sys; print('partial result'); sys.exit(3)"])]),
        S("slow", 5, "outlives its cap", [C([py, "-c", "import time; print('started', flush=True); time.sleep(60)"])]),
        S("no_tool", 20, "needs a tool that cannot run", [C([py, "-c", "print('must not run')"])], needs=("ncu",)),
        S("after_failure", 20, "needs a failed stage", [C([py, "-c", "print('must not run')"])], needs=("fails",)),
        S("tests", 30, "pytest with the plugin",
          lambda c: [C([py, "-m", "pytest", "-q", "--tb=long", "-p", "no:cacheprovider", "-p", "gpu_check_pytest",
                        str(tmp_path / "test_fake.py")],
                       env={"GPU_CHECK_TESTS": c.tests_jsonl("fake tests"),
                            "PYTHONPATH": os.path.join(ROOT, "bench") + os.pathsep + os.environ.get("PYTHONPATH", "")},
                       tests=True)]),
        S("too_late", 300, "more than the budget holds", [C([py, "-c", "print('must not run')"])]),
    ]
    tools = lambda name: (False, "ncu cannot read the GPU's performance counters (ERR_NVGPUCTRPERM)")  # noqa: E731
    results = gc.Runner(ctx, budget=120, tools=tools).run(stages)
    st = {r.name: r for r in results}
    assert st["ok"].status == "passed"
    assert st["fails"].status == "failed" and st["fails"].rcs == [3]
    assert "partial result" in open(st["fails"].log).read()
    assert st["slow"].status == "timed out" and st["slow"].failed
    assert "started" in open(st["slow"].log).read()  # partial output kept
    assert st["slow"].seconds < 5 + gc.GRACE_S + 2
    assert st["no_tool"].status == "not run" and "ERR_NVGPUCTRPERM" in st["no_tool"].reason
    assert st["after_failure"].status == "not run" and "needs stage fails" in st["after_failure"].reason
    assert st["tests"].status == "failed"  # pytest exits 1
    assert st["too_late"].status == "not run" and "of the budget left" in st["too_late"].reason
    assert not st["too_late"].failed

    rc = gc.write_report(ctx, results, 120, 10.0, {"ncu": (False, "no counters")})
    assert rc == 1
    files = os.listdir(ctx.out)
    assert len(files) <= gc.MAX_OUT_FILES
    md = open(os.path.join(ctx.out, "gpu_check.md")).read()
    for name, status in (("ok", "passed"), ("fails", "failed"), ("slow", "timed out"), ("no_tool", "not run"),
                         ("too_late", "not run")):
        assert re.search(rf"\| {name} \| {status} \|", md), (name, status)
    # the first failure's full traceback: the helper's body and its marker, not only the last line
    first = md.split("## First failure", 1)[1]
    assert "test_fake.py::test_fails" in first and "helper_that_fails(3)" in first and "FIRST-FAILURE-MARKER" in first
    tests = open(os.path.join(ctx.out, "tests.txt")).read().splitlines()
    outcomes = sorted(ln.split()[0] for ln in tests)
    assert outcomes == ["failed", "failed", "passed", "skipped"]
    assert "SECOND" in open(os.path.join(ctx.out, "failures.txt")).read()
    report = json.load(open(os.path.join(ctx.out, "gpu_check.json")))
    assert report["test_counts"] == {"passed": 1, "failed": 2, "skipped": 1}
    assert "hello from ok" in open(os.path.join(ctx.out, "gpu_check.log")).read()
    bench = open(os.path.join(ctx.out, "bench.md")).read()
    assert "hello from ok" in bench and "case 1: 12 us" in bench  # a stage's output when it wrote no table


def test_a_killed_pytest_names_the_test_it_was_running(tmp_path):
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text(json.dumps({"event": "start", "nodeid": "a::x"}) + "\n" +
                     json.dumps({"event": "result", "nodeid": "a::x", "outcome": "passed", "when": "call"}) + "\n" +
                     json.dumps({"event": "start", "nodeid": "a::y"}) + "\n" + '{"event": "res')
    results, unfinished = gc.read_tests(str(jsonl))
    assert [r["nodeid"] for r in results] == ["a::x"] and unfinished == ["a::y"]


def test_whole_check_on_a_machine_without_gpu(tmp_path):
    """The real script here: the env stage runs, every GPU stage is 'not run' with the reason,
    the verdict is a failure (nothing was checked), and at most 8 files come back."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("GPU_CHECK_STAGES", None)
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), str(out)], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = json.load(open(out / "gpu_check.json"))
    stages = {s["name"]: s for s in report["stages"]}
    assert stages["env"]["status"] == "passed"
    for name in ("build", "smoke", "ncu", "memcheck", "train_step"):
        assert stages[name]["status"] == "not run" and "no CUDA device" in stages[name]["reason"]
    assert len(os.listdir(out)) <= gc.MAX_OUT_FILES


NCU_CSV = '''==PROF== Connected
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","dram__bytes_read.sum","dram__bytes_write.sum","gpu__time_duration.sum","launch__registers_per_thread","sm__warps_active.avg.pct_of_peak_sustained_active","sm__maximum_warps_per_active_cycle_pct","smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio","smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio","smsp__average_warps_issue_stalled_selected_per_issue_active.ratio"
"","","","","","","","","","","","byte","byte","nsecond","register/thread","%","%","ratio","ratio","ratio"
"0","1","python","h","void at::native::vectorized_elementwise_kernel<4, copy_kernel>(int)","1","7","(128, 1, 1)","(2048, 1, 1)","0","9.0","268435456","268435456","200000","16","90","100","5.0","0.1","1.0"
"1","1","python","h","void mole_ext::cuda::row_gemm_kernel<bf16>(RowGemmArgs)","1","7","(256, 1, 1)","(264, 1, 1)","0","9.0","100000000","50000000","100000","128","40.5","50","2.5","3.5","1.0"
'''


def test_ncu_summary_from_the_raw_csv():
    rows = gc.parse_ncu_csv(NCU_CSV)
    assert len(rows) == 2
    copy, gemm = rows
    assert copy["dram_GBps"] == pytest.approx(2 * 268435456 / 200000)
    assert gemm["regs"] == 128 and gemm["occupancy_achieved"] == 40.5 and gemm["us"] == 100
    assert [n for _, n in gemm["stalls"]] == ["barrier", "long_scoreboard"]  # "selected" is not a stall
    md = gc.ncu_markdown(rows)
    frac = 150000000 / 100000 / (2 * 268435456 / 200000)
    assert f"{frac:.0%}" in md and "row_gemm_kernel" in md


def test_tool_probes_are_classified():
    ok, why = gc.classify_probe("ncu", 1, "==ERROR== ERR_NVGPUCTRPERM - The user does not have permission")
    assert not ok and "ERR_NVGPUCTRPERM" in why
    assert gc.classify_probe("ncu", 0, '  dram__bytes_read.sum   byte   4096\n')[0]
    assert gc.classify_probe("compute-sanitizer", 0, "========= ERROR SUMMARY: 0 errors\n")[0]
    ok, why = gc.classify_probe("compute-sanitizer", 1, "========= Error: Device not supported\n")
    assert not ok and "Device not supported" in why


def test_arch_and_device_kind():
    assert gc.arch_of((9, 0)) == "9.0a" and gc.arch_of((8, 0)) == "8.0"
    assert gc.device_kind("NVIDIA H200") == "H200" and gc.device_kind("NVIDIA H100 80GB HBM3") == "H100"


def _collect(*args):
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    return [ln for ln in out.stdout.splitlines() if "::" in ln]


def test_hardware_selection_finds_the_hardware_only_cases():
    """hw_tests selects bit identity, CUDA graphs and rerun determinism (and tests/test_gpu_hardware.py
    whole); cuda_tests runs the rest of the same files, so nothing runs twice or is lost."""
    files = gc.hardware_test_files()
    hw = _collect("tests/test_gpu_hardware.py", *files, "-k", gc.HW_K)
    names = " ".join(hw)
    for needle in ("test_bit_identical_reruns", "agree_bit_for_bit", "cuda_graph",
                   "test_gpu_hardware.py::test_every_op_reruns_bit_identically",
                   "test_gpu_hardware.py::test_graphed_mole_ffn_training_step_matches_eager"):
        assert needle in names, needle
    rest = _collect(*files, "-k", f"not ({gc.HW_K})")
    assert len(rest) > 10 * len(hw) > 0 and not set(rest) & set(hw)
    assert "test_forward_matches_cpu_and_reference" in " ".join(rest)


def test_real_stage_commands_are_well_formed(tmp_path):
    """Every command of the real plan names a script of this repository and only flags its
    argparse defines; the build targets the device's one architecture with every core."""
    ctx = gc.Context(work=str(tmp_path), out=str(tmp_path / "out"), device={"arch": "9.0a", "cuda_available": True})
    for stage in gc.plan():
        cmds = stage.cmds(ctx) if callable(stage.cmds) else stage.cmds
        assert cmds, stage.name
        for c in cmds:
            argv = [a.replace("{work}", ctx.work) for a in c.argv]
            scripts = [a for a in argv if a.endswith(".py") and not a.startswith(str(tmp_path))]
            for script in scripts:
                path = os.path.join(ROOT, script)
                assert os.path.isfile(path), (stage.name, script)
                if script.startswith("tests/") or script == "setup.py":
                    continue
                src = open(path).read()
                after = argv[argv.index(script) + 1:]
                for flag in [a for a in after if a.startswith("--")]:
                    assert f'"{flag}"' in src, (stage.name, script, flag)
    build = gc.build_cmds(ctx)[0]
    assert build.env["TORCH_CUDA_ARCH_LIST"] == "9.0a" and int(build.env["MAX_JOBS"]) == (os.cpu_count() or 16)
    assert build.env["MOLE_EXT_FORCE_CUDA"] == "1"


def test_smoke_and_ncu_workloads_call_the_ops_right():
    """The GPU-only scripts' op calls, on the CPU kernels at small sizes: a wrong signature or
    argument order would otherwise surface only in the GPU run."""
    import torch
    import gpu_check_kernels as gk

    assert gk.ncu_workload("cpu", n=96, d_in=64, d_out=80, copy_bytes=1024, ranks=(4,)) == 0
    assert gk.module_matches_cpu("cpu", torch.Generator().manual_seed(0))


def test_hardware_checks_call_the_ops_right():
    """tests/test_gpu_hardware.py's op calls on the CPU kernels (its tests skip here)."""
    import test_gpu_hardware as hw

    import torch

    for name, run in hw.op_runs("cpu", n=64, d_in=32, d_out=48, r=4, k=3).items():
        outs = run()
        assert outs and all(torch.isfinite(t.float()).all() for t in outs), name


def test_a_stage_left_out_of_the_selection_counts_as_done(tmp_path):
    """GPU_CHECK_STAGES="smoke" after a build: smoke runs (the built extension is there); a
    stage needing an unselected stage other than build runs too."""
    ctx = gc.Context(work=str(tmp_path), out=str(tmp_path / "out"), assume_gpu=True)
    py = sys.executable
    stages = [gc.Stage("smoke", 20, "x", [gc.Cmd([py, "-c", "pass"])], needs=("build",)),
              gc.Stage("late", 20, "x", [gc.Cmd([py, "-c", "pass"])], needs=("env",))]
    res = gc.Runner(ctx, 100, lambda n: None, left_out=["build", "env"]).run(stages)
    built = bool(__import__("glob").glob(os.path.join(ROOT, "python", "mole_ext", "_C*.so")))
    assert res[0].status == ("passed" if built else "not run")
    assert res[1].status == "passed"
