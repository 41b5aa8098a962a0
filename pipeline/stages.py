"""The pipeline's stages, upstream first. Adding a stage = one module with a `run(ctx)` + one row here."""
from pipeline.convert import stage as convert
from pipeline.data import mix, tokenize, tokenizer
from pipeline.runner import Stage
from pipeline.train import stage as train

STAGES = [
    Stage("tokenizer", needs=(), reads=("tokenizer", "data.sources"), run=tokenizer.run,
          external_inputs=tokenizer.external_inputs),
    Stage("tokenize", needs=("tokenizer",), reads=("data.sources", "data.tokenize"), run=tokenize.run,
          external_inputs=tokenize.external_inputs, resumable=True, holds_work=tokenize.shards_done),
    # version 2: valid/<source>.bin/.idx and valid.sources.bin/.idx (per-source validation)
    Stage("mix", needs=("tokenize",), reads=("data.mix",), run=mix.run, version="2"),
    # How-only keys (launcher, train.parallel, trackers, logging, tolerances: marked in pipeline/config.py)
    # are seen but not hashed: a partial run resumes at another layout or port, a finished one is kept.
    # The import pads the embedding for train.parallel.tp; the train stage checks that padding against
    # its own.
    Stage("import", needs=(), reads=("train.init", "train.backend", "train.parallel",
                                     "train.make_vocab_size_divisible_by", "export.tolerance"),
          run=convert.run_import, external_inputs=convert.import_inputs),
    Stage("train", needs=("tokenizer", "mix", "import"), reads=("model", "train", "launcher", "export.tolerance"),
          run=train.run, check=train.check, resumable=True, holds_work=train.held_checkpoints,
          unpinned=train.UNPINNED),
    Stage("export", needs=("train",), reads=("export", "train.backend"), run=convert.run_export),
]
