"""Reading pickled checkpoint files without letting them run code: the one home for this concern.

Unpickling can call any importable function (`__reduce__`), so a checkpoint from a hub or a colleague
could run anything when loaded. What the pipeline reads goes through here, and anything else is
refused with a ConversionError naming the file (exit 2 from the CLI):
  - a DCP `.metadata` (torch_dist): `load_dcp_metadata`, a restricted unpickler allowing DCP_GLOBALS only;
  - a `.pt` file (megatron-core's common.pt and the objects it keeps in the .distcp files, legacy
    mp_rank_*/model_optim_rng.pt): `safe_torch_load`, torch's own restricted unpickler (weights_only)
    with TORCH_GLOBALS on top;
  - a torch_dist dir before megatron-core loads it (it unpickles some of it in full): `check_torch_dist`;
  - DeepSpeed's files on an HF resume, which DeepSpeed unpickles in full: `check_deepspeed` scans each
    pickle's imports without running it (allowlist: torch's weights_only set and DEEPSPEED_GLOBALS), and
    compares files with the sha256s this pipeline recorded (`file_hashes`) when it wrote the checkpoint.
"""
from __future__ import annotations

import argparse
import collections
import io
import os
import pathlib
import pickle
import pickletools
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch
from torch.distributed.checkpoint import FileSystemReader, filesystem, metadata, planner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

from pipeline.errors import ConversionError
from pipeline.files import sha256_file

# Everything a DCP .metadata holds, found by unpickling those torch.distributed.checkpoint and megatron-core
# write: its dataclasses, torch.Size, dtypes (pickled as `torch.float32`, ...), layouts (by name, through
# _get_layout), the save plans megatron-core adds (`all_local_plans`) and StorageMeta's checkpoint_id
# (a Path when DCP was given one). Memory formats travel as _MEM_FORMAT_ENCODING.
DCP_GLOBALS: Dict[str, Any] = {
    **{f"{module.__name__}.{name}": getattr(module, name) for module, names in (
        (metadata, ("Metadata", "MetadataIndex", "StorageMeta", "ChunkStorageMetadata", "TensorProperties",
                    "TensorStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")),
        (filesystem, ("_StorageInfo",)),
        (planner, ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "BytesIOWriteData")),
    ) for name in names},
    "torch.Size": torch.Size,
    "torch.serialization._get_layout": torch.serialization._get_layout,
    **{f"torch.{name}": value for name, value in vars(torch).items() if isinstance(value, torch.dtype)},
    "collections.OrderedDict": collections.OrderedDict,
    "pathlib.PosixPath": pathlib.PosixPath,
}


class MegatronEnum:
    """Stands in for one of megatron-core's enums in a checkpoint's args (Megatron-LM pickles e.g.
    `args.attention_backend`, an AttnBackend): unpickling calls it with the member's value, and it keeps
    the enum's name and that value. Nothing of megatron is imported, and it runs no code."""

    enum = ""

    def __init__(self, value: Any):
        self.value = value

    def __eq__(self, other: Any) -> bool:
        return type(other) is type(self) and other.value == self.value

    def __hash__(self) -> int:
        return hash((self.enum, self.value))

    def __repr__(self) -> str:
        return f"{self.enum}({self.value!r})"


# megatron-core's enums that Megatron-LM's args may hold, by the name they are pickled under
MEGATRON_ENUMS = tuple(f"megatron.core.{name}" for name in (
    "enums.ModelType", "enums.Fp8Recipe", "enums.Fp4Recipe", "transformer.enums.ModelType",
    "transformer.enums.AttnBackend", "transformer.enums.AttnMaskType", "transformer.enums.AttnType",
    "transformer.enums.LayerType", "transformer.enums.CudaGraphScope"))
