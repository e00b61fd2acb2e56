"""mpilocal.autograd: gradients through local_map, redistribute, from_local/to_local, full_tensor and
the functional collectives, checked against finite differences (float64) and NumPy references.

Run: ``mpiexec -n N python -m pytest --with-mpi tests/test_autograd.py`` for N = 1, 2, 3, 4, and with
``MPILOCAL_TEST_DEVICE=cuda`` on a GPU machine (CuPy shards; at 2 ranks).

* ``test_local_map_with_grad_placement``: port of PyTorch's test of the same name
  (``test/distributed/tensor/experimental/test_local_map.py``): X (4x2), W (2x4),
  ``in_grad_placements=([Shard(0)], [Partial()])``, X given as Shard(0) and as Replicate().
  PyTorch runs it at 2 ranks; here at every world size (3 ranks: X's rows split 2, 2, 0).
* every supported local operation (operators, methods, the tracked array namespace, NumPy's
  ufunc/function protocols) and every differentiable collective against central differences, the
  collectives on meshes of 1, 2 and 4 ranks (and of the world size);
* redistribute between placement pairs (1-D and 2-D meshes), full_tensor, from_local/to_local;
* a data-parallel + tensor-parallel two-layer MLP against a NumPy single-process reference;
* the API contract: accumulation and reset, detach, errors for unsupported operations,
  ``mpilocal.autograd.Function``, and that without grad nothing is tracked.
"""

import numpy as np
import pytest
from conftest import DEVICE, RANK, W, WORLD, assert_all, assert_close_all, debug_mode, raises_all, xp

import mpilocal.functional as funcol
from mpilocal import (
    CommDebugMode,
    DeviceMesh,
    DTensor,
    Partial,
    Replicate,
    Shard,
    distribute_tensor,
    init_device_mesh,
    local_map,
)
from mpilocal.autograd import Function, Tracked, tensor

pytestmark = pytest.mark.mpi


MESH_SIZES = sorted({k for k in (1, 2, 4) if k <= W} | {W})


def host(a):
    if isinstance(a, Tracked):
        a = a.data
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)


def rand(seed, *shape, positive=False):
    a = np.random.default_rng(seed).standard_normal(shape)
    if positive:
        a = 0.5 + np.abs(a)
    return xp.asarray(a)


def sub_mesh(k):
    """A 1-D mesh over world ranks 0..k-1 (collective over them; None on the other ranks)."""
    mesh = DeviceMesh(DEVICE, np.arange(k))
    return mesh if mesh.get_coordinate() is not None else None


# ------------------------------------------------------------------------------------------------
# finite differences
# ------------------------------------------------------------------------------------------------
H = 1e-6


def _bump(a, e, d):
    v = a.reshape(-1)
    v[e] += d


def objective(out, c):
    return float(host((out * c).sum()))


def analytic(f, arrays, c, comm=None):
    ts = [tensor(a.copy(), requires_grad=True) for a in arrays]
    out = f(*ts)
    assert_all(isinstance(out, Tracked), f"result is {type(out).__name__}, not Tracked", comm)
    (out * c).sum().backward()
    return out, [t.grad for t in ts]


def numeric_local(f, arrays, c):
    grads = []
    for a in arrays:
        g = np.zeros(a.shape)
        for e in range(a.size):
            _bump(a, e, H)
            fp = objective(f(*arrays), c)
            _bump(a, e, -2 * H)
            fm = objective(f(*arrays), c)
            _bump(a, e, H)
            g.reshape(-1)[e] = (fp - fm) / (2 * H)
        grads.append(g)
    return grads


def numeric_group(f, arrays, c, comm):
    """Central differences of sum over the group's ranks of <f(arrays), c> (f is collective)."""
    me = comm.Get_rank()
    grads = []
    for a in arrays:
        g = np.zeros(a.shape)
        for q in range(comm.Get_size()):
            n = comm.bcast(a.size, root=q)
            for e in range(n):
                vals = []
                for d in (H, -H):
                    if me == q:
                        _bump(a, e, d)
                    vals.append(comm.allreduce(objective(f(*arrays), c)))
                    if me == q:
                        _bump(a, e, -d)
                if me == q:
                    g.reshape(-1)[e] = (vals[0] - vals[1]) / (2 * H)
        grads.append(g)
    return grads


def check_grads(got, want, comm=None, what=""):
    for i, (g, w) in enumerate(zip(got, want)):
        assert_all(g is not None, f"{what}: input {i} got no gradient", comm)
        assert_close_all(host(g), w, comm, rtol=1e-5, atol=1e-7, err_msg=f"{what}: input {i}")


# ------------------------------------------------------------------------------------------------
# 1. PyTorch's test_local_map_with_grad_placement
# ------------------------------------------------------------------------------------------------
def test_local_map_with_grad_placement():
    mesh = init_device_mesh(DEVICE, (W,))
    rng = np.random.default_rng(12)
    X = rng.standard_normal((4, 2))
    Wt = rng.standard_normal((2, 4))
    # ground truth: X as a batch of 2 on dim 0; loss = Y1.sum() + Y2.sum()
    x_grad = np.ones((4, 4)) @ Wt.T
    w_grad = X.T @ np.ones((4, 4))
    y_ref = X @ Wt

    for is_in_placement_mismatch in (False, True):
        X_dt = distribute_tensor(xp.asarray(X), mesh, [Replicate()] if is_in_placement_mismatch else [Shard(0)],
                                 requires_grad=True)
        W_dt = distribute_tensor(xp.asarray(Wt), mesh, [Replicate()], requires_grad=True)
        in_grad_placements = ([Shard(0)], [Partial()])
        local_mm_forward = local_map(
            lambda a, b: a @ b,
            out_placements=[Shard(0)],
            in_placements=([Shard(0)], [Replicate()]),
            in_grad_placements=in_grad_placements,
            device_mesh=mesh,
            redistribute_inputs=True,
        )
        Y_dt = local_mm_forward(X_dt, W_dt)
        assert_close_all(host(Y_dt.full_tensor()), y_ref)
        # DDP-style: each rank's local loss; no all_gather of the loss
        loss = Y_dt.to_local().sum()
        loss.backward()
        if not is_in_placement_mismatch:
            assert_all(X_dt.grad.placements == tuple(in_grad_placements[0]), f"{X_dt.grad.placements}")
            assert_all(W_dt.grad.placements == tuple(in_grad_placements[1]), f"{W_dt.grad.placements}")
        else:  # X was redistributed Replicate -> Shard(0): its grad goes back to Replicate
            assert_all(X_dt.grad.placements == (Replicate(),), f"{X_dt.grad.placements}")
        assert_close_all(host(X_dt.grad.full_tensor()), x_grad)
        assert_close_all(host(W_dt.grad.full_tensor()), w_grad)


