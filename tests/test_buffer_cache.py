"""srn_fast.ops.buffer_cache: the fused ops' saved CPU buffers handed out again once nothing uses them, never while
something does; the ops' results do not depend on it; --release-memory turns it off."""
import pytest
import torch
import torch.nn.functional as F

from srn_fast import ops
from srn_fast.cli import main
from srn_fast.ops import buffer_cache as bc

from op_utils import layer_tensors, make_layers, make_lstm, require_extension

ext = require_extension()

BIG = (64, 1024)  # 256 KB of float32: over the lowered MIN_BYTES below


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    monkeypatch.setattr(bc, "MIN_BYTES", 1 << 16)
    bc.set_enabled(True)
    bc.release()
    yield
    bc.set_enabled(True)
    bc.release()


def test_an_idle_buffer_is_handed_out_again_and_a_used_one_never():
    like = torch.empty(0)
    a = bc.take(BIG, like)
    assert a.shape == BIG and a.dtype == torch.float32 and a._base is None
    ptr = a.data_ptr()
    b = bc.take(BIG, like)  # a is alive: a new buffer
    assert b.data_ptr() != ptr
    assert bc.cached_bytes() == 2 * a.nbytes
    view = a[3]
    del a
    c = bc.take(BIG, like)  # a's storage is still referenced by a view
    assert c.data_ptr() not in (ptr, b.data_ptr())
    del view
    d = bc.take((1024, 64), like)  # same size and dtype, another shape: a's buffer
    assert d.data_ptr() == ptr and d.shape == (1024, 64)
    assert bc.cached_bytes() == 3 * d.nbytes


def test_small_other_dtype_and_non_cpu_requests_are_not_cached():
    assert bc.take((4, 4), torch.empty(0)).shape == (4, 4)
    assert bc.take(BIG, torch.empty(0, device="meta")).device.type == "meta"
    assert bc.cached_bytes() == 0
    a = bc.take(BIG, torch.empty(0))
    ptr = a.data_ptr()
    del a
    assert bc.take(BIG, torch.empty(0, dtype=torch.int32)).data_ptr() != ptr  # same bytes, other dtype
    assert bc.take((64, 512), torch.empty(0, dtype=torch.float64)).dtype == torch.float64


def test_release_disable_and_idle_expiry(monkeypatch):
    like = torch.empty(0)
    kept = bc.take(BIG, like)
    idle = bc.take(BIG, like)
    nbytes = idle.nbytes
    del idle
    assert bc.release() == nbytes  # only the idle one
    assert bc.cached_bytes() == nbytes
    del kept
    bc.set_enabled(False)
    assert bc.cached_bytes() == 0
    assert bc.take(BIG, like) is not None and bc.cached_bytes() == 0
    bc.set_enabled(True)
    monkeypatch.setattr(bc, "MAX_IDLE", 3)
    old = bc.take(BIG, like)
    del old
    held = [bc.take((128, 1024), like) for _ in range(3)]  # within MAX_IDLE: the idle BIG buffer stays
    assert bc.cached_bytes() == 3 * 128 * 1024 * 4 + 64 * 1024 * 4
    held.append(bc.take((128, 1024), like))  # a new buffer, MAX_IDLE requests after BIG's last use: BIG is freed
    assert bc.cached_bytes() == 4 * 128 * 1024 * 4


def _march_grads(phi, lstm, x0, dirs):
    out = ops.march(x0, dirs, phi, lstm, 3, mode="store")
    v = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(5))
    return torch.autograd.grad(out, [x0, dirs] + layer_tensors(phi) + list(lstm), v)


def test_march_and_mlp_results_do_not_depend_on_the_cache():
    # store mode saves [T, B, N, C] activations (over MIN_BYTES here); a reused buffer holds the previous step's
    # numbers, which must never show: every gradient equals the cache-off ones exactly, also with two graphs alive
    gen = torch.Generator().manual_seed(0)
    phi = make_layers(2, [3, 64, 64], per_scene=True, affine=True, dtype=torch.float32, gen=gen)
    lstm = make_lstm(64, 16, dtype=torch.float32, gen=gen)
    x0 = (torch.randn(2, 300, 3, generator=gen) * 0.3).requires_grad_()
    dirs = F.normalize(torch.randn(2, 300, 3, generator=gen), dim=-1).requires_grad_()
    bc.set_enabled(False)
    ref = _march_grads(phi, lstm, x0, dirs)
    mlp_ref = torch.autograd.grad(ops.mlp(x0, phi).square().sum(), layer_tensors(phi))
    bc.set_enabled(True)
    for _ in range(3):
        for a, b in zip(_march_grads(phi, lstm, x0, dirs), ref):
            assert torch.equal(a, b)
        for a, b in zip(torch.autograd.grad(ops.mlp(x0, phi).square().sum(), layer_tensors(phi)), mlp_ref):
            assert torch.equal(a, b)
    assert bc.cached_bytes() > 0  # the march and the MLP did use it
    assert ext.scratch_pool_bytes() > 0  # and their backward passes the extension's pool (64 KB slots here)
    # two forwards before their backwards: the second cannot take the first one's buffers
    o1 = ops.march(x0, dirs, phi, lstm, 3, mode="store")
    o2 = ops.march(x0 * 1.5, dirs, phi, lstm, 3, mode="store")
    g2 = torch.autograd.grad(o2.sum(), x0)[0]
    g1 = torch.autograd.grad(o1.sum(), x0)[0]
    bc.set_enabled(False)
    assert torch.equal(g1, torch.autograd.grad(ops.march(x0, dirs, phi, lstm, 3, mode="store").sum(), x0)[0])
    assert torch.equal(g2, torch.autograd.grad(ops.march(x0 * 1.5, dirs, phi, lstm, 3, mode="store").sum(), x0)[0])


