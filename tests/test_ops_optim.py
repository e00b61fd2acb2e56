"""mpilocal.optim over DTensors against PyTorch's documented update rules in NumPy on the full
arrays; a step's state keeps the parameters' placements."""

import numpy as np
import pytest
from conftest import assert_all, make_mesh, to_device, to_host
from mpi4py import MPI

import mpilocal
from mpilocal import Replicate, Shard, distribute_tensor

R, S0, S1 = Replicate(), Shard(0), Shard(1)


def ref_steps(opt, w, x, y, steps, **kw):
    w = w.copy()
    st = {}
    for t in range(1, steps + 1):
        g = 2 * x.T @ (x @ w - y) / y.size
        if opt == "sgd":
            g = g + kw.get("weight_decay", 0) * w
            if kw.get("momentum"):
                st["b"] = g.copy() if "b" not in st else kw["momentum"] * st["b"] + g
                g = g + kw["momentum"] * st["b"] if kw.get("nesterov") else st["b"]
            w = w - kw["lr"] * g
        else:
            b1, b2 = 0.9, 0.999
            st["m"] = (1 - b1) * g + b1 * st.get("m", 0)
            st["v"] = (1 - b2) * g * g + b2 * st.get("v", 0)
            mh, vh = st["m"] / (1 - b1 ** t), st["v"] / (1 - b2 ** t)
            w = w - kw["lr"] * mh / (np.sqrt(vh) + 1e-8)
    return w


@pytest.mark.parametrize("kind", ["1d", "2x2"])
@pytest.mark.parametrize("opt,kw", [("sgd", dict(lr=0.1)), ("sgd", dict(lr=0.05, momentum=0.9)),
                                    ("sgd", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
                                    ("adam", dict(lr=0.01))])
def test_optimizers_match_reference(kind, opt, kw):
    mesh = make_mesh(kind)
    if mesh is None:
        pytest.skip("mesh does not fit")
    rng = np.random.default_rng(0)
    x, y, w0 = rng.standard_normal((9, 6)), rng.standard_normal((9, 4)), rng.standard_normal((6, 4))
    want = ref_steps(opt, w0, x, y, 3, **kw)
    probs = []
    wpls = [(S1,) * mesh.ndim, (R,) * mesh.ndim] if mesh.ndim == 1 else [(R, S1), (S0, R)]
    for wpl in wpls:
        X = distribute_tensor(to_device(x), mesh, (S0,) + (R,) * (mesh.ndim - 1))
        Y = distribute_tensor(to_device(y), mesh, (S0,) + (R,) * (mesh.ndim - 1))
        Wt = distribute_tensor(to_device(w0), mesh, wpl, requires_grad=True)
        o = mpilocal.optim.SGD([Wt], **kw) if opt == "sgd" else mpilocal.optim.Adam([Wt], **kw)
        for _ in range(3):
            o.zero_grad()
            loss = ((X @ Wt - Y) ** 2).mean()
            loss.backward()
            o.step()
        got = to_host(Wt.detach().full_tensor())
        states = [v for v in o.state[id(Wt)].values() if hasattr(v, "placements")]
        if not np.allclose(got, want, atol=1e-10) or any(s.placements != Wt.placements for s in states):
            probs.append(f"{wpl}: {got.ravel()[:3]} vs {want.ravel()[:3]}, {[s.placements for s in states]}")
    assert_all(not probs, "; ".join(probs))
