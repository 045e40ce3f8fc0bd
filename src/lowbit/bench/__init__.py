"""Benchmarks that write results files: quality grids from YAML recipes (``grid``), end-to-end decode speed
(``decode``) and kernel bandwidth/throughput (``kernels``)."""
