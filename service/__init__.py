"""saliency-service: a REST microservice that explains what an image classifier looked at."""

import os

# Intel MKL (torch's CPU BLAS) picks its code path by the memory alignment of each operand, so
# two identical calls could differ in the last bits (measured: the input gradient of an SE
# block's 1×1 convolution on mobilenet_v3_small, in a few calls per hundred). Strict conditional numerical
# reproducibility makes same input + same seed give bit-identical maps in one process. MKL reads
# the variable at its first call, so this must run before any computation; an operator's own
# setting wins.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

__version__ = "0.1.0"
