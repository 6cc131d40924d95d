"""Host syncs of one training step: at most 2 for RetinaNet, any B and G (issue 10).

A sync is an op after which the host waits for the device on CUDA (``.item()``,
``nonzero``, boolean indexing, ``.tolist()``...). ``profiling.count_ops`` counts them on any
device; ``sync_policy.cuda_sync_policy`` makes the CPU take the choices the loss makes on
CUDA (where it spends a little compute to avoid a read-back), so the CPU run counts what a
CUDA run does. On CUDA, the runtime's own ``set_sync_debug_mode`` checks the same.
"""

import warnings

import pytest
import torch
from helpers import (
    assert_grads_match,
    assert_losses_match,
    build,
    loss_and_grads,
    make_batch,
    retina_cfg,
    rpn_cfg,
    to_plugin,
)

from mmdet_anchorloss.kernels.sync_policy import cuda_sync_policy, device_constant, upload
from mmdet_anchorloss.profiling import count_ops, host_memory

SYNC_BUDGET = 2


def _step(head, batch):
    cls, reg, gts, metas, ignore = batch
    cls = [c.detach().clone().requires_grad_() for c in cls]
    reg = [r.detach().clone().requires_grad_() for r in reg]
    with count_ops() as counter:
        losses = head.loss_by_feat(cls, reg, gts, metas, ignore)
        sum(sum(v) for v in losses.values()).backward()
    return counter.result()


@pytest.mark.parametrize('num_gts', [(0, 0), (3,), (2, 7, 0, 40)], ids=['empty', 'B1', 'B4'])
@pytest.mark.parametrize('chunk', [1 << 20, 512], ids=['one_chunk', 'many_chunks'])
def test_retina_step_syncs_within_budget(num_gts, chunk):
    cfg = to_plugin(retina_cfg(num_classes=8))
    cfg['train_cfg']['assigner']['max_chunk_elems'] = chunk
    head = build(cfg)
    batch = make_batch(
        head, 0, num_gts, [(100, 120), (64, 90), (128, 128), (96, 96)][: len(num_gts)]
    )
    with cuda_sync_policy():
        got = _step(head, batch)
    assert got.syncs <= SYNC_BUDGET, dict(got.sync_sites)
    assert got.ops > 0 and got.launches > 0  # the counter saw the step


def test_cpu_choices_count_their_syncs():
    """The counter is not blind: the CPU's own choices read back more (tie pairs, the
    incoming gradient), and say where."""
    cfg = to_plugin(retina_cfg(num_classes=8))
    cfg['train_cfg']['assigner']['max_chunk_elems'] = 512
    head = build(cfg)
    batch = make_batch(head, 0, (2, 7), [(100, 120), (64, 90)])
    got = _step(head, batch)
    assert got.syncs > SYNC_BUDGET
    assert any('kernels/sigmoid.py' in site for site in got.sync_sites), got.sync_sites


def test_check_finite_syncs_only_when_switched_on():
    """``check_finite`` (off by default) costs one read-back of its own when on, no more."""
    counts = {}
    for on in (False, True):
        cfg = to_plugin(retina_cfg(num_classes=8))
        cfg['check_finite'] = on
        head = build(cfg)
        with cuda_sync_policy():
            counts[on] = _step(head, make_batch(head, 0, (2, 7), [(100, 120), (64, 90)]))
    off, on = counts[False], counts[True]
    assert off.syncs <= SYNC_BUDGET
    assert on.syncs == off.syncs + 1, dict(on.sync_sites)
    (extra,) = set(on.sync_sites) - set(off.sync_sites)
    assert 'core/validation.py' in extra, dict(on.sync_sites)


def test_cuda_choices_keep_the_numbers():
    cfg = retina_cfg(num_classes=8)
    upstream = build(cfg)
    plugin_cfg = to_plugin(cfg)
    plugin_cfg['train_cfg']['assigner']['max_chunk_elems'] = 512  # ties across chunks
    plugin = build(plugin_cfg)
    batch = make_batch(upstream, 3, (4, 2), [(100, 120), (64, 90)], duplicate=True)
    ref, ref_g = loss_and_grads(upstream, *batch)
    with cuda_sync_policy():
        got, got_g = loss_and_grads(plugin, *batch)
    assert_losses_match(ref, got)
    assert_grads_match(ref_g, got_g)


@pytest.mark.gpu
def test_cuda_step_syncs_by_the_runtime():
    """On a GPU: the CUDA runtime's own sync check agrees with the budget."""
    head = build(to_plugin(retina_cfg(num_classes=8))).cuda()
    batch = make_batch(head, 0, (2, 7, 0, 40), [(100, 120)] * 4, device='cuda')
    _step(head, batch)  # warm-up: compilation, caches
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        torch.cuda.set_sync_debug_mode('warn')
        try:
            got = _step(head, batch)
        finally:
            torch.cuda.set_sync_debug_mode('default')
    # one warning per synchronizing call; torch also warns once that the mode is a
    # prototype ('Synchronization debug mode is a prototype feature ...'), not a sync
    syncs = [w for w in caught if 'called a synchronizing CUDA operation' in str(w.message)]
    assert got.syncs <= SYNC_BUDGET, (dict(got.sync_sites), dict(got.host_reads))
    assert len(syncs) <= SYNC_BUDGET, [str(w.message) for w in syncs]


def test_counter_sees_copies_from_host_data():
    """``torch.tensor(values, device=...)`` waits on CUDA (a pageable copy): counted on any
    device. ``upload`` and ``device_constant`` make no such copy, and are not counted."""
    with count_ops() as counter:
        torch.tensor([1, 2], device='cpu')
        torch.as_tensor([1.0], device='cpu')
        torch.zeros(2).new_tensor([3])
        torch.as_tensor(torch.ones(2), device='cpu')  # a tensor, not host data
        torch.tensor([4, 5])  # stays on the host
        upload([6, 7], 'cpu', torch.long)
        device_constant((8, 9), 'cpu')
    got = counter.result()
    assert got.syncs == 3, dict(got.sync_sites)
    assert all('test_sync_budget.py' in site for site in got.sync_sites), got.sync_sites


