"""Time LoopLM forward (no grad) and forward+backward on CPU, one thread; prints ms per call (best of 7).

To compare two versions, run it with PYTHONPATH pointing at each checkout in turn.
"""
import sys, time, torch
torch.set_num_threads(1)
import looplm
torch.manual_seed(0)
cfg = looplm.LoopLMConfig(vocab_size=32, d_model=64, n_heads=4, n_prelude=1, n_core=2, n_coda=1, n_loops=4,
                          max_seq_len=64, exit_gate=True)
model = looplm.LoopLM(cfg)
dev = sys.argv[1] if len(sys.argv) > 1 else "cpu"
model.to(dev)
for B, T in [(1, 8), (16, 32)]:
    idx = torch.randint(0, 32, (B, T), device=dev)
    def fwd():
        with torch.no_grad():
            model(idx)
    def fb():
        model(idx, targets=idx).loss.backward()
    for name, fn in [("forward", fwd), ("fwd+bwd", fb)]:
        for _ in range(5): fn()
        best = float("inf")
        for _ in range(7):
            if dev == "cuda": torch.cuda.synchronize()
            t = time.perf_counter(); n = 30
            for _ in range(n): fn()
            if dev == "cuda": torch.cuda.synchronize()
            best = min(best, (time.perf_counter() - t) / n)
        print(f"B={B:2d} T={T:2d} {name:8s} {best*1e3:.3f} ms")
