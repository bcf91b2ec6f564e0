"""Packaging: `pip install .` needs torch and numpy only; `pip install .[train]` declares what the
training package imports, in ranges that the exact CI pins (requirements.txt) satisfy. Read from
setup.py itself (run up to setup()'s arguments, nothing built) and from the sources' imports."""
from __future__ import annotations

import ast
import importlib.metadata as md
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
packaging = pytest.importorskip("packaging")
from packaging.requirements import Requirement  # noqa: E402
from packaging.utils import canonicalize_name  # noqa: E402


@pytest.fixture(scope="module")
def dist():
    import setuptools  # noqa: F401  (first: distutils is then setuptools' own, the one setup() runs)
    import distutils.core

    cwd = os.getcwd()
    try:
        os.chdir(ROOT)
        return distutils.core.run_setup(str(ROOT / "setup.py"), script_args=["--name"], stop_after="init")
    finally:
        os.chdir(cwd)


def _pins(path: Path) -> dict[str, Requirement]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            r = Requirement(line)
            out[canonicalize_name(r.name)] = r
    return out


def test_light_install_requires_only_torch_and_numpy(dist):
    names = sorted(canonicalize_name(Requirement(r).name) for r in dist.install_requires)
    assert names == ["numpy", "torch"]


def test_train_extra_is_ranged_and_holds_the_ci_pins(dist):
    extra = [Requirement(r) for reqs in dist.extras_require.values() for r in reqs]
    pins = _pins(ROOT / "requirements.txt")
    for r in extra:
        assert r.specifier, f"{r.name}: the [train] extra must give a version range"
        assert not any(s.operator == "==" for s in r.specifier), f"{r}: exact pins belong in requirements.txt"
        pin = pins.get(canonicalize_name(r.name))
        assert pin is not None, f"{r.name} is in the [train] extra but not pinned in requirements.txt"
        version = next(iter(pin.specifier)).version
        assert r.specifier.contains(version), f"requirements.txt pins {r.name}=={version}, outside the extra's {r.specifier}"


def _optional(tree) -> set[int]:
    """ids of import nodes inside ``try: ... except ImportError`` (optional dependencies)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                h.type is not None and any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError")
                                           for n in ast.walk(h.type)) for h in node.handlers):
            out |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return out


def _third_party_imports(folder: Path) -> set[str]:
    mods = set()
    for f in folder.rglob("*.py"):
        tree = ast.parse(f.read_text(), str(f))
        optional = _optional(tree)
        for node in ast.walk(tree):
            if id(node) in optional:
                continue
            if isinstance(node, ast.Import):
                mods |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods.add(node.module.split(".")[0])
    return {m for m in mods if m not in sys.stdlib_module_names and m not in ("training", "mole_ext", "__future__")}


def test_every_training_import_is_declared(dist):
    """Each third-party module that training/ imports belongs to a distribution in an extra
    ([train], [deepspeed], [tensorboard]), install_requires, or the data-only --no-deps
    requirements; imports under
    ``try/except ImportError`` are optional and not counted. A new dependency of training/ goes
    into setup.py's extra (a range) and requirements.txt (the pin)."""
    declared = {canonicalize_name(Requirement(r).name)
                for r in [*dist.install_requires, *(r for reqs in dist.extras_require.values() for r in reqs)]}
    declared |= set(_pins(ROOT / "requirements-nodeps.txt"))
    owners = md.packages_distributions()
    missing = {}
    for mod in sorted(_third_party_imports(ROOT / "training")):
        dists = {canonicalize_name(d) for d in owners.get(mod, [])}
        if not dists & declared:
            missing[mod] = sorted(dists) or "not installed"
    assert not missing, f"training/ imports modules no requirement declares: {missing}"


def test_mole_ext_imports_and_runs_without_training_packages(tmp_path):
    """The light install: mole_ext (ops, MoLEFFN, get_mole_model on a plain torch model) never
    imports a package of the [train] extra."""
    code = textwrap.dedent("""
        import sys
        BLOCKED = {"transformers", "accelerate", "safetensors", "peft", "gguf", "matplotlib", "PIL",
                   "skimage", "easy_vqa", "training"}
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"blocked: {name}")
                return None
        sys.meta_path.insert(0, Block())
        import torch
        from torch import nn
        import mole_ext
        class MLP(nn.Module):
            def __init__(self):
                super().__init__()
                self.gate_proj, self.up_proj, self.down_proj = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)
                self.act_fn = nn.SiLU()
        class Block_(nn.Module):
            def __init__(self):
                super().__init__()
                self.mlp, self.q_proj = MLP(), nn.Linear(8, 8)
        model = nn.Module()
        model.layers = nn.ModuleList([Block_(), Block_()])
        model = mole_ext.get_mole_model(model, mole_ext.MoLEConfig(num_experts=2, rank=2, attn_lora_targets=["q_proj"]))
        x = torch.randn(3, 8)
        y = model.layers[1].mlp(model.layers[1].q_proj(x))
        y.sum().backward()
        assert isinstance(model.layers[0].mlp, mole_ext.MoLEFFN)
        try:
            mole_ext.save_pretrained(model, sys.argv[1])
        except ImportError as e:
            assert "pip install safetensors" in str(e), e
        else:
            raise AssertionError("save_pretrained ran without safetensors")
        print("ok", sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED))
    """)
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "ok []"