def test_local_map_grad_placements_default_are_forward_placements():
    mesh = init_device_mesh(DEVICE, (W,))
    x, w = rand(1, 5, 3), rand(2, 3, 4)
    X = distribute_tensor(x, mesh, [Shard(0)], requires_grad=True)
    Wd = distribute_tensor(w, mesh, [Replicate()])  # no grad: a constant
    f = local_map(lambda a, b: (a @ b).__array_namespace__().tanh(a @ b),
                  out_placements=[Shard(0)], in_placements=([Shard(0)], [Replicate()]))
    Y = f(X, Wd)
    assert_all(Y.requires_grad and not Y.is_leaf and Y.grad_fn is not None)
    Y.backward()  # ones with Y's placements
    assert_all(X.grad.placements == (Shard(0),), f"{X.grad.placements}")
    assert_all(Wd.grad is None and not Wd.requires_grad)
    ref = (1 - np.tanh(host(x) @ host(w)) ** 2) @ host(w).T
    assert_close_all(host(X.grad.full_tensor()), ref)


# ------------------------------------------------------------------------------------------------
# 2. local operations against finite differences
# ------------------------------------------------------------------------------------------------
class _RawNS:
    """The array-API names used below, for plain NumPy/CuPy arrays (finite differences)."""

    def __getattr__(self, name):
        alias = {"concat": "concatenate", "permute_dims": "transpose", "pow": "power"}
        if name == "matrix_transpose":
            return lambda a: xp.swapaxes(a, -1, -2)
        return getattr(xp, alias.get(name, name))


def ns(a):
    return a.__array_namespace__() if type(a) is Tracked else _RawNS()


MASK = np.array([[True, False, True, True], [False, False, True, False], [True, True, False, True]])
CONST34 = np.random.default_rng(99).standard_normal((3, 4))

# name -> (f, input shapes, positive inputs?)
LOCAL_OPS = {
    "add_broadcast": (lambda a, b: a + b, [(3, 4), (4,)], False),
    "radd_scalar": (lambda a: 2.0 + a, [(3, 4)], False),
    "sub_broadcast": (lambda a, b: a - b, [(3, 4), (3, 1)], False),
    "rsub_scalar": (lambda a: 1.5 - a, [(3, 4)], False),
    "mul_broadcast": (lambda a, b: a * b, [(2, 3, 4), (3, 4)], False),
    "rmul_scalar": (lambda a: 3.0 * a, [(3, 4)], False),
    "div": (lambda a, b: a / b, [(3, 4), (3, 4)], True),
    "rdiv_scalar": (lambda a: 2.0 / a, [(3, 4)], True),
    "pow_scalar": (lambda a: a ** 3, [(3, 4)], False),
    "pow_tensor": (lambda a, b: a ** b, [(3, 4), (3, 4)], True),
    "rpow_scalar": (lambda a: 2.0 ** a, [(3, 4)], False),
    "neg": (lambda a: -a, [(3, 4)], False),
    "getitem_slice": (lambda a: a[1:, ::2], [(3, 4)], False),
    "getitem_int": (lambda a: a[1], [(3, 4)], False),
    "getitem_int_array_dup": (lambda a: a[xp.asarray([0, 2, 0])], [(3, 4)], False),
    "getitem_adv_tuple": (lambda a: a[:, [1, 1, 3]], [(3, 4)], False),
    "getitem_mask": (lambda a: a[xp.asarray(MASK)], [(3, 4)], False),
    "getitem_newaxis_ellipsis": (lambda a: a[None, ..., 1:3], [(3, 4)], False),
    "T": (lambda a: a.T, [(3, 4)], False),
    "sum_all": (lambda a: a.sum(), [(3, 4)], False),
    "sum_axis0": (lambda a: a.sum(axis=0), [(3, 4)], False),
    "sum_axis_neg_keepdims": (lambda a: a.sum(axis=-1, keepdims=True), [(3, 4)], False),
    "sum_axes_tuple": (lambda a: a.sum(axis=(0, 2)), [(2, 3, 4)], False),
    "mean_all": (lambda a: a.mean(), [(3, 4)], False),
    "mean_axis1": (lambda a: a.mean(axis=1), [(3, 4)], False),
    "reshape_args": (lambda a: a.reshape(4, 3), [(3, 4)], False),
    "reshape_tuple_neg": (lambda a: a.reshape((2, -1)), [(3, 4)], False),
    "transpose_axes": (lambda a: a.transpose(1, 0, 2), [(2, 3, 4)], False),
    "transpose_tuple": (lambda a: a.transpose((2, 0, 1)), [(2, 3, 4)], False),
    "transpose_none": (lambda a: a.transpose(), [(2, 3, 4)], False),
    "astype": (lambda a: a.astype(xp.float64), [(3, 4)], False),
    "matmul_2d": (lambda a, b: a @ b, [(3, 4), (4, 2)], False),
    "matmul_1d_left": (lambda a, b: a @ b, [(4,), (4, 2)], False),
    "matmul_1d_right": (lambda a, b: a @ b, [(3, 4), (4,)], False),
    "matmul_1d_1d": (lambda a, b: a @ b, [(4,), (4,)], False),
    "matmul_batched_broadcast": (lambda a, b: a @ b, [(2, 3, 4), (4, 5)], False),
    "matmul_batched_both": (lambda a, b: a @ b, [(2, 3, 4), (1, 4, 2)], False),
    "matmul_1d_batched": (lambda a, b: a @ b, [(4,), (2, 4, 3)], False),
    "rmatmul_const": (lambda a: xp.asarray(CONST34) @ a if type(a) is not Tracked else a.__rmatmul__(xp.asarray(CONST34)),
                      [(4, 2)], False),
    # the tracked array namespace (x.__array_namespace__())
    "ns_matmul": (lambda a, b: ns(a).matmul(a, b), [(3, 4), (4, 2)], False),
    "ns_exp": (lambda a: ns(a).exp(a), [(3, 4)], False),
    "ns_log": (lambda a: ns(a).log(a), [(3, 4)], True),
    "ns_tanh": (lambda a: ns(a).tanh(a), [(3, 4)], False),
    "ns_maximum": (lambda a, b: ns(a).maximum(a, b), [(3, 4), (4,)], False),
    "ns_maximum_scalar": (lambda a: ns(a).maximum(a, 0.1), [(3, 4)], False),
    "ns_where": (lambda a, b: ns(a).where(a > 0, a, b), [(3, 4), (3, 4)], False),
    "ns_where_scalar": (lambda a: ns(a).where(a > 0, a, 0.0), [(3, 4)], False),
    "ns_sum_axis": (lambda a: ns(a).sum(a, axis=1), [(3, 4)], False),
    "ns_mean_axis": (lambda a: ns(a).mean(a, axis=0, keepdims=True), [(3, 4)], False),
    "ns_concat0": (lambda a, b: ns(a).concat([a, b], axis=0), [(2, 4), (3, 4)], False),
    "ns_concat1": (lambda a, b: ns(a).concat((a, b), axis=1), [(3, 2), (3, 4)], False),
    "ns_stack1": (lambda a, b: ns(a).stack([a, b], axis=1), [(3, 4), (3, 4)], False),
    "ns_add_sub_mul_div": (lambda a, b: ns(a).divide(ns(a).multiply(ns(a).add(a, b), ns(a).subtract(a, b)), b),
                           [(3, 4), (3, 4)], True),
    "ns_negative_pow": (lambda a: ns(a).pow(ns(a).negative(a), 2), [(3, 4)], False),
    "ns_reshape_permute": (lambda a: ns(a).permute_dims(ns(a).reshape(a, (4, 3)), (1, 0)), [(3, 4)], False),
    "ns_matrix_transpose": (lambda a: ns(a).matrix_transpose(a), [(2, 3, 4)], False),
    "ns_mixed_constant": (lambda a: ns(a).exp(a) * ns(a).ones_like(a) + ns(a).zeros((3, 4)), [(3, 4)], False),
    # a composite: one hidden layer and a squared loss
    "mlp_composite": (lambda x, w, b: ((ns(x).tanh(x @ w + b) - 0.5) ** 2).mean(axis=0), [(5, 3), (3, 4), (4,)],
                      False),
}

