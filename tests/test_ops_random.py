"""Creation functions and counter-based random DTensors: Philox4x32-10 known answers, values
independent of mesh, placements and rank count (against a single-process evaluation of the
generator on the global indices), seed agreement."""

import itertools

import numpy as np
import pytest
from conftest import RANK, W, DEVICE, assert_all, make_mesh, to_host

import mpilocal
from mpilocal import Partial, Replicate, Shard
from mpilocal.ops.random import philox4x32, random_values

R, S0, S1 = Replicate(), Shard(0), Shard(1)


def test_philox_known_answers():
    """Random123's kat_vectors for philox4x32-10."""
    kat = [((0, 0, 0, 0, 0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
           ((0xFFFFFFFF,) * 6, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
           ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344, 0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    got = [tuple(int(v) for v in philox4x32(*args)) for args, _ in kat]
    assert_all(got == [want for _, want in kat], f"{got}")


def reference(kind, shape, seed, call, dtype):
    return random_values(kind, np.arange(int(np.prod(shape)), dtype=np.uint64).reshape(shape), seed, call, dtype)


@pytest.mark.parametrize("kind", ["1d", "1xN", "Nx1", "2x2"])
@pytest.mark.parametrize("shape", [(7, 5), (4, 6), (3,), (0, 4)])
def test_random_is_layout_independent(kind, shape):
    mesh = make_mesh(kind)
    if mesh is None:
        pytest.skip("mesh does not fit")
    opts = [R] + [Shard(d) for d in range(len(shape))]
    probs = []
    for pl in itertools.product(opts, repeat=mesh.ndim):
        for fn, dtype in (("rand", np.float32), ("rand", np.float64), ("randn", np.float64), ("randn", np.float32)):
            mpilocal.manual_seed(1234)
            mpilocal.rand(2, 2, device_mesh=mesh)  # call 0: the tested call is number 1
            x = getattr(mpilocal, fn)(*shape, dtype=dtype, device_mesh=mesh, placements=pl)
            got = to_host(x.full_tensor())
            want = reference(fn, shape, 1234, 1, dtype)
            if x.placements != pl or got.dtype != np.dtype(dtype) or not np.allclose(got, want, rtol=1e-6, atol=1e-6):
                probs.append(f"{fn} {dtype.__name__} {pl}: {got.ravel()[:3]} vs {want.ravel()[:3]}")
            if fn == "rand" and dtype is np.float64 and DEVICE == "cpu" and not np.array_equal(got, want):
                probs.append(f"rand float64 {pl} not bit-identical")
    assert_all(not probs, "; ".join(probs[:4]))


def test_random_ragged_and_partial():
    mesh = make_mesh("1d")
    sizes = tuple([3] + [1] * (W - 1)) if W > 1 else (4,)
    n = sum(sizes)
    mpilocal.manual_seed(7)
    x = mpilocal.randn(n, 2, dtype=np.float64, device_mesh=mesh, placements=[Shard(0, sizes=sizes)])
    mpilocal.manual_seed(7)
    p = mpilocal.randn(n, 2, dtype=np.float64, device_mesh=mesh, placements=[Partial()])
    want = reference("randn", (n, 2), 7, 0, np.float64)
    ok = np.allclose(to_host(x.full_tensor()), want) and np.allclose(to_host(p.full_tensor()), want)
    assert_all(ok)


def test_random_sequence_and_statistics():
    mesh = make_mesh("1d")
    mpilocal.manual_seed(0)
    a = to_host(mpilocal.rand(100000, dtype=np.float64, device_mesh=mesh, placements=[S0]).full_tensor())
    b = to_host(mpilocal.rand(100000, dtype=np.float64, device_mesh=mesh, placements=[S0]).full_tensor())
    z = to_host(mpilocal.randn(100000, dtype=np.float64, device_mesh=mesh, placements=[S0]).full_tensor())
    ok = (not np.array_equal(a, b) and 0 <= a.min() and a.max() < 1 and abs(a.mean() - 0.5) < 0.01
          and abs(z.mean()) < 0.02 and abs(z.std() - 1) < 0.02 and abs(np.corrcoef(a, b)[0, 1]) < 0.02)
    assert_all(ok, f"{a.mean()} {z.mean()} {z.std()}")


def test_creation_functions():
    mesh = make_mesh("1d")
    z = mpilocal.zeros(5, 3, device_mesh=mesh, placements=[S0])
    o = mpilocal.ones((5, 3), dtype=np.float64, device_mesh=mesh, placements=[S1], requires_grad=True)
    f = mpilocal.full((4,), 2.5, device_mesh=mesh, placements=[Partial()])
    e = mpilocal.empty(2, 3, device_mesh=mesh)
    ok = (z.shape == (5, 3) and z.dtype == np.float32 and np.array_equal(to_host(z.full_tensor()), np.zeros((5, 3)))
          and o.requires_grad and o.placements == (S1,) and
          np.array_equal(to_host(o.detach().full_tensor()), np.ones((5, 3)))
          and np.array_equal(to_host(f.full_tensor()), np.full(4, 2.5, np.float32)) and e.shape == (2, 3))
    assert_all(ok)


def test_manual_seed_must_agree():
    msg = ""
    try:
        mpilocal.manual_seed(RANK if W > 1 else -1)
        msg = "no exception"
    except (ValueError, TypeError) as e:
        msg = "" if ("different seeds" in str(e) or "seed must be" in str(e)) else str(e)
    assert_all(not msg, msg)