def test_wide_linear_weight_gradient_reuses_its_buffer_between_steps():
    gen = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(32, 4096)
    x = torch.randn(2, 32, generator=gen, requires_grad=True)
    ptrs = []
    for _ in range(2):
        lin.zero_grad(set_to_none=True)
        ops.wide_linear(x, lin.weight, lin.bias).square().sum().backward()
        ptrs.append(lin.weight.grad.data_ptr())
        ref = torch.autograd.grad(F.linear(x, lin.weight, lin.bias).square().sum(), lin.weight)[0]
        torch.testing.assert_close(lin.weight.grad, ref)
    assert ptrs[0] == ptrs[1]  # the first step's gradient (freed by zero_grad) became the second's
    kept = lin.weight.grad  # held by the caller: the next step must not write into it
    before = kept.clone()
    lin.zero_grad(set_to_none=True)
    ops.wide_linear(x * 2, lin.weight, lin.bias).square().sum().backward()
    assert lin.weight.grad.data_ptr() != kept.data_ptr() and torch.equal(kept, before)


def test_release_memory_turns_the_cache_off(tmp_path, monkeypatch):
    monkeypatch.setattr("srn_fast.cpu_memory.keep_freed_memory_for", lambda device: True)  # no mallopt in tests
    argv = ["render", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "out"), "--device", "cpu"]
    assert main(argv) == 2 and bc._state["enabled"]
    assert main(argv + ["--release-memory"]) == 2  # the command fails (no checkpoint) after the choice is applied
    assert not bc._state["enabled"]


def test_mlp_output_and_input_gradient_come_from_the_cache_but_never_overwrite_a_held_result():
    # a 128x128 step's 32 MB phi feature and pixel-generator input gradient were fresh pages every step
    gen = torch.Generator().manual_seed(2)
    phi = make_layers(1, [64, 256, 256], per_scene=False, affine=True, dtype=torch.float32, gen=gen)
    x = torch.randn(1, 512, 64, generator=gen, requires_grad=True)  # output [1, 512, 256]: 512 KB
    first = ops.mlp(x, phi)
    ptr = first.data_ptr()
    del first
    out = ops.mlp(x, phi)
    assert out.data_ptr() == ptr  # the freed output's buffer came back
    held, before = out, out.detach().clone()
    again = ops.mlp(x * 2, phi)  # `held` is still referenced: a new buffer
    assert again.data_ptr() != held.data_ptr() and torch.equal(held, before)
    gx1 = torch.autograd.grad(again.square().sum(), x)[0]
    gx1_before = gx1.clone()
    gx2 = torch.autograd.grad(ops.mlp(x, phi).square().sum(), x)[0]
    assert gx2.data_ptr() != gx1.data_ptr() and torch.equal(gx1, gx1_before)
    bc.set_enabled(False)
    torch.testing.assert_close(gx2, torch.autograd.grad(ops.mlp(x, phi).square().sum(), x)[0], rtol=0, atol=0)


def _mlp_grads(layers, x, seed):
    out = ops.mlp(x, layers, matmul_dtype=torch.bfloat16)
    v = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad(out, [x] + layer_tensors(layers), v)


def test_backward_scratch_is_reused_released_and_switched_off_with_the_cache():
    """The ops' backward accumulators (csrc/common/scratch_pool.h): reused between calls rather than allocated anew,
    freed by release(), not kept while the cache is off, and never a reason for results to differ."""
    gen = torch.Generator().manual_seed(2)
    layers = make_layers(2, [3, 128, 128], per_scene=True, dtype=torch.float32, gen=gen)  # 128 KB+ slots
    x = (torch.randn(2, 333, 3, generator=gen) * 0.3).requires_grad_()
    assert ext.scratch_pool_enabled() and ext.scratch_pool_bytes() == 0  # the fixture released everything
    first = _mlp_grads(layers, x, 0)
    held = ext.scratch_pool_bytes()
    assert held > 0
    other = _mlp_grads(layers, x * 2, 1)  # the same blocks again, holding the first call's sums: zeroed first
    assert ext.scratch_pool_bytes() == held
    assert bc.release() >= held and ext.scratch_pool_bytes() == 0
    bc.set_enabled(False)
    assert not ext.scratch_pool_enabled()
    for a, b in zip(_mlp_grads(layers, x, 0) + _mlp_grads(layers, x * 2, 1), first + other):
        assert torch.equal(a, b)
    assert ext.scratch_pool_bytes() == 0  # off: nothing kept
    bc.set_enabled(True)
    assert ext.scratch_pool_enabled()


def test_backward_scratch_from_threads_at_once():
    """Two threads running the op's backward at the same time each get blocks of their own: the same gradients as
    one after the other."""
    import threading

    gen = torch.Generator().manual_seed(3)
    layers = make_layers(2, [3, 128, 128], per_scene=True, dtype=torch.float32, gen=gen)
    xs = [(torch.randn(2, 200 + 50 * k, 3, generator=gen) * 0.3).requires_grad_() for k in range(2)]
    want = [_mlp_grads(layers, x, k) for k, x in enumerate(xs)]
    got, errors = [None, None], []

    def run(k):
        try:
            for _ in range(4):
                got[k] = _mlp_grads(layers, xs[k], k)
                assert all(torch.equal(a, b) for a, b in zip(got[k], want[k]))
        except Exception as e:  # reported below: an assertion in a thread would not fail the test
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert all(g is not None for g in got)