NUMPY_PROTOCOL_OPS = {  # NumPy functions on Tracked (NumPy shards only)
    "np_exp": (lambda a: np.exp(a), [(3, 4)], False),
    "np_log": (lambda a: np.log(a), [(3, 4)], True),
    "np_tanh": (lambda a: np.tanh(a), [(3, 4)], False),
    "np_matmul": (lambda a, b: np.matmul(a, b), [(3, 4), (4, 2)], False),
    "np_maximum": (lambda a, b: np.maximum(a, b), [(3, 4), (3, 4)], False),
    "np_where": (lambda a, b: np.where(a > 0, a, b), [(3, 4), (3, 4)], False),
    "np_sum": (lambda a: np.sum(a, axis=0), [(3, 4)], False),
    "np_mean": (lambda a: np.mean(a), [(3, 4)], False),
    "np_concatenate": (lambda a, b: np.concatenate([a, b], axis=1), [(3, 2), (3, 4)], False),
    "np_stack": (lambda a, b: np.stack([a, b]), [(3, 4), (3, 4)], False),
    "np_reshape_transpose": (lambda a: np.transpose(np.reshape(a, (4, 3))), [(3, 4)], False),
    "ndarray_ops_tracked": (lambda a: CONST34 + a * CONST34 - CONST34 / (1 + a * a), [(3, 4)], False),
    "ndarray_matmul_tracked": (lambda a: CONST34 @ a, [(4, 2)], False),
}


def _run_local(name, f, shapes, positive):
    seed = 1000 * (1 + RANK) + sum(map(ord, name))
    arrays = [rand(seed + i, *s, positive=positive) for i, s in enumerate(shapes)]
    out, got = analytic(f, arrays, 1.0)
    c = rand(seed + 77, *out.shape)
    out, got = analytic(f, arrays, c)
    assert_close_all(host(out), host(f(*arrays)), err_msg=f"{name}: forward")
    check_grads(got, numeric_local(f, arrays, c), what=name)


@pytest.mark.parametrize("name", sorted(LOCAL_OPS))
def test_local_op_grad_finite_differences(name):
    _run_local(name, *LOCAL_OPS[name])


@pytest.mark.skipif(DEVICE != "cpu", reason="NumPy's function protocols apply to NumPy shards")
@pytest.mark.parametrize("name", sorted(NUMPY_PROTOCOL_OPS))
def test_numpy_protocol_grad_finite_differences(name):
    _run_local(name, *NUMPY_PROTOCOL_OPS[name])


def test_maximum_ties_split_gradient():
    a = tensor(xp.asarray([1.0, 2.0, 3.0]), requires_grad=True)
    b = tensor(xp.asarray([1.0, 0.0, 5.0]), requires_grad=True)
    a.__array_namespace__().maximum(a, b).sum().backward()
    assert_close_all(host(a.grad), [0.5, 1.0, 0.0])
    assert_close_all(host(b.grad), [0.5, 0.0, 1.0])


