"""The pipeline's stages, upstream first. Adding a stage = one module with a `run(ctx)` + one row here."""
from pipeline.convert import stage as convert
from pipeline.data import mix, tokenize, tokenizer
from pipeline.train import stage as train
from pipeline.runner import Stage

STAGES = [
    Stage("tokenizer", needs=(), reads=("tokenizer", "data.sources"), run=tokenizer.run,
          external_inputs=tokenizer.external_inputs),
    Stage("tokenize", needs=("tokenizer",), reads=("data.sources", "data.tokenize"), run=tokenize.run,
          ignores=("data.tokenize.workers", "data.tokenize.executor", "data.tokenize.ray_address"),
          external_inputs=tokenize.external_inputs, resumable=True),
    Stage("mix", needs=("tokenize",), reads=("data.mix",), run=mix.run),
    # train.parallel (TP/PP/VPP/SP layout) decides how the model is split, not what it learns: a
    # partial run resumes at another layout, a finished one is not redone. The import pads the
    # embedding for train.parallel.tp; the train stage checks that padding against its own.
    Stage("import", needs=(), reads=("train.init", "train.backend", "train.parallel", "train.make_vocab_size_divisible_by",
                                     "export.tolerance"), run=convert.run_import, ignores=("train.parallel",),
          external_inputs=convert.import_inputs),
    Stage("train", needs=("tokenizer", "mix", "import"), reads=("model", "train", "launcher", "export.tolerance"), run=train.run,
          ignores=("train.parallel",), resumable=True),
    Stage("export", needs=("train",), reads=("export", "train.backend"), run=convert.run_export),
]
