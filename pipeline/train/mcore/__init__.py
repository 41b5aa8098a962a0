"""The megatron backend's library, by concern; pipeline/train/megatron_entry.py wires it per rank.

model.py       TransformerConfig per family, layer spec, GPTModel chunks in megatron-core's DDP
data.py        GPTDataset over the mixed .bin/.idx, this rank's micro batches
step.py        optimizer and schedule, forward/loss, train and eval steps, the step log
checkpoint.py  torch_dist save/load (sharded state), resume, the args a checkpoint stores
cpu.py         the CPU (gloo) compatibility layer for megatron-core; GPU runs never install it
"""
