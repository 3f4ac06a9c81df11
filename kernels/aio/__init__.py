"""libaio reads and writes of host tensors (sources + builder)."""
