# Iteration-based schedule for the shapes configs, sized for a 2-core CPU: linear warmup,
# then cosine decay; one evaluation at the end. tools/compare_upstream.py --max-iters
# rescales max_iters, val_interval and the scheduler ends together. Runtime (hooks, logging,
# visualizer) is mmdet's default, with iteration-based logging and checkpointing.
_base_ = 'mmdet::_base_/default_runtime.py'

max_iters = 1500
warmup_iters = 100

train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')

param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=warmup_iters),
    dict(
        type='CosineAnnealingLR',
        by_epoch=False,
        begin=warmup_iters,
        end=max_iters,
        T_max=max_iters - warmup_iters,
        eta_min_ratio=0.01,
    ),
]
# AdamW converges much faster than SGD for these small networks trained from scratch.
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=0.003, weight_decay=0.05),
    clip_grad=dict(max_norm=35, norm_type=2),
)

default_hooks = dict(
    logger=dict(type='LoggerHook', interval=50),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=max_iters, max_keep_ckpts=1),
)
log_processor = dict(type='LogProcessor', window_size=50, by_epoch=False)
randomness = dict(seed=0)
