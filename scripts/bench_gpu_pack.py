"""Pack one column block of a C-contiguous (rows, cols) float32 CuPy array: cudaMemcpy2DAsync vs an
elementwise strided copy, GB/s of bytes moved. python3 scripts/bench_gpu_pack.py"""
import time
import cupy as cp
rt = cp.cuda.runtime
def bench(f, n=20):
    f(); cp.cuda.get_current_stream().synchronize()
    best = 1e9
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n): f()
        cp.cuda.get_current_stream().synchronize()
        best = min(best, (time.perf_counter() - t) / n)
    return best
print("| total MiB | cols | piece width B | memcpy2D GB/s (us) | elementwise GB/s (us) |")
print("|---:|---:|---:|---:|---:|")
for mib in (0.004, 1, 4, 16, 64, 256):
    for cols in (32, 128, 1024, 8192):
        n = int(mib * 2**20 / 4)
        rows = max(1, n // cols)
        x = cp.ones((rows, cols), cp.float32)
        half = cols // 2
        out = cp.empty(rows * half, cp.float32)
        w = half * 4
        s = cp.cuda.get_current_stream().ptr
        f1 = lambda: rt.memcpy2DAsync(out.data.ptr, w, x.data.ptr + w, cols * 4, w, rows, rt.memcpyDeviceToDevice, s)
        o2 = out.reshape(rows, half)
        f2 = lambda: o2.__setitem__(Ellipsis, x[:, half:])
        t1, t2 = bench(f1), bench(f2)
        b = rows * w
        print(f"| {mib} | {cols} | {w} | {b / t1 / 1e9:.0f} ({t1 * 1e6:.1f}) | {b / t2 / 1e9:.0f} ({t2 * 1e6:.1f}) |")
