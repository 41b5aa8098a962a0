"""train.document_mask and train.eod_mask_loss on both backends, through each backend's own block -> inputs
code (hf: DocumentBlocks + the Trainer's collator; megatron: GPTDataset, MicroBatches, step.model_inputs and
forward_step): a block holding doc A + EOD + doc B gives B the logits B has alone (fp32, within 1e-5)
with the mask on, and other logits with it off."""
import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.formats.indexed import IndexedWriter
from pipeline.train.job import TrainJob, TrainSettings

VOCAB, EOD = 256, 1
MODEL = dataclasses.asdict(ModelConfig(family="llama", hidden_size=64, num_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, ffn_hidden_size=176, max_position_embeddings=512))
DOC_A, DOC_B = 23, 17  # tokens before each EOD


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    """A .bin/.idx of two documents, each closed by EOD: A + EOD + B + EOD."""
    rng = np.random.default_rng(0)
    a, b = rng.integers(2, VOCAB, DOC_A), rng.integers(2, VOCAB, DOC_B)
    prefix = tmp_path_factory.mktemp("docs") / "train"
    writer = IndexedWriter(prefix, np.uint16)
    writer.add(np.concatenate([a, [EOD], b, [EOD]]), np.array([DOC_A + 1, DOC_B + 1]))
    writer.finish()
    return prefix, torch.from_numpy(b).long()


def hf_job(prefix, document_mask: bool, eod_mask_loss: bool = False) -> TrainJob:
    train = TrainSettings(seq_len=DOC_A + 1 + DOC_B, document_mask=document_mask, eod_mask_loss=eod_mask_loss)
    return TrainJob(model=MODEL, train=train, vocab_size=VOCAB, eod_id=EOD, train_prefix=str(prefix))


def test_hf_document_mask_gives_the_second_document_its_logits_alone(docs):
    from pipeline.train.hf_backend import DocumentBlocks, build_model, collate

    prefix, b = docs
    model = build_model(hf_job(prefix, True)).eval()
    assert model.config._attn_implementation == "sdpa"  # the path the README names
    with torch.no_grad():
        alone = model(input_ids=b[None]).logits[0]
        packed = {}
        for mask in (True, False):  # the block as the Trainer gets it: DocumentBlocks, then the Trainer's collator
            batch = collate([DocumentBlocks(prefix, hf_job(prefix, mask))[0]])
            packed[mask] = model(**batch).logits[0, DOC_A + 1:]
    assert batch["input_ids"][0, DOC_A] == EOD
    assert (packed[True] - alone).abs().max() < 1e-5
    assert (packed[False] - alone).abs().max() > 1e-2


def test_hf_eod_mask_loss_drops_the_prediction_from_the_eod(docs):
    from pipeline.train.hf_backend import DocumentBlocks, build_model, collate

    prefix, _ = docs
    model = build_model(hf_job(prefix, True)).eval()
    item = DocumentBlocks(prefix, hf_job(prefix, True, eod_mask_loss=True))[0]
    assert (item["labels"] == -100).nonzero().view(-1).tolist() == [DOC_A + 1]  # the label after the EOD
    assert item["position_ids"][DOC_A] == DOC_A and item["position_ids"][DOC_A + 1] == 0
    with torch.no_grad():
        out = model(**collate([item]))
        full = model(**collate([DocumentBlocks(prefix, hf_job(prefix, True))[0]])).loss
    per_token = torch.nn.functional.cross_entropy(out.logits[0, :-1], item["input_ids"][1:], reduction="none")
    kept = torch.ones_like(per_token, dtype=torch.bool)
    kept[DOC_A] = False  # the prediction made at the EOD
    assert out.loss == pytest.approx(float(per_token[kept].mean()), abs=1e-6)
    assert full == pytest.approx(float(per_token.mean()), abs=1e-6) and abs(float(full - out.loss)) > 1e-4


MEGATRON = """
import json, sys, torch
import torch.distributed as dist
from pipeline.train.mcore import cpu, data, step
from pipeline.train.mcore import model as models

cpu.install()
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # megatron's builder wants a group
from megatron.core import parallel_state as ps, tensor_parallel
ps.initialize_model_parallel(1, 1)
tensor_parallel.model_parallel_cuda_manual_seed(0)
job = json.loads(sys.argv[1])
model = models.build_model(job, models.transformer_config(job, "fp32"))[0].eval()
out = {}
for mask in (True, False):
    job["train"].update(document_mask=mask, eod_mask_loss=mask)
    job["work_dir"] = f"{sys.argv[2]}/{mask}"
    train, _ = data.build_datasets(job, 1, 0)
    batch = next(data.MicroBatches(train, 1, 1, 0, 1).batch(0))  # the sample the training loop gets
    tokens = batch["tokens"][0]
    second = int((tokens == job["eod_id"]).nonzero()[0]) + 1  # either document may come first
    n = tokens.numel() - second
    alone = {"tokens": tokens[None, second:], "position_ids": torch.arange(n)[None],
             "attention_mask": torch.ones(n, n).triu(1).bool()[None, None]}
    with torch.no_grad():
        logits = model(**step.model_inputs(batch, packed=False))[0, second:]
        ref = model(**step.model_inputs(alone, packed=False))[0]
        per_token, loss_func = step.forward_step(iter([batch]), model)
        loss_sum, counted, _ = loss_func(per_token)
    thd = step.model_inputs(batch, packed=True)  # what TE would get on a GPU (not run here: no TE)
    cu_seqlens = thd["packed_seq_params"].cu_seqlens_q.tolist()
    out[str(mask)] = {"max_diff": float((logits - ref).abs().max()), "eod": second - 1, "seq": tokens.numel(),
                      "masked": (batch["loss_mask"][0] == 0).nonzero().view(-1).tolist(), "counted": int(counted),
                      "loss_sum": float(loss_sum), "kept_sum": float(per_token[0].sum() - per_token[0, second - 1]),
                      "thd": list(thd["input_ids"].shape), "cu_seqlens": cu_seqlens}
print("RESULT " + json.dumps(out))
"""


def test_megatron_document_mask_and_eod_mask_loss(docs, tmp_path):
    """megatron-core's GPTDataset reset options through this backend's data and step code, local spec (CPU)."""
    prefix, _ = docs
    job = hf_job(prefix, True).to_dict()
    job.update(valid_prefix=str(prefix), padded_vocab_size=VOCAB)
    proc = subprocess.run([sys.executable, "-c", MEGATRON, json.dumps(job), str(tmp_path)], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT ", 1)[1])
    on, off = out["True"], out["False"]
    assert on["max_diff"] < 1e-5 and off["max_diff"] > 1e-2, out
    assert on["seq"] == DOC_A + 1 + DOC_B and on["eod"] in (DOC_A, DOC_B)
    # eod_mask_loss (on with the mask here): the position whose input is the EOD leaves the loss
    assert on["masked"] == [on["eod"]] and on["counted"] == on["seq"] - 1
    assert on["loss_sum"] == pytest.approx(on["kept_sum"], rel=1e-6)
    assert off["masked"] == [] and off["counted"] == off["seq"]
    # under TE the micro batch goes as one packed row, a sequence per document
    assert on["cu_seqlens"] == [0, on["eod"] + 1, on["seq"]] and off["cu_seqlens"] == [0, off["seq"]]
    assert on["thd"] == [1, on["seq"]]
