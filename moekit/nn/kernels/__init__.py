"""moekit.nn.kernels: the expert compute (CPU job scheduler, grouped GEMM, fused experts), each beside its oracle."""
