"""Attention ops, one folder per op: a readable oracle (`naive.py`) and fast paths behind one function."""
