"""Flash-LoRA-Attention kernels (Triton) and their references."""
