"""What the training, evaluation and prediction scripts share, one concern per module.

* :mod:`.distributed`: ``torchrun`` processes (DDP, SyncBatchNorm, gathering);
* :mod:`.rng`: seeds and the generator states a checkpoint stores;
* :mod:`.loaders`: data sets, samplers and loaders from a config;
* :mod:`.optim`: AdamW parameter groups and the per-iteration learning-rate schedule;
* :mod:`.precision`: mixed precision (autocast, loss scaler) and the EMA of the weights;
* :mod:`.loops`: one training epoch and one evaluation pass;
* :mod:`.state`: the training checkpoint (atomic saves, restoration).

Data order is a function of (seed, epoch): the sampler is a
DistributedSampler (also with one process) whose permutation depends on
seed + epoch, and the loader's generator, which seeds the workers'
augmentation streams, is re-seeded from (seed, epoch, rank) every epoch.
With ``num_workers = 0`` the augmentations draw from the global torch RNG,
which the checkpoint restores. So resuming from the checkpoint written at
the end of an epoch replays the following epochs exactly.
"""
