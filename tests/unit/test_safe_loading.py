"""Nothing a checkpoint file holds runs code when the pipeline reads it (pipeline/safeload.py).

A payload pickle (its `__reduce__` runs `touch <marker>`) is put where a real file goes in a real
checkpoint: a DCP `.metadata` or megatron-core's `common.pt` of a torch_dist checkpoint the converter
wrote, a legacy `mp_rank_*/model_optim_rng.pt`, an object DCP stores as bytes in a `.distcp`, an HF
DeepSpeed `*_model_states.pt`. Each read is refused naming the file, and the marker never appears.
The conversions run in-process on a tiny random Llama (no megatron-core); the megatron backend's own
loader runs once, in a subprocess (megatron-core is not imported into the test process). About 15 s."""
import json
import os
import pickle
import random
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint.metadata import StorageMeta

from pipeline import safeload
from pipeline.errors import ConversionError
from pipeline.formats.checkpoints import COMPLETE

from conftest import REPO, cli, tiny_hf

ITER = "iter_0000001"


class Payload:
    """Unpickled by plain pickle (or torch.load(weights_only=False)), this creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A torch_dist (TP1) and a legacy (TP2) checkpoint, written by the converter from a tiny random Llama."""
    from pipeline.convert.convert import hf_to_megatron

    root = tmp_path_factory.mktemp("converted")
    hf = tiny_hf("llama", root / "hf")
    hf_to_megatron(hf, root / "dist", tp=1, pp=1, fmt="torch_dist")
    hf_to_megatron(hf, root / "legacy", tp=2, pp=1, fmt="torch")
    return root


def copy(converted, name, tmp_path) -> Path:
    return Path(shutil.copytree(converted / name, tmp_path / name))


def poison_metadata(ckpt: Path, marker: Path) -> Path:
    """The real .metadata with the payload tucked inside it: everything else still looks right."""
    file = ckpt / ITER / ".metadata"
    with open(file, "rb") as f:
        md = pickle.load(f)  # the converter's own file, written just now
    # ours has no storage_meta (it is left out for reproducible bytes); megatron-core's has one
    md.storage_meta = StorageMeta(modules=[Payload(marker)])
    file.write_bytes(pickle.dumps(md))
    return file


def replace_metadata(ckpt: Path, marker: Path) -> Path:
    file = ckpt / ITER / ".metadata"
    file.write_bytes(pickle.dumps(Payload(marker), protocol=5))
    return file


def poison_common(ckpt: Path, marker: Path) -> Path:
    file = ckpt / ITER / "common.pt"
    torch.save({**safeload.safe_torch_load(file), "extra": Payload(marker)}, file)
    return file


def poison_legacy_rank(ckpt: Path, marker: Path) -> Path:
    file = ckpt / ITER / "mp_rank_01" / "model_optim_rng.pt"  # not the first rank: read with the tensors
    torch.save({**safeload.safe_torch_load(file), "rng_state": [Payload(marker)]}, file)
    return file