# ------------------------------------------------------------------------------------------------
# 3. collectives against finite differences, on meshes of 1, 2 and 4 ranks (and the world)
# ------------------------------------------------------------------------------------------------
def _coll_cases(k, r):
    """name -> (f(x) using group g, this rank's input shape)."""
    a2a_in = [(r + p) % 3 for p in range(k)]  # uneven explicit input splits; output sizes agreed
    return {
        "all_reduce_sum": (lambda x, g: funcol.all_reduce(x, "sum", g), (3, 2)),
        "all_reduce_avg": (lambda x, g: funcol.all_reduce(x, "avg", g), (3, 2)),
        "all_gather_dim0_uneven": (lambda x, g: funcol.all_gather_tensor(x, 0, g), (r + 1, 2)),
        "all_gather_dim1_uneven": (lambda x, g: funcol.all_gather_tensor(x, 1, g), (2, r % 2 + 1)),
        "reduce_scatter_sum_dim0": (lambda x, g: funcol.reduce_scatter_tensor(x, "sum", 0, g), (5, 2)),
        "reduce_scatter_avg_dim1": (lambda x, g: funcol.reduce_scatter_tensor(x, "avg", 1, g), (2, 5)),
        "all_to_all_equal": (lambda x, g: funcol.all_to_all_single(x, None, None, g), (2 * k, 3)),
        "all_to_all_uneven": (lambda x, g: funcol.all_to_all_single(x, None, a2a_in, g), (sum(a2a_in), 2)),
        "broadcast_first": (lambda x, g: funcol.broadcast(x, 0, g), (3, 2)),
        "broadcast_last": (lambda x, g: funcol.broadcast(x, k - 1, g), (3, 2)),
        "chain": (lambda x, g: funcol.reduce_scatter_tensor(
            funcol.all_gather_tensor(x * x, 0, g) ** 2 * 0.5, "sum", 1, g) + funcol.all_reduce(x, "sum", g)[:, :1].sum(),
            (2, 3)),
    }


COLL_NAMES = sorted(_coll_cases(1, 0))


@pytest.mark.parametrize("k", MESH_SIZES)
@pytest.mark.parametrize("name", COLL_NAMES)
def test_collective_grad_finite_differences(name, k):
    mesh = sub_mesh(k)
    if mesh is None:
        return
    comm = mesh.get_comm()
    r = mesh.get_local_rank()
    fn, shape = _coll_cases(k, r)[name]
    f = lambda x: fn(x, mesh)  # noqa: E731
    x = rand(10 * r + len(name), *shape)
    out, got = analytic(f, [x], 1.0, comm)
    c = rand(500 + r, *out.shape)
    out, got = analytic(f, [x], c, comm)
    assert_close_all(host(out), host(f(x)), comm, err_msg=f"{name}: forward")
    check_grads(got, numeric_group(f, [x], c, comm), comm, what=f"{name} on {k} rank(s)")


def test_collective_not_differentiable_ops_raise():
    mesh = init_device_mesh(DEVICE, (W,))
    x = tensor(rand(3, 2, 2), requires_grad=True)
    for op in ("max", "min", "product"):
        with pytest.raises(NotImplementedError, match=f"'{op}' is not differentiable"):
            funcol.all_reduce(x, op, mesh)


# ------------------------------------------------------------------------------------------------
# 4. DTensor level: redistribute, full_tensor, from_local / to_local, backward
# ------------------------------------------------------------------------------------------------
def mesh_2d():
    return init_device_mesh(DEVICE, (2, 2) if W == 4 else (W, 1), mesh_dim_names=("dp", "tp"))


def make_dtensor(x, mesh, pl, requires_grad=True):
    """The global array x with placements pl (Partial: rank 0 of each Partial dim holds it)."""
    if any(p.is_partial() for p in pl):
        plain = tuple(Replicate() if p.is_partial() else p for p in pl)
        local = distribute_tensor(x, mesh, plain).to_local()
        coord = mesh.get_coordinate()
        if any(p.is_partial() and coord[i] != 0 for i, p in enumerate(pl)):
            local = xp.zeros_like(local)
        t = DTensor.from_local(local, mesh, pl, shape=x.shape)
        return t.requires_grad_() if requires_grad else t
    return distribute_tensor(x, mesh, pl, requires_grad=requires_grad)


def _bw_placements(pl):
    return tuple(Replicate() if p.is_partial() else p for p in pl)


PL1 = {"S0": Shard(0), "S1": Shard(1), "R": Replicate(), "P": Partial()}


@pytest.mark.parametrize("src", ["S0", "S1", "R", "P"])
@pytest.mark.parametrize("dst", ["S0", "S1", "R", "P"])
def test_redistribute_grad_1d(src, dst):
    if dst == "P" and src != "P":
        pytest.skip("Partial targets are internal")
    mesh = init_device_mesh(DEVICE, (W,))
    x = rand(7, 5, 3)
    c = rand(8, 5, 3)
    src_pl, dst_pl = (PL1[src],), (PL1[dst],)

    def loss_of(xg, requires_grad):
        X = make_dtensor(xg, mesh, src_pl, requires_grad)
        full = X.redistribute(mesh, dst_pl).full_tensor()
        return X, (full * c).sum()

    X, loss = loss_of(x, True)
    loss.backward()
    assert_all(X.grad.placements == _bw_placements(src_pl), f"{X.grad.placements}")
    assert_close_all(host(X.grad.full_tensor()), host(c))
    # finite differences of the (replicated) loss in the global array
    num = np.zeros(x.shape)
    for e in range(x.size):
        vals = []
        for d in (H, -H):
            _bump(x, e, d)
            vals.append(float(host(loss_of(x, False)[1])))
            _bump(x, e, -d)
        num.reshape(-1)[e] = (vals[0] - vals[1]) / (2 * H)
    assert_close_all(host(X.grad.full_tensor()), num, rtol=1e-5, atol=1e-7)


PAIRS_2D = [
    ((Shard(0), Shard(1)), (Replicate(), Replicate())),
    ((Shard(0), Shard(1)), (Shard(1), Shard(0))),
    ((Shard(0), Shard(0)), (Replicate(), Shard(1))),
    ((Replicate(), Partial()), (Shard(0), Replicate())),
    ((Partial(), Shard(1)), (Shard(0), Shard(0))),
    ((Partial(), Partial()), (Replicate(), Shard(1))),
    ((Replicate(), Shard(1)), (Shard(1), Replicate())),
]


@pytest.mark.parametrize("pair", range(len(PAIRS_2D)))
def test_redistribute_grad_2d(pair):
    src, dst = PAIRS_2D[pair]
    mesh = mesh_2d()
    x, c = rand(17, 5, 7), rand(18, 5, 7)
    X = make_dtensor(x, mesh, src)
    Y = X.redistribute(mesh, dst)
    assert_all(Y.requires_grad and Y.grad_fn is not None)
    (Y.full_tensor() * c).sum().backward()
    assert_all(X.grad.placements == _bw_placements(src), f"{X.grad.placements}")
    assert_close_all(host(X.grad.full_tensor()), host(c))


