"""Checkpoints as directories: one safetensors file per unit, written so a crash can never leave a half-written
checkpoint under a complete checkpoint's name.

    <name>/                       the path Lightning asks for (e.g. checkpoints/epoch=0-step=300.ckpt)
      manifest.json               format, step, each unit file with its byte size and the xxh3-64 hash of each
                                  tensor's bytes (written last)
      model_config.json           the model's Config, when the LightningModule has one
      lightning.pt                Lightning's own state: loops, callbacks, LR schedulers, hyperparameters,
                                  optimizer param groups and step counts (no weights); loaded weights_only=True
      unit_00000.safetensors ...  per trunk block, then the resident part: fp32 master weights under their
                                  parameter names, Adam moments under "exp_avg/<name>" and "exp_avg_sq/<name>"

Everything is written into a hidden temporary directory beside the target, each file fsynced, then the
directory is renamed into place (atomic on POSIX); an existing checkpoint of the same name is replaced only
after the new one is complete, and only a megatrain checkpoint (or an empty directory) is ever replaced: a save to
any other existing path is refused with nothing changed. Unit files are written straight from the store's buffers (no copies).

Integrity: a save refuses master weights that are not finite (a diverged run never replaces a good checkpoint),
and every tensor read back (resume, export) is checked against its hash, so flipped bits inside tensor data are
named instead of resumed from. xxh3-64 hashes ~12 GB/s on one core (2-core CI VM): ~100 s for the 1.2 TB of a 100B
model's state, less than writing it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import struct
import uuid
from pathlib import Path
from typing import Any, Iterable

import torch
import xxhash
from safetensors import safe_open
from torch import Tensor

from megatrain_lightning.storage import ownership
from megatrain_lightning.errors import UserError
from megatrain_lightning.storage.state_files import DriveError
from megatrain_lightning.storage.store import HostStore

FORMAT = "megatrain-checkpoint"
VERSION = 2  # 2: per-tensor hashes in the manifest (version 1 checkpoints load unverified)
MANIFEST = "manifest.json"
META = "lightning.pt"
MODEL_CONFIG = "model_config.json"
RUN_CHECKPOINTS = "checkpoints"  # where train.py puts a run's checkpoints
MOMENTS = ("exp_avg", "exp_avg_sq")

log = logging.getLogger(__name__)

_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


class CheckpointError(UserError):
    """A checkpoint that cannot be used: missing, incomplete, corrupted, or of another model."""


class OtherModelError(CheckpointError):
    """An intact checkpoint of another model (or other frozen parameters): an older checkpoint of the same run would
    not help, so a resume stops at once."""


def _describe(config: dict | None) -> str:
    if not config:
        return "a model without a model_config"
    return f"{config.get('name', '?')} ({config.get('n_layer')} layers, hidden {config.get('hidden_size')})"


# ---- safetensors, written without copies ----
def write_safetensors(path: str | Path, tensors: Iterable[tuple[str, Tensor]],
                      metadata: dict[str, str] | None = None) -> int:
    """Writes contiguous CPU tensors in the given order as a safetensors file and fsyncs it; returns its size."""
    tensors = list(tensors)
    header: dict[str, Any] = {}
    offset = 0
    for name, t in tensors:
        if not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError(f"{name}: write_safetensors needs contiguous CPU tensors")
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    if metadata:
        header["__metadata__"] = metadata
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format aligns the data start to 8 bytes
    with open(path, "wb") as f:
        _write(f, struct.pack("<Q", len(head)) + head)
        for _, t in tensors:
            if t.nbytes:
                _write(f, memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())
    return 8 + len(head) + offset


def digest(t: Tensor) -> str:
    """xxh3-64 of a contiguous CPU tensor's bytes, as hex."""
    return xxhash.xxh3_64_hexdigest(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def _write(f, data) -> None:
    """One write; a module-level function so tests can make the disk 'fill up'."""
    f.write(data)


def read_header(path: Path) -> dict[str, Any]:
    """The header of a safetensors file, checked against the file's size; a clear error names a missing,
    truncated or corrupted file."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file missing: {path}")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"header of {n} bytes in a {size}-byte file")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError) as e:
        raise CheckpointError(f"corrupted safetensors file {path}: {e}") from e
    if 8 + n + end != size:
        raise CheckpointError(f"truncated or corrupted safetensors file {path}: its header describes "
                              f"{8 + n + end} bytes, the file has {size}")
    return header


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- save ----
def unit_file(index: int) -> str:
    return f"unit_{index:05d}.safetensors"


def save(path: str | Path, store: HostStore, meta: dict[str, Any], model_config: dict | None = None) -> Path:
    """Writes a complete checkpoint directory at `path` (atomically replacing one that is there). With several ranks
    every rank calls it: each writes the unit files it owns into rank 0's temporary directory (replicated nodes: the
    first node's ranks), rank 0 writes the rest and renames it into place; an error on one rank is raised on all
    (nothing is renamed)."""
    path = Path(path)
    ranks = store.ranks
    lead = ranks.rank == 0
    tmp = ranks.share(ranks.together(lambda: _begin(path, store, lead)))
    try:
        written: dict[int, tuple[str, int, dict]] = {}
        for part in ranks.gather(ranks.together(lambda: _write_units(tmp, path, store, meta))):
            written.update(part)
        ranks.together(lambda: _finish(tmp, path, store, meta, model_config, written) if lead else None)
    except OSError as e:
        if lead:
            shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise DriveError(errno.ENOSPC, f"the disk filled up while saving checkpoint {path}; the partial write "
                             "was removed and earlier checkpoints are intact") from e
        raise
    except BaseException:
        if lead:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def replaceable(path: Path) -> None:
    """Raises CheckpointError unless a save may put a checkpoint at `path`: nothing is there, a link (replaced, never
    its target), an empty directory, or a megatrain checkpoint holding only the files a save writes (only what the
    project wrote is ever replaced)."""
    if not os.path.lexists(path) or path.is_symlink():
        return
    if path.is_dir():
        names = {p.name for p in path.iterdir()}
        try:
            ours = {MANIFEST, META, MODEL_CONFIG} | {u["file"] for u in _manifest(path)["units"]} if names else set()
        except (CheckpointError, KeyError, TypeError):
            ours = set()
        if names <= ours and all((path / n).is_file() and not (path / n).is_symlink() for n in names):
            return
    raise CheckpointError(f"checkpoint {path} not saved: {path} exists and is not a megatrain checkpoint, or holds "
                          "files a save did not write (nothing there was changed); save to a new path")


def _begin(path: Path, store: HostStore, lead: bool) -> Path | None:
    """Checks the target and the disk space this rank's units need; rank 0 (`lead`) makes the temporary
    directory."""
    replaceable(path)
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    need = 12 * sum(u.layout.numel for u in store.units if not u.remote) * store.ranks.primary + (1 << 20)
    free = shutil.disk_usage(parent).free
    if need > free:
        raise DriveError(errno.ENOSPC, f"not enough disk space for checkpoint {path}: it needs {need / 1e9:.3g} GB, "
                         f"{parent} has {free / 1e9:.3g} GB free (nothing was written; earlier checkpoints are "
                         "intact)")
    if not lead:
        return None
    ownership.remove_dead(parent, ".*.tmp-*", "a partial checkpoint")  # a save killed midway
    tmp = parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    ownership.mark(tmp)
    return tmp


def _write_units(tmp: Path, path: Path, store: HostStore, meta: dict[str, Any]) -> dict[int, tuple[str, int, dict]]:
    """This rank's unit files: {unit: (file, bytes, tensor hashes)}; none from a replica's other than the first."""
    out = {}
    for i, (prefix, unit) in enumerate(zip(store.names, store.units)):
        if unit.remote or not store.ranks.primary:
            continue
        state = store.read_state(i)  # [master | m | v]
        master = unit.layout.split_state(state)[0]
        if not torch.isfinite(master).all():
            bad = next(n for n, v in unit.layout.views(master).items() if not torch.isfinite(v).all())
            raise CheckpointError(f"checkpoint {path} not saved: the weight {prefix + bad} holds NaN or inf "
                                  f"(step {meta.get('global_step')}); earlier checkpoints are intact")
        tensors = []
        for part, key in zip(unit.layout.split_state(state), ("", *(m + "/" for m in MOMENTS))):
            tensors += [(key + prefix + name, view) for name, view in unit.layout.views(part).items()]
        tensors += [(prefix + name, t) for name, t in store.copy_only(i).items()]  # frozen, in their own dtype
        nbytes = write_safetensors(tmp / unit_file(i), tensors)
        out[i] = (unit_file(i), nbytes, {name: digest(t) for name, t in tensors})
    return out


def _finish(tmp: Path, path: Path, store: HostStore, meta: dict[str, Any], model_config: dict | None,
            written: dict[int, tuple[str, int, dict]]) -> None:
    """Lightning's part, the model config and the manifest (last), then the rename into place."""
    parent = path.parent
    torch.save(_plain(meta), tmp / META)
    if model_config is not None:
        (tmp / MODEL_CONFIG).write_text(json.dumps(model_config, indent=1))
    for name in (META, MODEL_CONFIG):
        if (tmp / name).exists():
            _fsync_file(tmp / name)
    manifest = {"format": FORMAT, "version": VERSION, "global_step": meta.get("global_step"),
                "units": [{"file": written[i][0], "bytes": written[i][1], "prefix": p, "xxh3_64": written[i][2]}
                          for i, p in enumerate(store.names)]}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    _fsync_file(tmp / MANIFEST)
    ownership.unmark(tmp)  # complete: no longer a partial checkpoint that a later run may remove
    _fsync_dir(tmp)
    replaceable(path)  # again, right before: nothing of the user's appeared there meanwhile
    old = None
    if os.path.lexists(path):
        old = parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(path, old)
    os.rename(tmp, path)
    _fsync_dir(parent)
    if old is not None and old.is_symlink():
        old.unlink()
    elif old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _plain(obj: Any) -> Any:
    """Hydra/OmegaConf containers (e.g. hyperparameters from a composed config) as plain dicts and lists, so the
    metadata loads with weights_only=True."""
    if type(obj).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(obj, resolve=True)
    if isinstance(obj, dict):
        out = type(obj)((k, _plain(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):  # a module state_dict's version info
            out._metadata = obj._metadata
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    return obj


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


# ---- find and load ----
def is_complete(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def candidates(path: str | Path) -> list[Path]:
    """[`path`] when it is a complete checkpoint; when it is a directory of checkpoints, its complete ones, the
    highest step first (incomplete temporaries are ignored; links such as last.ckpt name one of the others)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if is_complete(path):
        return [path]
    if path.is_dir():
        found = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".") and not p.is_symlink()
                 and is_complete(p)]
        if found:
            return sorted(found, key=lambda p: (_step(p), p.stat().st_mtime), reverse=True)
        if (path / RUN_CHECKPOINTS).is_dir():  # a train.py run directory: its checkpoints
            return candidates(path / RUN_CHECKPOINTS)
        raise CheckpointError(f"{path} holds no complete checkpoint (a checkpoint directory has {MANIFEST}; "
                              "incomplete ones are left by interrupted saves)")
    raise CheckpointError(f"{path} is not a megatrain checkpoint directory (no {MANIFEST})")


def resolve(path: str | Path) -> Path:
    """`path` itself when it is a complete checkpoint; when it is a directory of checkpoints, the complete one
    with the highest step."""
    return candidates(path)[0]


def _step(path: Path) -> int:
    try:
        return _manifest(path).get("global_step") or -1
    except CheckpointError:
        return -1  # an unreadable manifest sorts last; loading it names the problem


def _manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"unreadable {path / MANIFEST}: {e}") from e
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} (format {manifest.get('format')!r})")
    return manifest


def load_newest_intact(path: str | Path, store: HostStore, model_config: dict | None = None) -> tuple[Path, dict]:
    """Loads `store` from checkpoint `path`, or from the newest intact checkpoint of a directory of them (a damaged
    newer one is named in a warning); returns the checkpoint used and Lightning's part of it. `model_config`: this
    run's (named when the checkpoint is of another model)."""
    found = candidates(path)
    for k, candidate in enumerate(found):
        try:
            meta = load_meta(candidate)
            load_store(candidate, store, model_config)  # every unit: a partial load is overwritten by the next try
            error = None
        except OtherModelError:
            raise  # every checkpoint of that run is of that model
        except CheckpointError as e:
            error = e
        # several ranks each verify the units they own: all take the same checkpoint, the newest intact for all
        seen = [e for e in store.ranks.gather(None if error is None else str(error)) if e is not None]
        if not seen:
            break
        if k + 1 == len(found):
            raise error if error is not None else CheckpointError(seen[0])
        log.warning(f"{error or seen[0]}\nresuming from the next older checkpoint instead: {found[k + 1]}")
    if candidate != Path(path):
        log.info(f"resuming from {candidate}, the last intact checkpoint in {path}")
    return candidate, meta


def get_verified(f, key: str, entry: dict[str, Any], file: Path) -> Tensor:
    """Tensor `key` of an open unit file, checked against the manifest's hash (version 1 checkpoints have none)."""
    t = f.get_tensor(key)
    want = entry.get("xxh3_64", {}).get(key)
    if want is not None and digest(t.contiguous()) != want:
        raise CheckpointError(f"damaged checkpoint file {file}: the data of {key} does not match its hash")
    return t


def read_masters(path: str | Path) -> dict[str, Tensor]:
    """Every parameter's fp32 master weight in checkpoint `path` (or the newest in a directory of them), verified
    against its hash: the trained weights for a module's `load_state_dict`."""
    path = resolve(path)
    out = {}
    for entry in _manifest(path)["units"]:
        file = path / entry["file"]
        read_header(file)
        with safe_open(str(file), framework="pt") as f:
            out.update({k: get_verified(f, k, entry, file) for k in f.keys() if "/" not in k})
    return out


def load_meta(path: Path) -> dict[str, Any]:
    if not (path / META).is_file():
        raise CheckpointError(f"checkpoint file missing: {path / META}")
    try:
        return torch.load(path / META, weights_only=True, map_location="cpu")
    except Exception as e:  # a damaged or foreign file: pickle, zip and torch raise their own types
        raise CheckpointError(f"unreadable checkpoint file {path / META}: {e}") from e


def load_store(path: Path, store: HostStore, model_config: dict | None = None) -> None:
    """Loads every unit's master weights and Adam moments. Checks every file and every tensor's name and shape
    first, so a checkpoint of another model changes nothing and the error names both models and the first
    differences."""
    manifest = _manifest(path)
    units = manifest["units"]
    headers = []
    for entry in units:
        file = path / entry["file"]
        header = read_header(file)
        if file.stat().st_size != entry["bytes"]:
            raise CheckpointError(f"{file} has {file.stat().st_size} bytes, the manifest says {entry['bytes']}")
        headers.append(header)
    saved = {k: tuple(v["shape"]) for h in headers for k, v in h.items() if k != "__metadata__" and "/" not in k}
    expected = {prefix + e.name: tuple(e.shape) for prefix, u in zip(store.names, store.units)
                for e in u.layout.entries}
    problems = [f"{k}: checkpoint {saved[k]} vs model {v}" for k, v in expected.items() if k in saved and saved[k] != v]
    problems += [f"{k}: missing from the checkpoint" for k in expected if k not in saved]
    problems += [f"{k}: not in the model" for k in saved if k not in expected]
    if problems or len(units) != len(store.units):
        saved_config = json.loads((path / MODEL_CONFIG).read_text()) if (path / MODEL_CONFIG).is_file() else None
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise OtherModelError(f"checkpoint {path} is of another model shape: it holds {_describe(saved_config)} in "
                              f"{len(units)} units, this run trains {_describe(model_config)} in {len(store.units)}; "
                              f"first differences: {'; '.join(problems[:3])}{more}")
    # Adam moments exist for the trainable parameters only: a checkpoint saved with other parameters frozen
    # would resume other optimizer state than it saved
    trained = {k.split("/", 1)[1] for h in headers for k in h if k.startswith(MOMENTS[0] + "/")}
    trainable = {prefix + e.name for prefix, u in zip(store.names, store.units) for e in u.layout.trainable_entries}
    problems = [f"{k}: trainable now, frozen when saved" for k in sorted(trainable - trained)]
    problems += [f"{k}: frozen now, trained when saved" for k in sorted(trained - trainable)]
    if problems:
        raise OtherModelError(f"checkpoint {path} was saved with other parameters frozen (requires_grad=False); "
                              "resume with the same ones frozen:\n  " + "\n  ".join(problems[:50]))
    for i, (entry, unit) in enumerate(zip(units, store.units)):
        if unit.remote:  # another rank loads it
            continue
        prefix = store.names[i]
        state = torch.empty(unit.layout.state_numel, dtype=torch.float32) if unit.on_disk \
            else unit.tile[:unit.layout.state_numel]
        file = path / entry["file"]
        try:
            with safe_open(str(file), framework="pt") as f:
                for part, key in zip(unit.layout.split_state(state), ("", *(m + "/" for m in MOMENTS))):
                    for name, view in unit.layout.views(part).items():
                        view.copy_(get_verified(f, key + prefix + name, entry, file))
                copy_only = {e.name: get_verified(f, prefix + e.name, entry, file)
                             for e in unit.layout.copy_only_entries}
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise CheckpointError(f"corrupted safetensors file {file}: {e}") from e
        store.write_state(i, state)
        store.write_copy_only(i, copy_only)
