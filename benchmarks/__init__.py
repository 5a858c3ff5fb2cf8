"""Benchmarks: flare-kernels side by side with what users run today.

Layers (each imports only those before it):
    config      shapes, cases and presets (dataclasses)
    env         device, versions, commit, load: the environment JSON and the results folder
    counts      FLOPs and bytes of one case (the same numerator for every provider)
    timing      timers (CUDA events / CUDA graphs, a CPU wall-clock timer) and peak memory
    providers   one builder per implementation: ours, the reference, bitsandbytes + PEFT, ...
    roofline    the device's copy bandwidth and bf16 GEMM rate, measured in the same run
    results     the one CSV schema, written row by row (resumable)
    ops, e2e    the two suites
    plots, summary, run    PNGs, the README table, the one command (``python -m benchmarks.run``)
"""
