"""Numba kernels: pure functions on arrays, no I/O, no Python objects.

solve: CG and Cholesky row solves, blocked normal equations; loss: objective pieces;
topk: exact top-K over score blocks; gram: the fixed side's Gram matrix.
"""
