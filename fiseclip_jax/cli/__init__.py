"""The command-line programs (MVTec AD, VisA, BTAD, a folder, the demo, conversion, the benchmark).

Installed as console scripts (`fiseclip-mvtec`, ...); `python -m eval.mvtec` and
`python -m weights.convert` in a checkout are thin entry points to the same code.
"""
