"""Forward + backward of repa_loss, urepa_loss and manifold_loss on every backend,
torch.compile of the torch backend and the SimpleTuner baselines (`simpletuner`,
`simpletuner.compile`), one benchmark per (case, row), grouped by case.
No timing assertions: the numbers are the product. Peak memory and the GEMM floor go into
each benchmark's extra_info (in --benchmark-json)."""
from repa_fast.cli.bench import peak_memory_bytes
from repa_fast.cli.bench_cases import make_workload, synchronize


def test_fwd_bwd(benchmark, case, backend, bench_device, bench_dtype):
    workload = make_workload(case, backend, bench_device, bench_dtype)  # torch.compile compiles here
    benchmark.group = f"{case.name} ({case.shape})"
    benchmark.extra_info.update(op=case.op, shape=case.shape, backend=backend, dtype=str(bench_dtype),
                                gemm_gflop=case.gemm_flops() / 1e9, compile_s=workload.compile_s,
                                peak_mib=peak_memory_bytes(workload, bench_device) / 2 ** 20)

    def step():
        workload.step()
        synchronize(bench_device)

    benchmark(step)
