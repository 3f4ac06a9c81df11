"""AVX-512 / AVX2 + OpenMP Adam over fp32 master weights (sources + builder)."""