def test_the_payloads_run_code_under_the_loaders_they_replace(converted, tmp_path):
    """Without this module, DCP's reader and a plain torch.load run them: the test payloads are live."""
    from torch.distributed.checkpoint import FileSystemReader

    ckpt, marker = copy(converted, "dist", tmp_path), tmp_path / "ran"
    poison_metadata(ckpt, marker)
    FileSystemReader(str(ckpt / ITER)).read_metadata()
    assert marker.exists()
    marker.unlink()
    torch.load(poison_common(ckpt, marker), weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("name,poison,what", [
    ("dist", poison_metadata, "posix.system"),
    ("dist", replace_metadata, "posix.system"),
    ("dist", poison_common, "posix.system"),
    ("legacy", poison_legacy_rank, "posix.system"),
], ids=["metadata_inside", "metadata_replaced", "common_pt", "legacy_rank_file"])
def test_convert_refuses_a_payload_naming_the_file_and_runs_nothing(converted, tmp_path, capsys, name, poison, what):
    ckpt, marker = copy(converted, name, tmp_path), tmp_path / "ran"
    file = poison(ckpt, marker)
    assert cli("convert", f"src={ckpt}", f"dst={tmp_path / 'out'}", "to=hf") == 2
    err = capsys.readouterr().err
    assert f"{file}: stores {what}, which is not on the allowlist: the file may run code when unpickled" in err, err
    assert not marker.exists()
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def dcp_with_object(ckpt: Path, obj, converted) -> Path:
    """A torch_dist iteration holding an object (as megatron-core keeps its RNG state), written by DCP;
    common.pt and metadata.json are the converter's."""
    from torch.distributed.checkpoint import FileSystemWriter, save

    folder = ckpt / ITER
    folder.mkdir(parents=True)
    save({"weight": torch.ones(4, 4), "rng_state": obj}, storage_writer=FileSystemWriter(str(folder)), no_dist=True)
    for name in ("common.pt", "metadata.json"):
        shutil.copy(converted / "dist" / ITER / name, folder / name)
    (ckpt / "latest_checkpointed_iteration.txt").write_text("1")
    return folder


MEGATRON_LOADS = """
import json, sys
from pathlib import Path
from pipeline.formats.checkpoints import iteration_dir
from pipeline.train.mcore import checkpoint as me

out = {}
for ckpt in sys.argv[1:]:
    try:  # the check runs before the model is touched: no model is needed to be refused
        me.load_checkpoint(iteration_dir(Path(ckpt), 1), None, None, None, {})
        out[ckpt] = "loaded"
    except SystemExit as e:
        out[ckpt] = str(e)
print("RESULT " + json.dumps(out))
"""


def test_the_megatron_backend_checks_what_megatron_core_would_unpickle_before_loading(converted, tmp_path):
    """Resume and train.init (load_checkpoint) and the stage's read of the init checkpoint's args."""
    from pipeline.train.mcore.checkpoint import read_checkpoint_args

    marker = tmp_path / "ran"
    cases = {"metadata": copy(converted, "dist", tmp_path), "common": tmp_path / "common"}
    shutil.copytree(converted / "dist", cases["common"])
    files = {"metadata": poison_metadata(cases["metadata"], marker), "common": poison_common(cases["common"], marker)}
    cases["object"] = tmp_path / "object"
    folder = dcp_with_object(cases["object"], {"random": random.getstate(), "x": Payload(marker)}, converted)
    files["object"] = folder / "__0_0.distcp"
    proc = subprocess.run([sys.executable, "-c", MEGATRON_LOADS, *map(str, cases.values())], capture_output=True,
                          text=True, cwd=REPO)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, proc.stderr[-3000:]
    results = json.loads(line[len("RESULT "):])
    for case, ckpt in cases.items():
        assert f"{files[case]}" in results[str(ckpt)] and "posix.system" in results[str(ckpt)], results
        assert "may run code" in results[str(ckpt)]
    assert "(object rng_state.x)" in results[str(cases["object"])]  # DCP stores each leaf of a dict
    with pytest.raises(ConversionError, match="posix.system"):
        read_checkpoint_args(cases["common"])
    assert not marker.exists()


def test_clean_checkpoints_read_as_dcp_reads_them(converted, tmp_path):
    for folder in (converted / "dist" / ITER, dcp_with_object(tmp_path / "object", {"random": random.getstate()},
                                                             converted)):
        with open(folder / ".metadata", "rb") as f:  # DCP's FileSystemReader.read_metadata: pickle.load
            assert safeload.load_dcp_metadata(folder / ".metadata") == pickle.load(f)
        assert safeload.check_torch_dist(folder)["args"].num_layers == 2
    assert safeload.safe_torch_load(converted / "legacy" / ITER / "mp_rank_00" / "model_optim_rng.pt")["model"]


# ----------------------------------------------------------------------------- HF / DeepSpeed resume

def hf_checkpoint(path: Path) -> Path:
    """An HF Trainer + DeepSpeed checkpoint dir, files laid out and pickled as they write them, and the
    completion marker with the sha256s on_save records (the same function)."""
    tag = path / "global_step4"
    tag.mkdir(parents=True)
    torch.save({"module": {"w": torch.ones(3)}, "ds_version": "0.19.8"}, tag / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": {"state": {}}}, tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    (path / "latest").write_text("global_step4")
    torch.save({"python": random.getstate()}, path / "rng_state_0.pth")
    torch.save({"last_epoch": 4}, path / "scheduler.pt")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    marker = {"step": 4, "data_fingerprint": "d", "model_fingerprint": "m",
              "sha256": safeload.file_hashes(path, skip=(COMPLETE,))}
    (path / COMPLETE).write_text(json.dumps(marker))
    return path


def payload_states(ckpt, marker):
    torch.save({"module": {}, "x": Payload(marker)}, ckpt / "global_step4" / "mp_rank_00_model_states.pt")
    return ckpt / "global_step4" / "mp_rank_00_model_states.pt", "stores posix.system, which is not on the allowlist"


def unrecorded_file(ckpt, marker):
    torch.save(Payload(marker), ckpt / "global_step4" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    return ckpt / "global_step4" / "zero_pp_rank_1_mp_rank_00_optim_states.pt", "stores posix.system"


def forged_marker(ckpt, marker):  # a payload with a marker that matches it: the scan still refuses it
    file, message = payload_states(ckpt, marker)
    saved = json.loads((ckpt / COMPLETE).read_text())
    saved["sha256"] = safeload.file_hashes(ckpt, skip=(COMPLETE,))
    (ckpt / COMPLETE).write_text(json.dumps(saved))
    return file, message


def latest_elsewhere(ckpt, marker):
    (ckpt / "latest").write_text("../../elsewhere/global_step4")
    return ckpt / "latest", "names '../../elsewhere/global_step4', not a directory inside"


def changed_since_written(ckpt, marker):  # plain data, but not what was written: corrupt
    torch.save({"module": {"w": torch.zeros(3)}, "ds_version": "0.19.8"},
               ckpt / "global_step4" / "mp_rank_00_model_states.pt")
    return ckpt / "global_step4" / "mp_rank_00_model_states.pt", "changed since this pipeline wrote it"


@pytest.mark.parametrize("change", [payload_states, unrecorded_file, forged_marker, latest_elsewhere,
                                    changed_since_written])
def test_an_hf_resume_refuses_what_deepspeed_would_unpickle_unsafely(tmp_path, change):
    from pipeline.train.hf_backend import check_resumable

    ckpt, marker = hf_checkpoint(tmp_path / "checkpoint-4"), tmp_path / "ran"
    check_resumable(ckpt)  # as written: resumes
    file, message = change(ckpt, marker)
    with pytest.raises(SystemExit) as refused:
        check_resumable(ckpt)
    assert str(refused.value).startswith(str(file)) and message in str(refused.value), refused.value
    assert not marker.exists()


def test_an_hf_checkpoint_from_before_the_hashes_still_resumes(tmp_path):
    from pipeline.train.hf_backend import check_resumable

    ckpt = hf_checkpoint(tmp_path / "checkpoint-4")
    saved = json.loads((ckpt / COMPLETE).read_text())
    del saved["sha256"]  # as checkpoints written before the marker recorded them
    (ckpt / COMPLETE).write_text(json.dumps(saved))
    check_resumable(ckpt)


def test_a_real_deepspeed_optimizer_state_passes_the_scan(tmp_path):
    """DeepSpeed's ZeRO optimizer states pickle three of its classes: those and nothing else are allowed."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from pipeline.train.hf_backend import check_resumable

    ckpt = hf_checkpoint(tmp_path / "checkpoint-4")
    torch.save({"zero_stage": ZeroStageEnum.gradients, "loss_scaler": LossScaler(1.0),
                "param_slice_mappings": [{"w": fragment_address(numel=3, start=0)}]},
               ckpt / "global_step4" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    check_resumable(ckpt)  # not recorded in the marker: scanned only


def test_an_hf_resume_refuses_a_symlinked_dir_it_cannot_check(tmp_path):
    from pipeline.train.hf_backend import check_resumable

    ckpt = hf_checkpoint(tmp_path / "checkpoint-4")
    shutil.move(ckpt / "global_step4", tmp_path / "elsewhere")
    (ckpt / "global_step4").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(SystemExit, match="not a directory inside"):
        check_resumable(ckpt)


# ----------------------------------------------------------------------------- fuzz

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def damaged(data: bytes, cut: int, flips) -> bytes:
    out = bytearray(data[:max(1, cut)])
    for at, value in flips:
        out[at % len(out)] = value
    return bytes(out)


def read_metadata(tmp_path, data: bytes):
    file = tmp_path / "fuzz.metadata"
    file.write_bytes(data)
    try:
        md = safeload.load_dcp_metadata(file)
    except ConversionError as e:
        assert str(file) in str(e)
        return
    assert isinstance(md.state_dict_metadata, dict)  # a read that passes is a Metadata


def read_torch(data: bytes):
    try:
        safeload.safe_torch_load(data, "fuzz.pt")
    except ConversionError as e:
        assert "fuzz.pt" in str(e)


@FUZZ
@given(data=st.binary(max_size=4096))
def test_random_bytes_are_a_clean_error(tmp_path, data):
    read_metadata(tmp_path, data)
    read_torch(data)


@FUZZ
@given(cut=st.integers(0, 1 << 20), flips=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)),
                                                    max_size=4))
def test_truncated_or_damaged_real_files_are_a_clean_error_or_a_read(converted, tmp_path, cut, flips):
    metadata = (converted / "dist" / ITER / ".metadata").read_bytes()
    common = (converted / "dist" / ITER / "common.pt").read_bytes()
    read_metadata(tmp_path, damaged(metadata, cut % (len(metadata) + 1), flips))
    read_torch(damaged(common, cut % (len(common) + 1), flips))


def test_no_model_or_tokenizer_load_trusts_remote_code():
    """trust_remote_code stays off unless a config sets it (tokenizer.trust_remote_code)."""
    sources = [p for d in ("pipeline", "bench") for p in (REPO / d).rglob("*.py")]
    offenders = [str(p) for p in sources if "trust_remote_code=True" in p.read_text().replace(" ", "")]
    assert sources and offenders == []
