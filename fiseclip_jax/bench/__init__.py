"""The benchmark harness: the pipeline's own stages compiled and timed, FLOPs, MFU, memory, and
transformers' PyTorch tower beside them in the same run."""
