"""Bandwidth of each KV transport beside a plain in-process copy of the same size.

Lifecycle: builds a pair of transports per kind in this process (each side on
its own threads, gloo as two independent two-rank groups), warms the pair up
(handshake, first-touch of buffers), then times whole single-layer block-set
transfers from `send` until the receiver holds the data, for sizes from 1 MiB
to 1 GiB by powers of 4. Prints GiB/s and the ratio to `tensor.copy_`.

    python scripts/bench_kv_transport.py                       # tcp, gloo (and nccl with 2 GPUs)
    python scripts/bench_kv_transport.py --kinds tcp --max-mib 64
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from pdserve.kv_transfer import EndpointRegistry, KVLayout, TransferState, TransportConfig, make_transport
from pdserve.kv_transfer.loopback import LoopbackFabric

GIB = float(1 << 30)
MIB = 1 << 20
# 32 KiB blocks (K and V, 16 tokens, 8 heads of 64, bfloat16): a Llama-8B-like block on one rank.
LAYOUT = KVLayout(model="bench", dtype="bfloat16", block_size=16, num_layers=1, num_kv_heads=8, head_dim=64)
BLOCK_BYTES = 2 * 16 * 8 * 64 * 2


def reps_for(nbytes: int, budget_bytes: int) -> int:
    """Enough repetitions to move about `budget_bytes`, between 2 and 30."""
    return max(2, min(30, budget_bytes // nbytes))


def time_copy(nbytes: int, reps: int, device: torch.device) -> float:
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.zeros_like(src)
    dst.copy_(src)
    return _median_rate(nbytes, reps, lambda: dst.copy_(src), device)


def _median_rate(nbytes: int, reps: int, fn: Callable[[], object], device: torch.device) -> float:
    rates = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rates.append(nbytes / (time.perf_counter() - start) / GIB)
    return statistics.median(rates)


class PairBench:
    """One sender/receiver pair of a kind, reused across sizes."""

    def __init__(self, kind: str) -> None:
        registry, fabric = EndpointRegistry(), LoopbackFabric()
        config = TransportConfig(transfer_timeout_s=120)
        self.tx_side = make_transport(kind, "bench-prefill", LAYOUT, registry, config, fabric=fabric, device=0)
        self.rx_side = make_transport(kind, "bench-decode", LAYOUT, registry, config, fabric=fabric, device=1)
        self.tx_side.start()
        self.rx_side.start()
        self._count = 0
        self.device = getattr(self.tx_side, "device", torch.device("cpu"))

    def transfer(self, src: torch.Tensor, out: torch.Tensor) -> None:
        self._count += 1
        tid = f"bench-{self._count}"
        blocks = list(range(src.shape[0]))
        rx = self.rx_side.open_receiver(tid, blocks)
        rx.recv_into(0, out)
        tx = self.tx_side.open_sender("bench-decode", tid, blocks)
        tx.send(0, src)
        if rx.wait(120) is not TransferState.DONE or tx.wait(120) is not TransferState.DONE:
            raise RuntimeError(f"{tid} ended {rx.poll()}/{tx.poll()}: {rx.error or tx.error}")

    def rate(self, nbytes: int, reps: int) -> float:
        shape = LAYOUT.block_set_shape(nbytes // BLOCK_BYTES)
        src = torch.ones(shape, dtype=torch.bfloat16, device=self.device)
        out = torch.zeros(shape, dtype=torch.bfloat16, device=torch.device(self.rx_side.device))
        self.transfer(src, out)  # warm-up: first touch of `out`, handshake on the first size
        rates = []
        for _ in range(reps):
            start = time.perf_counter()
            self.transfer(src, out)
            rates.append(nbytes / (time.perf_counter() - start) / GIB)
        if not torch.equal(src.cpu(), out.cpu()):
            raise RuntimeError("payload corrupted in flight")
        return statistics.median(rates)

    def close(self) -> None:
        self.tx_side.close()
        self.rx_side.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_kinds = ["tcp", "gloo"] + (["nccl"] if torch.cuda.device_count() >= 2 else [])
    parser.add_argument("--kinds", nargs="+", default=default_kinds, help="transports to measure")
    parser.add_argument("--max-mib", type=int, default=1024, help="largest message (MiB); sizes are 1, 4, 16, ...")
    parser.add_argument("--budget-mib", type=int, default=512, help="about how much to move per size and transport")
    args = parser.parse_args()
    sizes = [MIB << (2 * i) for i in range(6) if (1 << (2 * i)) <= args.max_mib]
    # One intra-op thread: on a loaded 2-core host a 2-thread copy_ waits for the
    # scheduler and measures wake-ups, not memory (0.1 GiB/s at 1 MiB).
    torch.set_num_threads(1)
    pairs = {kind: PairBench(kind) for kind in args.kinds}
    print(f"torch {torch.__version__}, 1 intra-op thread, median of repetitions, "
          f"~{args.budget_mib} MiB moved per size (2-30 reps)")
    header = f"{'size':>9} | {'copy_ GiB/s':>11}" + "".join(f" | {kind + ' GiB/s':>11} {'ratio':>6}" for kind in pairs)
    print(header)
    print("-" * len(header))
    try:
        for nbytes in sizes:
            reps = reps_for(nbytes, args.budget_mib * MIB)
            copy_rate = time_copy(nbytes, reps, torch.device("cpu"))
            row = f"{nbytes // MIB:>5} MiB | {copy_rate:>11.2f}"
            for pair in pairs.values():
                rate = pair.rate(nbytes, reps)
                row += f" | {rate:>11.2f} {rate / copy_rate:>6.2f}"
            print(row, flush=True)
    finally:
        for pair in pairs.values():
            pair.close()


if __name__ == "__main__":
    main()
