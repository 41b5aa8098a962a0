"""The model families, by HF architecture and by our model.family. Adding a family: one module with a
FAMILY table, one line here, one round-trip test."""
from pipeline.errors import ConversionError
from pipeline.models import gpt2, llama, qwen2
from pipeline.models.mapping import Family

FAMILIES = {f.name: f for f in (llama.FAMILY, qwen2.FAMILY, gpt2.FAMILY)}
BY_ARCHITECTURE = {arch: f for f in FAMILIES.values() for arch in f.architectures}


def by_architecture(architecture: str) -> Family:
    if architecture not in BY_ARCHITECTURE:
        raise ConversionError(f"architecture {architecture} is not supported; supported: {sorted(BY_ARCHITECTURE)}")
    return BY_ARCHITECTURE[architecture]
