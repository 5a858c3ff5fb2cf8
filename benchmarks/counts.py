"""FLOPs and bytes of one case: the numerators of TFLOP/s, GB/s and the roofline fraction.

They are properties of the operation, not of a provider, so every provider of a case is divided
by the same numbers (a dense bf16 provider reads 2 B per weight, but is credited with the NF4
bytes of the op it stands in for; its GB/s is then a speed, not a traffic measurement).

Bytes are counted as Marlin's benchmark counts them: activations read + 0.5 B per weight + the
scales + outputs written, here plus the LoRA factors (fp32, as PEFT keeps them for QLoRA). Rank-r
intermediates and the fusion are not counted (r = 8..64 columns: under 2% of the activations).

FLOPs (S = 2 streams for FLARE, 1 for plain LoRA; M rows per stream; W [N, K]; rank r):
    fwd   base 2*S*M*N*K + down-projection 2*S*M*K*r + up-projection 2*M*r*N (target rows)
    bwd   dX = dY W: 2*M*N*K, dZ = dY B: 2*M*N*r, dX += dS A: 2*M*r*K,
          dA = dS^T X over both streams: 2*S*M*r*K, dB = dY^T Z: 2*M*N*r
    fwd+bwd  the sum
"""

from __future__ import annotations

from .config import Case

NESTED_BLOCKSIZE = 256


def nf4_bytes(n: int, k: int, blocksize: int = 64, nested: bool = True) -> int:
    """Bytes of an NF4 weight as bitsandbytes stores it: packed codes, absmax (+ nested scales), code maps."""
    values = n * k
    blocks = -(-values // blocksize)
    packed = -(-values // 2)
    if nested:
        scales = blocks + 4 * -(-blocks // NESTED_BLOCKSIZE) + 4 * 256 + 4  # uint8 codes, fp32 absmax, map, offset
    else:
        scales = 4 * blocks
    return packed + scales + 4 * 16


def flops(case: Case) -> float:
    s, m, n, k, r = (2 if case.two_stream else 1), case.m, case.shape.n, case.shape.k, case.r
    fwd = 2 * s * m * n * k + 2 * s * m * k * r + 2 * m * r * n
    bwd = 2 * m * n * k + 2 * m * n * r + 2 * m * r * k + 2 * s * m * r * k + 2 * m * n * r
    return float({"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[case.mode])


def bytes_moved(case: Case, act_bytes: int = 2, adapter_bytes: int = 4) -> float:
    s, m, n, k, r = (2 if case.two_stream else 1), case.m, case.shape.n, case.shape.k, case.r
    weight = nf4_bytes(n, k)
    lora = (r * k + n * r) * adapter_bytes
    fwd = s * m * k * act_bytes + weight + lora + s * m * n * act_bytes
    # dY read, W + scales, both streams' X for dA, dX written, A and B read, dA and dB written.
    bwd = m * n * act_bytes + weight + s * m * k * act_bytes + m * k * act_bytes + 2 * lora
    return float({"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[case.mode])


def roofline_ms(case: Case, peak_tflops: float, peak_gbps: float) -> float:
    """Lower bound on the time of a case: the slower of its FLOPs at the GEMM rate and its bytes at copy bandwidth."""
    return max(flops(case) / (peak_tflops * 1e12), bytes_moved(case) / (peak_gbps * 1e9)) * 1e3