def test_host_reads_wait_for_nothing_once_a_device_ran():
    """In a block that ran on a device (here 'meta', which has no data to read), reading a
    host tensor is no sync: it is listed apart. In a CPU-only block the CPU stands in for
    the device, and the same reads count."""

    def reads():
        mask = torch.tensor([True, False, True])
        torch.tensor(3.0).item()
        mask.nonzero()
        torch.arange(3)[mask]
        mask.tolist()

    with count_ops() as counter:
        torch.ones(2, device='meta') + 1
        reads()
    got = counter.result()
    assert got.syncs == 0, dict(got.sync_sites)
    assert sum(got.host_reads.values()) == 4, dict(got.host_reads)
    assert all('test_sync_budget.py' in site for site in got.host_reads), got.host_reads
    with count_ops() as counter:
        reads()
    got = counter.result()
    assert got.syncs == 4 and not got.host_reads, dict(got.sync_sites)
    assert set(got.sync_ops) == {'_local_scalar_dense', 'nonzero', 'index', 'Tensor.tolist'}
    # host_memory(): reads of what is the host's on every device, listed apart even here
    with count_ops() as counter:
        with host_memory():
            reads()
        torch.tensor(1).item()  # after the block: counted again
    got = counter.result()
    assert got.syncs == 1 and sum(got.host_reads.values()) == 4, dict(got.sync_sites)


def test_rpn_step_syncs_once_more_for_the_random_samplers_counts():
    """The RPN's RandomSampler reads its counts back once per step (not once per image);
    reading the CPU generator's state for the draws is no sync."""
    head = build(to_plugin(rpn_cfg(train_cfg=dict(sampler=dict(num=16)))))
    batch = make_batch(head, 0, (3, 1, 0, 5), [(100, 120), (64, 90), (64, 90), (100, 120)])
    _step(head, batch)  # the first step of a process also checks the replay once
    with cuda_sync_policy():
        got = _step(head, batch)
    assert got.syncs == SYNC_BUDGET + 1, dict(got.sync_sites)
    assert set(got.sync_ops) == {'Tensor.tolist'}, dict(got.sync_sites)
    assert any('randperm_replay.py' in site for site in got.host_reads), dict(got.host_reads)


def test_upload_and_device_constant_values():
    up = upload([[1, 2], [3, 4]], 'cpu', torch.int32)
    assert up.dtype == torch.int32 and up.tolist() == [[1, 2], [3, 4]]
    from_tensor = upload(torch.tensor([True, False]), 'cpu')
    assert from_tensor.dtype == torch.bool and from_tensor.tolist() == [True, False]
    first = device_constant(((0, 3), (3, 5)), 'cpu')
    assert first.tolist() == [[0, 3], [3, 5]]
    assert device_constant(((0, 3), (3, 5)), 'cpu') is first  # kept, not copied again
    other = device_constant(((0, 3), (3, 5)), 'cpu', torch.float64)
    assert other is not first and other.dtype == torch.float64


@pytest.mark.gpu
def test_upload_to_cuda_is_not_a_sync():
    values = list(range(1000))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        got = upload(values, 'cuda', torch.long)
        const = device_constant(tuple(values), 'cuda')
    finally:
        torch.cuda.set_sync_debug_mode('default')
    assert got.is_cuda and torch.equal(got.cpu(), torch.arange(1000))
    assert torch.equal(const.cpu(), torch.arange(1000))


STAGES = [
    'pad_gts',
    'anchors',
    'check_inputs',
    'assign',
    'sample',
    'read_back',
    'targets',
    'classification_loss',
    'regression_loss',
]


def test_stages_are_marked_for_the_profiler_and_cost_nothing_outside_it():
    """Under ``torch.profiler`` the step's stages are ranges in order (the benchmark's
    ``--profile`` splits host time by them); outside a profile no range is opened, so the
    op count and the budget above see none."""
    from torch.profiler import ProfilerActivity, profile

    from mmdet_anchorloss.profiling import STAGE_PREFIX

    head = build(to_plugin(retina_cfg(num_classes=8)))
    batch = make_batch(head, 0, (3, 1), [(100, 120), (64, 90)])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loss_and_grads(head, *batch)
    ranges = [e for e in prof.events() if e.name.startswith(STAGE_PREFIX)]
    assert [
        e.name[len(STAGE_PREFIX) :] for e in sorted(ranges, key=lambda e: e.time_range.start)
    ] == STAGES
    got = _step(head, batch)
    assert not [op for op in got.by_op if 'record_function' in op], got.by_op


def test_random_samplers_draws_are_a_stage_inside_sample():
    """The RPN's ``RandomSampler`` draws (host work on the CPU generator) show apart, as
    ``draws`` inside ``sample``."""
    from torch.profiler import ProfilerActivity, profile

    from mmdet_anchorloss.profiling import STAGE_PREFIX

    head = build(to_plugin(rpn_cfg(train_cfg=dict(sampler=dict(num=16)))))
    batch = make_batch(head, 0, (3, 1), [(100, 120), (64, 90)])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loss_and_grads(head, *batch)
    spans = {
        e.name[len(STAGE_PREFIX) :]: e.time_range
        for e in prof.events()
        if e.name.startswith(STAGE_PREFIX)
    }
    assert spans['sample'].start <= spans['draws'].start
    assert spans['draws'].end <= spans['sample'].end
