"""Checkpoints and adapters without pickle: tensors in safetensors, everything else in JSON.

A checkpoint directory holds ``trainable.safetensors`` (trainable weights only),
``optimizer.safetensors`` + ``optimizer.json``, ``scheduler.json``, ``rng_state_<rank>.safetensors``
+ ``rng_state_<rank>.json``, transformers' ``trainer_state.json`` (global step, so the data position)
and ``manifest.json`` (format, sha256 of every file, the trainable-parameter signature). It is
written to ``<name>.tmp`` and renamed, so a crash never leaves a half checkpoint under the real name.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT = "mole_ext-checkpoint-v1"
ADAPTER_FORMAT = "mole_ext-adapter-v1"
# A run's adapter: ADAPTER_TENSORS + ADAPTER_META. Runs before the PEFT export named the metadata
# "adapter_config.json", which is PEFT's file name; such runs are still read.
ADAPTER_TENSORS = "adapter.safetensors"
ADAPTER_META = "mole_run_adapter.json"
LEGACY_ADAPTER_META = "adapter_config.json"


class CheckpointError(RuntimeError):
    """A checkpoint or adapter that is corrupt, incomplete or made for another model."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def signature(tensors: dict[str, torch.Tensor]) -> dict[str, list]:
    return {k: [list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in sorted(tensors.items())}


def _fsync_write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e


# -- optimizer / scheduler / RNG as tensors + JSON ------------------------------------------------
def optimizer_to_files(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, meta = {}, {"state": {}, "param_groups": sd["param_groups"]}
    for idx, st in sd["state"].items():
        meta["state"][str(idx)] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v
                meta["state"][str(idx)][k] = "tensor"
            else:
                meta["state"][str(idx)][k] = v
    return tensors, meta


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state = {}
    for idx, st in meta["state"].items():
        state[int(idx)] = {k: (tensors[f"{idx}.{k}"] if v == "tensor" else v) for k, v in st.items()}
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    py = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(gauss)], "python": [py[0], list(py[1]), py[2]]}
    return tensors, meta