STAND_INS = {name: type(name.rsplit(".", 1)[1], (MegatronEnum,), {"enum": name}) for name in MEGATRON_ENUMS}
# numpy arrays, by the names numpy 2 and numpy 1 pickle them under: Megatron-LM's RNG state holds
# np.random.get_state(). An array is rebuilt from its dtype and bytes (an object array's items go through
# this same allowlist), so none of these runs code of the file's choosing.
NUMPY_GLOBALS: List[Any] = [
    *((np._core.multiarray._reconstruct, f"{m}.multiarray._reconstruct") for m in ("numpy._core", "numpy.core")),
    np.ndarray, np.dtype, *(type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFDGUS")]
# On top of torch's weights_only set (tensors, containers, dtypes): Megatron-LM stores its args as an
# argparse.Namespace, holding some of megatron-core's enums (their stand-ins, above, by name); older
# Transformer Engine layers save their `_extra_state` as an io.BytesIO (a byte buffer, never unpickled here)
TORCH_GLOBALS: List[Any] = [argparse.Namespace, *((cls, name) for name, cls in STAND_INS.items()), *NUMPY_GLOBALS,
                            io.BytesIO]


def refused(file: Union[Path, str], names: List[str]) -> str:
    return (f"{file}: stores {', '.join(names)}, which is not on the allowlist: the file may run code when "
            f"unpickled, so it was not loaded. Only checkpoints holding plain data are read (README: Safe loading)")


class _Disallowed(Exception):
    def __init__(self, name: str):
        self.name = name


class _DcpUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        found = DCP_GLOBALS.get(f"{module}.{name}")
        if found is None:
            raise _Disallowed(f"{module}.{name}")
        return found


def load_dcp_metadata(path: Path) -> Metadata:
    """A DCP `.metadata` (what FileSystemReader.read_metadata returns), unpickled allowing DCP_GLOBALS only."""
    try:
        with open(path, "rb") as f:
            loaded = _DcpUnpickler(f).load()
    except _Disallowed as e:
        raise ConversionError(refused(path, [e.name])) from None
    except FileNotFoundError:
        raise
    except Exception as e:  # whatever a truncated or garbage pickle raises
        raise ConversionError(f"{path}: not a readable DCP .metadata file (truncated or corrupt?): "
                              f"{_reason(e)}") from None
    if not (isinstance(loaded, Metadata) and isinstance(getattr(loaded, "state_dict_metadata", None), dict)
            and isinstance(getattr(loaded, "storage_data", None), dict)):
        raise ConversionError(f"{path}: not a DCP .metadata file (it unpickles to a {type(loaded).__name__})")
    return loaded


def safe_torch_load(source: Union[Path, bytes], label: Optional[str] = None, mmap: bool = False) -> Any:
    """torch.load with torch's restricted unpickler (weights_only) and TORCH_GLOBALS; `source` a file or
    the bytes of one (`label` then names it in errors)."""
    label = label or str(source)
    try:
        with torch.serialization.safe_globals(TORCH_GLOBALS):
            return torch.load(source if isinstance(source, Path) else io.BytesIO(source), map_location="cpu",
                              weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise
    except Exception as e:  # a disallowed global, or whatever a truncated or garbage file raises
        names = _unsafe_globals(source)
        if names:
            raise ConversionError(refused(label, names)) from None
        raise ConversionError(f"{label}: not a readable torch.save file (truncated or corrupt?): "
                              f"{_reason(e)}") from None


def _unsafe_globals(source: Union[Path, bytes]) -> List[str]:
    """The imports torch's weights_only loader refused, found without running the pickle: torch's own scan
    for a torch.save zip; every import of a plain pickle (torch.save never writes one)."""
    try:
        with open(source, "rb") if isinstance(source, Path) else io.BytesIO(source) as f:
            if zipfile.is_zipfile(f):
                f.seek(0)
                with torch.serialization.safe_globals(TORCH_GLOBALS):
                    return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(f))
            f.seek(0)
            return pickle_imports(f)
    except Exception:  # not a pickle at all: the caller reports it as unreadable
        return []


def pickle_imports(f) -> List[str]:
    """`module.name` of each import in a pickle stream, read with pickletools (nothing is executed)."""
    found: List[str] = []
    pushed: List[Any] = []  # what each opcode pushed, strings kept: STACK_GLOBAL takes the last two
    memo: Dict[int, Any] = {}
    for op, arg, _ in pickletools.genops(f):
        if op.name in ("GLOBAL", "INST"):
            found.append(arg.replace(" ", "."))
        elif op.name == "STACK_GLOBAL":
            module, name = (pushed[-2:] if len(pushed) >= 2 else [None, None])
            found.append(f"{module}.{name}" if isinstance(module, str) and isinstance(name, str) else "a global")
        elif op.name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
        elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = pushed[-1] if pushed else None
        elif op.name in ("GET", "BINGET", "LONG_BINGET"):
            pushed.append(memo.get(arg))
        else:
            pushed.append(arg if isinstance(arg, str) else None)
    return found


def _reason(e: BaseException) -> str:
    """The line of an error that says what went wrong (torch's weights_only errors open with advice)."""
    text = str(e).split("WeightsUnpickler error:", 1)[-1]
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


# ----------------------------------------------------------------------------- megatron-core torch_dist

COMMON_FILE = "common.pt"  # megatron-core's non-tensor state of a torch_dist checkpoint


class _Objects:
    """The part of a DCP load planner FileSystemReader.read_data uses for byte items: each one is checked."""

    def __init__(self, path: Path, md: Metadata):
        self.path, self.md = path, md

    def load_bytes(self, item, value: io.BytesIO) -> None:
        stored = self.md.storage_data[item.storage_index]
        safe_torch_load(value.getvalue(), f"{self.path / stored.relative_path} (object {item.storage_index.fqn})")


def check_torch_dist(path: Path) -> Dict[str, Any]:
    """Every pickle megatron-core's dist_checkpointing.load reads in a torch_dist dir, loaded restricted
    first: `.metadata` (which it unpickles in full), common.pt, and each object stored as bytes in the
    .distcp files (its ShardedObjects: RNG states, layers' extra state), which DCP's load planner reads
    with torch.load(weights_only=False). Tensors DCP itself reads weights_only. Returns common.pt."""
    if not (path / ".metadata").is_file():
        raise ConversionError(f"{path}: no .metadata; not a torch_dist checkpoint (or its save did not finish)")
    if not (path / COMMON_FILE).is_file():
        raise ConversionError(f"{path}: no {COMMON_FILE}; not a megatron-core torch_dist checkpoint")
    md = load_dcp_metadata(path / ".metadata")
    common = safe_torch_load(path / COMMON_FILE)
    if not isinstance(common, dict):
        raise ConversionError(f"{path / COMMON_FILE}: not megatron-core's common state (it holds a "
                              f"{type(common).__name__})")
    reader = FileSystemReader(str(path))
    reader.set_up_storage_reader(md, True)
    objects = [index for index in md.storage_data
               if isinstance(md.state_dict_metadata.get(getattr(index, "fqn", None)), BytesStorageMetadata)]
    items = [planner.ReadItem(type=planner.LoadItemType.BYTE_IO, dest_index=index, dest_offsets=torch.Size([0]),
                              storage_index=index, storage_offsets=torch.Size([0]), lengths=torch.Size([0]))
             for index in objects]
    try:
        reader.read_data(planner.LoadPlan(items), _Objects(path, md)).wait()
    except ConversionError:
        raise
    except Exception as e:  # storage_data pointing at missing files or past their end
        raise ConversionError(f"{path}: the objects .metadata lists cannot be read: {_reason(e)}") from None
    return common


# ----------------------------------------------------------------------------- HF / DeepSpeed checkpoints

def file_hashes(ckpt: Path, skip: tuple = ()) -> Dict[str, str]:
    """sha256 of every file in a checkpoint dir, by path relative to it (`skip`: names left out)."""
    return {f.relative_to(ckpt).as_posix(): sha256_file(f) for f in sorted(ckpt.rglob("*"))
            if f.is_file() and f.name not in skip}


# DeepSpeed's own classes in its ZeRO optimizer states (plain data holders: an enum, a dataclass, the loss
# scaler's settings), by name: the scan below never imports or calls them
DEEPSPEED_GLOBALS = ("deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.utils.tensor_fragment.fragment_address",
                     "deepspeed.runtime.fp16.loss_scaler.LossScaler")


def check_deepspeed(ckpt: Path, recorded: Optional[Dict[str, str]], marker: str) -> None:
    """Before DeepSpeed unpickles an HF checkpoint's ZeRO files in full (which may run code): DeepSpeed's
    `latest` must name a directory inside `ckpt`, and every pickle in that directory may import only
    torch's weights_only set and DEEPSPEED_GLOBALS, found by scanning it without running it (torch's
    get_unsafe_globals_in_checkpoint reads the small data.pkl of the zip, not the tensors). Files whose
    sha256 the completion marker records must still have it (a changed file is corrupt, not ours)."""
    latest = ckpt / "latest"
    tag = latest.read_text().strip() if latest.is_file() else ""
    if not tag or "/" in tag or tag in (".", "..") or not (ckpt / tag).is_dir() or (ckpt / tag).is_symlink():
        raise ConversionError(f"{latest}: names {tag!r}, not a directory inside {ckpt}; DeepSpeed would unpickle "
                              f"its files from there, so the checkpoint was not loaded")
    recorded = recorded if isinstance(recorded, dict) else {}
    for dirpath, dirnames, filenames in os.walk(ckpt / tag):
        here = Path(dirpath)
        for name in dirnames + filenames:
            if (here / name).is_symlink():  # the loader would follow it out of what was checked
                raise ConversionError(f"{here / name}: a symlink in a checkpoint; what it points to cannot be "
                                      f"checked, so the checkpoint was not loaded")
        for name in filenames:
            f = here / name
            _check_scanned(f)
            rel = f.relative_to(ckpt).as_posix()
            if rel in recorded and recorded[rel] != sha256_file(f):
                raise ConversionError(f"{f}: changed since this pipeline wrote it (its sha256 is not the one "
                                      f"{ckpt / marker} records): a corrupt checkpoint. Resume from an earlier one "
                                      f"with train.resume_from=<dir>")


def _check_scanned(f: Path) -> None:
    try:
        with open(f, "rb") as handle:
            if not zipfile.is_zipfile(handle):
                raise ConversionError(f"{f}: not a torch.save zip file, so it cannot be checked before DeepSpeed "
                                      f"unpickles it; the checkpoint was not loaded")
            handle.seek(0)
            found = torch.serialization.get_unsafe_globals_in_checkpoint(handle)
    except ConversionError:
        raise
    except Exception as e:  # a damaged zip or pickle
        raise ConversionError(f"{f}: not a readable torch.save file (truncated or corrupt?): {_reason(e)}") from None
    unsafe = sorted(set(found) - set(DEEPSPEED_GLOBALS))
    if unsafe:
        raise ConversionError(refused(f, unsafe))
