"""Multi-tensor CUDA ops: fused Adam, unscale + inf check, L2 norm (sources + builder)."""