def cuda_rng_states(tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The saved CUDA generator states in device order (torch_cuda_0, 1, ..., 10: numeric, not
    string, order)."""
    keys = [k for k in tensors if k.startswith("torch_cuda_")]
    return [tensors[k] for k in sorted(keys, key=lambda k: int(k[len("torch_cuda_"):]))]


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.random.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        cuda = cuda_rng_states(tensors)[: torch.cuda.device_count()]  # a resume may see fewer GPUs
        for i, st in enumerate(cuda):
            torch.cuda.set_rng_state(st, i)
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    v, st, g = meta["python"]
    random.setstate((v, tuple(st), g))


# -- checkpoint directories -----------------------------------------------------------------------
def begin(final_dir: Path) -> Path:
    tmp = final_dir.with_name(final_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def write_main(tmp: Path, trainable: dict, optimizer_sd: dict | None, scheduler_sd: dict | None, info: dict) -> None:
    _save_tensors(tmp / "trainable.safetensors", trainable)
    if optimizer_sd is not None:
        t, meta = optimizer_to_files(optimizer_sd)
        _save_tensors(tmp / "optimizer.safetensors", t)
        _fsync_write_json(tmp / "optimizer.json", meta)
    if scheduler_sd is not None:
        _fsync_write_json(tmp / "scheduler.json", scheduler_sd)
    (tmp / "info.json").write_text(json.dumps(info, indent=1))


def write_rng(tmp: Path, rank: int) -> None:
    t, meta = rng_state()
    _save_tensors(tmp / f"rng_state_{rank}.safetensors", t)
    _fsync_write_json(tmp / f"rng_state_{rank}.json", meta)


def finish(tmp: Path, final_dir: Path, trainable_sig: dict) -> None:
    """Write the manifest (hashes of every file) and move the directory into place."""
    files = {p.name: sha256(p) for p in sorted(tmp.iterdir()) if p.is_file() and p.name != "manifest.json"}
    _fsync_write_json(tmp / "manifest.json", {"format": FORMAT, "files": files, "trainable": trainable_sig})
    if final_dir.exists():
        shutil.rmtree(final_dir)
    os.replace(tmp, final_dir)


def verify(ckpt: Path, trainable_sig: dict | None = None) -> dict:
    """Refuse a checkpoint that is incomplete, corrupt, or made for a different set of trainable
    weights. Returns the manifest."""
    ckpt = Path(ckpt)
    mf = ckpt / "manifest.json"
    if not mf.is_file():
        raise CheckpointError(f"{ckpt}: no manifest.json: not a finished mole_ext checkpoint")
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{mf}: corrupt manifest ({e})") from e
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    for name, digest in manifest["files"].items():
        p = ckpt / name
        if not p.is_file():
            raise CheckpointError(f"{ckpt}: {name} is missing")
        if sha256(p) != digest:
            raise CheckpointError(f"{ckpt}: {name} is corrupt (sha256 differs from the manifest)")
    if trainable_sig is not None:
        check_signature(str(ckpt), manifest["trainable"], trainable_sig)
    return manifest


def check_signature(where: str, saved: dict, current: dict) -> None:
    if saved == current:
        return
    missing = sorted(set(current) - set(saved))
    extra = sorted(set(saved) - set(current))
    shape = sorted(k for k in set(saved) & set(current) if saved[k] != current[k])
    parts = []
    if missing:
        parts.append(f"{len(missing)} trainable weights of this model are not in it (e.g. {missing[:3]})")
    if extra:
        parts.append(f"it has {len(extra)} weights this model does not train (e.g. {extra[:3]})")
    if shape:
        k = shape[0]
        parts.append(f"{len(shape)} weights differ in shape/dtype (e.g. {k}: saved {saved[k]}, model {current[k]})")
    raise CheckpointError(f"{where} does not match this model's configuration: " + "; ".join(parts))


def load_trainable(ckpt: Path) -> dict[str, torch.Tensor]:
    return _load_tensors(Path(ckpt) / "trainable.safetensors")


def load_optimizer(ckpt: Path) -> dict | None:
    ckpt = Path(ckpt)
    if not (ckpt / "optimizer.json").is_file():
        return None
    return optimizer_from_files(_load_tensors(ckpt / "optimizer.safetensors"), json.loads((ckpt / "optimizer.json").read_text()))


def load_scheduler(ckpt: Path) -> dict | None:
    p = Path(ckpt) / "scheduler.json"
    return json.loads(p.read_text()) if p.is_file() else None


def load_rng(ckpt: Path, rank: int) -> bool:
    ckpt = Path(ckpt)
    if not (ckpt / f"rng_state_{rank}.json").is_file():
        return False
    set_rng_state(_load_tensors(ckpt / f"rng_state_{rank}.safetensors"), json.loads((ckpt / f"rng_state_{rank}.json").read_text()))
    return True


# -- adapters ------------------------------------------------------------------------------------
def export_adapter(out_dir: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    """Write ``adapter.safetensors`` + ``mole_run_adapter.json`` (the run config and a signature)."""
    out = Path(out_dir)
    tmp = begin(out)
    _save_tensors(tmp / ADAPTER_TENSORS, tensors)
    meta = {"format": ADAPTER_FORMAT, "config": config, "tensors": signature(tensors),
            "sha256": None}
    meta["sha256"] = sha256(tmp / ADAPTER_TENSORS)
    _fsync_write_json(tmp / ADAPTER_META, meta)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def adapter_meta_path(adapter_dir: str | os.PathLike) -> Path | None:
    """The metadata file of a run adapter directory (new or old name), or None if it is not one.
    An old-named file counts only if it is ours (a PEFT adapter_config.json is not)."""
    d = Path(adapter_dir)
    if (d / ADAPTER_META).is_file():
        return d / ADAPTER_META
    legacy = d / LEGACY_ADAPTER_META
    if legacy.is_file():
        try:
            if json.loads(legacy.read_text()).get("format") == ADAPTER_FORMAT:
                return legacy
        except (ValueError, AttributeError):
            return None
    return None


def read_adapter(adapter_dir: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    d = Path(adapter_dir)
    cfg_path = adapter_meta_path(d)
    if cfg_path is None:
        raise CheckpointError(f"{d}: no {ADAPTER_META} (or a mole_ext {LEGACY_ADAPTER_META}): not a mole_ext run adapter")
    meta = json.loads(cfg_path.read_text())
    if meta.get("format") != ADAPTER_FORMAT:
        raise CheckpointError(f"{d}: format {meta.get('format')!r}, expected {ADAPTER_FORMAT!r}")
    if sha256(d / ADAPTER_TENSORS) != meta["sha256"]:
        raise CheckpointError(f"{d}: {ADAPTER_TENSORS} is corrupt (sha256 differs)")
    return meta, _load_tensors(d / ADAPTER_TENSORS)


def load_adapter_into(model: torch.nn.Module, adapter_dir, strict: bool = True) -> list[str]:
    """Copy an adapter's tensors into ``model``. ``strict``: every adapter tensor must exist with the
    same shape. Returns the names loaded."""
    meta, tensors = read_adapter(adapter_dir)
    params = dict(model.named_parameters())
    bad = [k for k in tensors if k not in params or params[k].shape != tensors[k].shape]
    if bad and strict:
        k = bad[0]
        have = list(params[k].shape) if k in params else "absent"
        raise CheckpointError(
            f"{adapter_dir}: {len(bad)} adapter tensors do not fit this model (e.g. {k}: adapter "
            f"{list(tensors[k].shape)}, model {have})"
        )
    loaded = []
    with torch.no_grad():
        for k, v in tensors.items():
            if k in params and params[k].shape == v.shape:
                params[k].copy_(v)
                loaded.append(k)
    return loaded