def test_backward_default_gradient_and_explicit_gradient():
    mesh = init_device_mesh(DEVICE, (W,))
    x = rand(3, 6, 2)
    X = distribute_tensor(x, mesh, [Shard(0)], requires_grad=True)
    Y = X.redistribute(mesh, [Replicate()])
    Y.backward()  # ones, Replicate -> the grad of X is ones as Shard(0)
    assert_all(X.grad.placements == (Shard(0),))
    assert_close_all(host(X.grad.full_tensor()), np.ones((6, 2)))
    G = distribute_tensor(rand(4, 6, 2), mesh, [Shard(1)])
    X.grad = None
    Y = X.redistribute(mesh, [Replicate()])
    Y.backward(G)
    assert_close_all(host(X.grad.full_tensor()), host(rand(4, 6, 2)))
    # a Partial output: gradient None is ones as Replicate
    P = make_dtensor(x, mesh, (Partial(),))
    f = local_map(lambda a: a * 3.0, out_placements=[Partial()], in_placements=([Partial()],))
    f(P).backward()
    assert_all(P.grad.placements == (Replicate(),), f"{P.grad.placements}")
    assert_close_all(host(P.grad.full_tensor()), np.full((6, 2), 3.0))


def test_gradients_accumulate_until_reset_and_detach():
    mesh = init_device_mesh(DEVICE, (W,))
    x = rand(5, 4, 3)
    X = distribute_tensor(x, mesh, [Shard(0)], requires_grad=True)
    assert_all(X.requires_grad and X.is_leaf and X.grad is None and X.grad_fn is None)
    f = local_map(lambda a: a * a, out_placements=[Shard(0)], in_placements=([Shard(0)],))
    for _ in range(2):
        f(X).backward()
    assert_close_all(host(X.grad.full_tensor()), 4 * host(x))  # 2 x (2x)
    X.grad = None
    f(X).backward()
    assert_close_all(host(X.grad.full_tensor()), 2 * host(x))
    # accumulating gradients of different placements (Replicate and Partial) reconciles them
    f_r = local_map(lambda a: a * a, out_placements=[Replicate()], in_placements=([Replicate()],))
    g_p = local_map(lambda a: a * 1.0, out_placements=[Replicate()], in_placements=([Replicate()],),
                    in_grad_placements=([Partial()],))
    Xr = distribute_tensor(x, mesh, [Replicate()], requires_grad=True)
    f_r(Xr).backward()
    assert_all(Xr.grad.placements == (Replicate(),))
    g_p(Xr).backward()  # a Partial gradient of ones on every rank: W in all
    assert_all(Xr.grad.placements == (Replicate(),), f"{Xr.grad.placements}")
    assert_close_all(host(Xr.grad.full_tensor()), 2 * host(x) + W)
    D = X.detach()
    assert_all(not D.requires_grad and D.grad is None and D.to_local() is X.to_local().data)
    assert_all(type(D.to_local()) is not Tracked and type(X.to_local()) is Tracked)
    with pytest.raises(RuntimeError, match="does not require grad"):
        D.backward()
    Y = f(X)
    with pytest.raises(RuntimeError, match="only leaves"):
        Y.requires_grad_(False)
    X.requires_grad_(False)
    assert_all(not X.requires_grad)


def test_from_local_to_local_grad_placements():
    mesh = init_device_mesh(DEVICE, (W,))
    a = tensor(rand(30 + RANK, 2, 3), requires_grad=True)
    D = DTensor.from_local(a * 2.0, mesh, [Shard(0)])
    assert_all(D.requires_grad and not D.is_leaf)
    c = rand(31 + RANK, 2, 3)
    (D.to_local() * c).sum().backward()
    assert_close_all(host(a.grad), 2 * host(c))
    # to_local(grad_placements=[Partial()]): the local grads sum in the wrapped gradient
    X = distribute_tensor(rand(32, 3, 2), mesh, [Replicate()], requires_grad=True)
    loc = X.to_local(grad_placements=[Partial()])
    loc.sum().backward()
    assert_all(X.grad.placements == (Partial(),), f"{X.grad.placements}")
    assert_close_all(host(X.grad.full_tensor()), np.full((3, 2), float(W)))
    # from_local of a Partial: gradient comes back Replicate
    b = tensor(rand(40 + RANK, 3), requires_grad=True)
    P = DTensor.from_local(b, mesh, [Partial()])
    cc = rand(41, 3)
    (P.full_tensor() * cc).sum().backward()
    assert_close_all(host(b.grad), host(cc))


def test_full_tensor_is_differentiable():
    mesh = mesh_2d()
    x, c = rand(50, 5, 3), rand(51, 5, 3)
    X = distribute_tensor(x, mesh, [Shard(0), Shard(1)], requires_grad=True)
    full = X.full_tensor()
    assert_all(type(full) is Tracked)
    (full.__array_namespace__().exp(full) * c).sum().backward()
    assert_close_all(host(X.grad.full_tensor()), np.exp(host(x)) * host(c))


# ------------------------------------------------------------------------------------------------
# 5. local_map with collectives inside; a DP + TP two-layer MLP against NumPy
# ------------------------------------------------------------------------------------------------
def test_local_map_row_parallel_with_all_reduce_inside():
    mesh = init_device_mesh(DEVICE, (W,))
    a, b = rand(60, 4, 6), rand(61, 6, 3)
    A = distribute_tensor(a, mesh, [Shard(1)], requires_grad=True)
    B = distribute_tensor(b, mesh, [Shard(0)], requires_grad=True)

    # each rank: partial product, all_reduce (sum) inside; the loss counted once per rank / W
    @local_map(out_placements=[Partial()], in_placements=([Shard(1)], [Shard(0)]),
               in_grad_placements=([Shard(1)], [Shard(0)]))
    def loss_fn(a_, b_):
        y = funcol.all_reduce(a_ @ b_, "sum", mesh)
        return (y.__array_namespace__().tanh(y) ** 2).sum() / W

    L = loss_fn(A, B)
    L.backward()
    y = host(a) @ host(b)
    gy = 2 * np.tanh(y) * (1 - np.tanh(y) ** 2)
    assert_close_all(host(A.grad.full_tensor()), gy @ host(b).T)
    assert_close_all(host(B.grad.full_tensor()), host(a).T @ gy)


