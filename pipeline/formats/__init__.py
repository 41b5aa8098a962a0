"""On-disk formats: Megatron's .bin/.idx token files, and where each backend's checkpoints live."""
