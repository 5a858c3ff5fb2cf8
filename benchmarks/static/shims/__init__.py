"""Stand-ins that make third-party Triton kernels loadable on a machine without a GPU (anchors.py)."""
