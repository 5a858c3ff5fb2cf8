"""Static analysis of the Triton kernels: ahead-of-time compiles for GPUs this machine may not have."""