def _mlp_reference(x, t, w1, w2):
    h = np.tanh(x @ w1)
    y = h @ w2
    loss = ((y - t) ** 2).sum()
    gy = 2 * (y - t)
    gw2 = h.T @ gy
    gh = gy @ w2.T * (1 - h ** 2)
    gw1 = x.T @ gh
    return loss, gw1, gw2


@pytest.mark.parametrize("style", ["redistribute_partial", "all_reduce_inside"])
def test_mlp_data_and_tensor_parallel_grads_match_numpy(style):
    mesh = mesh_2d()
    dp, tp = mesh.shape
    x, t = rand(70, 7, 5), rand(71, 7, 3)
    w1, w2 = rand(72, 5, 6), rand(73, 6, 3)
    X = distribute_tensor(x, mesh, [Shard(0), Replicate()])
    T = distribute_tensor(t, mesh, [Shard(0), Replicate()])
    W1 = distribute_tensor(w1, mesh, [Replicate(), Shard(1)], requires_grad=True)  # column parallel
    W2 = distribute_tensor(w2, mesh, [Replicate(), Shard(0)], requires_grad=True)  # row parallel
    grads = ([Shard(0), Partial()], [Partial(), Shard(1)], [Partial(), Shard(0)], None)
    if style == "redistribute_partial":
        layers = local_map(lambda x_, w1_, w2_: w1_.__array_namespace__().tanh(x_ @ w1_) @ w2_,
                           out_placements=[Shard(0), Partial()],
                           in_placements=([Shard(0), Replicate()], [Replicate(), Shard(1)], [Replicate(), Shard(0)]),
                           in_grad_placements=grads[:3])
        Y = layers(X, W1, W2)
        sq = local_map(lambda y_, t_: ((y_ - t_) ** 2).sum(), out_placements=[Partial(), Replicate()],
                       in_placements=([Shard(0), Replicate()], [Shard(0), Replicate()]), redistribute_inputs=True)
        L = sq(Y, T)  # Y: Partial over tp -> Replicate (all_reduce); its gradient passes back unchanged
    else:
        @local_map(out_placements=[Partial(), Partial()],
                   in_placements=([Shard(0), Replicate()], [Replicate(), Shard(1)], [Replicate(), Shard(0)],
                                  [Shard(0), Replicate()]),
                   in_grad_placements=grads)
        def step(x_, w1_, w2_, t_):
            h = w1_.__array_namespace__().tanh(x_ @ w1_)
            y = funcol.all_reduce(h @ w2_, "sum", (mesh, 1))
            return ((y - t_) ** 2).sum() / tp  # every tp rank holds the same y: count its loss 1/tp each

        L = step(X, W1, W2, T)
    L.backward()
    loss, gw1, gw2 = _mlp_reference(host(x), host(t), host(w1), host(w2))
    assert_close_all(float(host(L.detach().full_tensor())), loss)
    assert_all(W1.grad.placements == (Partial(), Shard(1)) and W2.grad.placements == (Partial(), Shard(0)),
               f"{W1.grad.placements} {W2.grad.placements}")
    assert_close_all(host(W1.grad.full_tensor()), gw1)
    assert_close_all(host(W2.grad.full_tensor()), gw2)


# ------------------------------------------------------------------------------------------------
# 6. contract: unsupported operations, custom Functions, no tracking without grad
# ------------------------------------------------------------------------------------------------
def test_unsupported_operations_raise_naming_them():
    a = tensor(rand(80, 3, 4), requires_grad=True)
    ns_ = a.__array_namespace__()
    with pytest.raises(NotImplementedError, match=r"\.arcsin is not differentiable"):
        ns_.arcsin(a)
    with pytest.raises(NotImplementedError, match=r"\.cumsum is not differentiable"):
        ns_.cumsum(a)
    if DEVICE == "cpu":
        with pytest.raises(NotImplementedError, match=r"numpy\.arcsin is not differentiable"):
            np.arcsin(a)
        with pytest.raises(NotImplementedError, match=r"numpy\.cumsum is not differentiable"):
            np.cumsum(a)
        with pytest.raises(NotImplementedError, match="not differentiable"):
            np.add(a, a, out=np.empty((3, 4)))
    with pytest.raises(NotImplementedError, match="__setitem__"):
        a[0] = 1.0
    with pytest.raises(TypeError, match=r"\.detach\(\)"):
        np.asarray(a)
    # inside local_map the same error reaches the caller (on every rank)
    mesh = init_device_mesh(DEVICE, (W,))
    X = distribute_tensor(rand(81, 4, 2), mesh, [Shard(0)], requires_grad=True)
    f = local_map(lambda u: u.__array_namespace__().sinh(u), out_placements=[Shard(0)], in_placements=([Shard(0)],))
    with pytest.raises(NotImplementedError, match=r"\.sinh is not differentiable"):
        f(X)


