"""The ground floor: the method's settings, its rule tables and the package's error types.

Plain Python only (no JAX, no NumPy at import), so a program can check every flag before it pays
for anything heavier. Everything else in the package may import from here; nothing here imports
the rest.
"""