class Sin(Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return xp.sin(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * xp.cos(x)


class ScaledAllReduce(Function):
    """A custom collective: y = s * all_reduce(x); backward all-reduces the gradient."""

    @staticmethod
    def forward(ctx, x, s, group):
        ctx.s, ctx.group = s, group
        return s * funcol.all_reduce(x, "sum", group)

    @staticmethod
    def backward(ctx, g):
        return ctx.s * funcol.all_reduce(g, "sum", ctx.group), None, None


def test_custom_function_finite_differences():
    x = rand(90 + RANK, 3, 4)
    f = lambda a: Sin.apply(a) * 2.0 if type(a) is Tracked else xp.sin(a) * 2.0  # noqa: E731
    c = rand(91 + RANK, 3, 4)
    _, got = analytic(f, [x], c)
    check_grads(got, numeric_local(f, [x], c), what="Sin")
    mesh = init_device_mesh(DEVICE, (W,))
    g = lambda a: ScaledAllReduce.apply(a, 1.5, mesh) ** 2  # noqa: E731
    _, got = analytic(g, [x], c)
    check_grads(got, numeric_group(lambda a: (1.5 * funcol.all_reduce(a, "sum", mesh)) ** 2, [x], c, WORLD),
                what="ScaledAllReduce")
    # a Function inside local_map
    X = distribute_tensor(rand(92, 5, 2), mesh, [Shard(0)], requires_grad=True)
    lm = local_map(lambda u: Sin.apply(u), out_placements=[Shard(0)], in_placements=([Shard(0)],))
    lm(X).backward()
    assert_close_all(host(X.grad.full_tensor()), np.cos(host(rand(92, 5, 2))))


def test_function_backward_contract_errors():
    class Bad(Function):
        @staticmethod
        def forward(ctx, a, b):
            return a + b

        @staticmethod
        def backward(ctx, g):
            return g

    a = tensor(rand(1, 2, 2), requires_grad=True)
    with pytest.raises(ValueError, match="returned 1 gradient"):
        Bad.apply(a, a).sum().backward()


def test_no_grad_inputs_are_not_tracked():
    mesh = init_device_mesh(DEVICE, (W,))
    X = distribute_tensor(rand(95, 2 * W, 3), mesh, [Shard(0)])
    kinds = []

    def f(a):
        kinds.append(type(a))
        return funcol.all_reduce(a, "sum", mesh)

    with CommDebugMode() as mode:
        Y = local_map(f, out_placements=[Shard(0)], in_placements=([Shard(0)],))(X)
    assert_all(kinds == [type(X.to_local())] and type(X.to_local()) is not Tracked)
    assert_all(not Y.requires_grad and Y.grad_fn is None and mode.get_total_counts() == 1)
    # requires_grad inputs: tracked, with the same forward collectives
    Xg = distribute_tensor(rand(95, 2 * W, 3), mesh, [Shard(0)], requires_grad=True)
    with CommDebugMode() as mode:
        Yg = local_map(f, out_placements=[Shard(0)], in_placements=([Shard(0)],))(Xg)
    assert_all(kinds[-1] is Tracked and Yg.requires_grad and mode.get_total_counts() == 1)
    assert_close_all(host(Yg.detach().to_local()), host(Y.to_local()))


def test_argument_errors():
    mesh = init_device_mesh(DEVICE, (W,))
    X = distribute_tensor(rand(96, 2 * W, 3), mesh, [Shard(0)], requires_grad=True)
    f = local_map(lambda a: a * 2.0, out_placements=[Shard(0)], in_placements=([Shard(0)],),
                  in_grad_placements=([Shard(0)], [Replicate()]))
    with pytest.raises(ValueError, match="in_grad_placements must have one entry per flattened input"):
        f(X)
    Y = local_map(lambda a: a * 2.0, out_placements=[Shard(0)], in_placements=([Shard(0)],))(X)
    with pytest.raises(TypeError, match="gradient must be a DTensor"):
        Y.backward(xp.ones((2, 3)))
    with pytest.raises(ValueError, match="must match the output"):
        Y.backward(distribute_tensor(rand(97, 2 * W, 4), mesh, [Shard(0)]))
    with pytest.raises(TypeError, match="DTensor.grad must be a DTensor"):
        X.grad = xp.ones((2, 3))
    with pytest.raises(RuntimeError, match="does not require grad"):
        tensor(rand(98, 2)).backward()
    t = tensor(rand(99, 2, 2), requires_grad=True)
    with pytest.raises(ValueError, match="gradient has shape"):
        (t * 2.0).backward(xp.ones(3))


# ------------------------------------------------------------------------------------------------
# 7. issue 9: MPILOCAL_DEBUG checks the gradients local_map labels Replicate; Tracked errors
#    outside local_map name .detach(); issue 10: the backward split agreement is accounted
# ------------------------------------------------------------------------------------------------

import mpilocal.deadline as _deadline  # noqa: E402


def _dp_step(mesh, in_grad_placements):
    """Data parallel over mesh dim 0 ("dp"): X sharded, the weight replicated over "dp" (and sharded
    over "tp" on a 2-D mesh); the weight's local gradient is a partial sum over "dp"."""
    x, w = rand(100, 8, 3), rand(101, 3, 4)
    rest = [Replicate()] * (mesh.ndim - 1)
    wpl = [Replicate()] + ([Shard(1)] if mesh.ndim == 2 else [])
    X = distribute_tensor(x, mesh, [Shard(0)] + rest)
    Wt = distribute_tensor(w, mesh, wpl, requires_grad=True)
    f = local_map(lambda a, b: (a @ b) ** 2, out_placements=[Shard(0)] + ([Shard(1)] if mesh.ndim == 2 else []),
                  in_placements=(X.placements, Wt.placements), in_grad_placements=in_grad_placements)
    Y = f(X, Wt)
    ref = host(x).T @ (2 * (host(x) @ host(w)))  # d/dW of sum((XW)^2)
    return Y, Wt, ref


@pytest.mark.parametrize("kind", ["1d", "2x2"])
def test_debug_mode_catches_partial_gradient_labelled_replicate(kind):
    """The default in_grad_placements (PyTorch's: the forward placements) labels a weight's partial
    gradient Replicate on the data-parallel mesh dim. Under MPILOCAL_DEBUG=1 backward raises on every
    rank naming the input, the mesh dim, the ranks and the fix; with Partial() it passes and is right."""
    if W == 1:
        pytest.skip("no data parallelism at 1 rank")
    if kind == "2x2" and W != 4:
        pytest.skip("2x2 mesh")
    mesh = init_device_mesh(DEVICE, (W,) if kind == "1d" else (2, 2),
                           mesh_dim_names=("dp",) if kind == "1d" else ("dp", "tp"))
    with debug_mode():
        Y, Wt, _ = _dp_step(mesh, None)
        raises_all(RuntimeError, r"the gradient of input 1 \('b'\) is labelled Replicate\(\) on mesh dim 0 \('dp'\) "
                   r"but its replicas differ: world ranks \[0\] vs \[" + str(mesh.mesh[1].ravel()[0]) +
                   r"\].*in_grad_placements with Partial\(\)", Y.backward)
        grads = (None, [Partial()] + ([Shard(1)] if kind == "2x2" else []))
        Y, Wt, ref = _dp_step(mesh, grads)
        Y.backward()
    assert_all(Wt.grad.placements[0] == Partial(), f"{Wt.grad.placements}")
    assert_close_all(host(Wt.grad.full_tensor()), ref, rtol=1e-10)


def test_debug_mode_passes_valid_gradient_programs():
    """Replicate gradients that are really replicated pass the check: a weight used the same way on
    every rank (Replicate input, Replicate output), and a Replicate input redistributed inside."""
    mesh = init_device_mesh(DEVICE, (W,))
    w = rand(110, 3, 3)
    with debug_mode():
        Wt = distribute_tensor(w, mesh, [Replicate()], requires_grad=True)
        f = local_map(lambda b: (b @ b).sum(keepdims=True), out_placements=[Replicate()],
                      in_placements=([Replicate()],))
        f(Wt).backward()
        g = local_map(lambda b: b * 3.0, out_placements=[Shard(0)], in_placements=([Shard(0)],),
                      redistribute_inputs=True)
        V = distribute_tensor(w, mesh, [Replicate()], requires_grad=True)
        g(V).backward()
    assert_close_all(host(Wt.grad.full_tensor()), np.ones((3, 3)) @ host(w).T + host(w).T @ np.ones((3, 3)))
    assert_close_all(host(V.grad.full_tensor()), np.full((3, 3), 3.0))


def test_tracked_errors_outside_local_map_name_detach():
    """full_tensor()/to_local() of a DTensor that requires grad is Tracked: NumPy functions and
    in-place writes on it say so and name .detach(), which shares memory (issue 9)."""
    mesh = init_device_mesh(DEVICE, (W,))
    w = rand(120, 4, 2)
    Wt = distribute_tensor(w, mesh, [Shard(0)], requires_grad=True)
    L = local_map(lambda a: a * 2.0, out_placements=[Shard(0)], in_placements=([Shard(0)],))(Wt)
    full = L.full_tensor()
    if DEVICE == "cpu":
        with pytest.raises(NotImplementedError) as info:
            np.allclose(full, 0.0)
        msg = str(info.value)
        assert "comes from a DTensor that requires grad" in msg and "local_map input" not in msg, msg
        assert "numpy.allclose(x.detach(), y)" in msg, msg
        assert np.allclose(full.detach(), 2 * host(w))
    with pytest.raises(NotImplementedError) as info:
        Wt.to_local()[...] -= 1.0
    msg = str(info.value)
    assert "W.detach().to_local()[...] -= lr * g" in msg and "shares memory" in msg, msg
    assert "where/concat/stack" not in msg, msg
    local = Wt.to_local()
    with pytest.raises(NotImplementedError, match=r"in-place -=.*\.detach\(\)"):
        local -= 1.0  # would rebind the name and leave the weights unchanged
    before = host(Wt.detach().to_local()).copy()
    Wt.detach().to_local()[...] -= 1.0  # the advice works: detach() shares memory
    assert_close_all(host(Wt.detach().to_local()), before - 1.0)
    # inside local_map: the message says why the array is Tracked there
    f = local_map(lambda a: np.cumsum(a) if DEVICE == "cpu" else a.__array_namespace__().cumsum(a),
                  out_placements=[Shard(0)], in_placements=([Shard(0)],))
    with pytest.raises(NotImplementedError, match="because a local_map input requires grad"):
        f(Wt)

    def inplace(a):
        a += 1.0
        return a

    with pytest.raises(NotImplementedError, match=r"in-place \+=.*local_map input requires grad.*out of place"):
        local_map(inplace, out_placements=[Shard(0)], in_placements=([Shard(0)],))(Wt)

    def intermediate(a):
        h = a * 2.0
        h += 1.0  # an intermediate result: out of place, as the name is rebound
        return h

    Y = local_map(intermediate, out_placements=[Shard(0)], in_placements=([Shard(0)],))(Wt)
    Y.backward()
    assert_close_all(host(Y.detach().full_tensor()), 2 * host(Wt.detach().full_tensor()) + 1.0)


def test_all_to_all_backward_split_agreement_is_accounted(monkeypatch):
    """The backward of a differentiable all_to_all_single with agreed output splits learns them
    through the accounted metadata path of mpilocal.collectives (deadline, fingerprint, count), not a raw
    MPI call."""
    if W == 1:
        pytest.skip("one rank: every split is even, nothing to agree")
    mesh = init_device_mesh(DEVICE, (W,))
    seen = []
    begin = _deadline.begin

    def spy(name, g, send=None, detail=None, note=None):
        seen.append(name)
        return begin(name, g, send, detail, note)

    ins = [RANK + 1 if q % 2 == 0 else 0 for q in range(W)]  # uneven: output splits must be agreed
    x = rand(130 + RANK, sum(ins), 2)
    monkeypatch.setattr(_deadline, "begin", spy)
    funcol.all_to_all_single(x, None, ins, mesh)
    plain = seen.count("metadata:split_agreement")
    seen.clear()
    t = tensor(x.copy(), requires_grad=True)
    out = funcol.all_to_all_single(t, None, ins, mesh)
    tracked = seen.count("metadata:split_agreement")
    monkeypatch.undo()
    assert_all(tracked == plain + 1, f"split agreements: plain {plain}, tracked {tracked}")
    (out * out).sum().backward()
    assert_close_all(host(t.grad), 2 * host(x))


def test_supported_list_is_the_namespace():
    """SUPPORTED, the namespace of Tracked arrays and NumPy's protocols come from one table."""
    from mpilocal.autograd import SUPPORTED, TrackedNamespace
    from mpilocal.autograd import tracked as tr

    public = {n for n in vars(TrackedNamespace) if not n.startswith("_")} - {"asarray"}
    assert public == set(SUPPORTED), public ^ set(SUPPORTED)
    for name in SUPPORTED:
        assert getattr(TrackedNamespace, name) is tr._FUNCS[name], name
    for table in (tr._UFUNCS, tr._FUNCTIONS):
        for name, fn in table.items():
            assert fn in tr._FUNCS.values() or name in ("positive", "shape", "ndim", "size"), name
