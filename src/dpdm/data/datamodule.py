"""LightningDataModule over the cached datasets (MNIST, Fashion-MNIST, CelebA 32x32, your own images) with
Poisson sampling."""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from opacus.data_loader import DPDataLoader
from torch.utils.data import DataLoader, Dataset, Subset

from dpdm.data.cache import DatasetMissingError, dataset_dir, default_data_dir, is_written, load_split
from dpdm.data.preparation import prepare
from dpdm.data.registry import dataset_info
from dpdm.data.user_data import USER_KINDS, UserDataset, import_user_data, load_user_data, user_cache_dir
from dpdm.utils.images import from_uint8
from dpdm.utils.seeds import derived_seed, os_seed

__all__ = ["ImageDataModule", "UInt8ImageDataset", "batch_passthrough"]


class UInt8ImageDataset(Dataset):
    """In-memory uint8 images served as float32 in [-1, 1].

    Keeping uint8 in memory is 4x smaller than float; converting a whole
    batch at once in ``__getitems__`` (which DataLoader prefers over
    per-item ``__getitem__``) keeps Python overhead per batch, not per image.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.to(torch.int64)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return from_uint8(self.images[index]), self.labels[index]

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        # An empty index list yields (0, C, H, W) / (0,) tensors directly, so
        # empty Poisson batches never depend on a collate fallback.
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return from_uint8(self.images[idx]), self.labels[idx]


def batch_passthrough(batch: Any) -> Any:
    """Collate for datasets whose ``__getitems__`` already returns a batch.

    Module level (not a lambda) so loaders with worker processes can pickle it.
    """
    return batch


def training_subset(num_images: int, subset_size: int | None, seed: int) -> torch.Tensor | None:
    """Indices of the seeded subset a run with `data.subset_size` trains on; None when it trains on all.

    Own generator: choosing the subset must not advance the sampling stream, and a given seed always
    picks the same images (so `dpdm-audit memorization --run` can compare samples with what was seen).
    """
    if subset_size is None or subset_size >= num_images:
        return None
    return torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))[:subset_size]


class ImageDataModule(pl.LightningDataModule):
    def __init__(
        self,
        name: str,
        data_dir: str | None = None,
        batch_size: int = 256,
        poisson_sampling: bool = True,
        num_workers: int = 0,
        eval_batch_size: int = 1000,
        subset_size: int | None = None,
        seed: int = 0,
        sampler_seed: int | None = None,
        path: str | None = None,
        resolution: int | None = None,
        examples_per_person: int = 1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        # Built-in datasets are described by the registry; your own (data=image_folder|npz) by their import.
        self.user_kind = name if name in USER_KINDS else None
        self.info = None if self.user_kind else dataset_info(name)
        self.user_meta: UserDataset | None = None
        self.path, self.resolution = path, resolution
        if self.user_kind and not path:
            what = "folder of images" if name == "image_folder" else "npz file"
            raise ValueError(f"data={name} needs data.path=<the {what}> (docs/data.md)")
        for label, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if int(value) < 1:
                raise ValueError(f"{label} must be >= 1, got {value}")
        if subset_size is not None and subset_size < 1:
            raise ValueError(f"subset_size must be >= 1 or None, got {subset_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if int(examples_per_person) < 1:
            raise ValueError(f"examples_per_person must be >= 1, got {examples_per_person}")
        # The privacy unit is one example; with k per person, ε per person is reported too (group privacy).
        self.examples_per_person = int(examples_per_person)
        self.name = name
        self.data_dir = data_dir
        self.batch_size = int(batch_size)
        self.poisson_sampling = poisson_sampling
        self.num_workers = num_workers
        self.eval_batch_size = int(eval_batch_size)
        self.subset_size = subset_size
        self.seed = seed
        # Created once here, never in setup(): Lightning restores it through
        # load_state_dict() after setup() when resuming, and setup() may run
        # once per stage.
        # Privacy amplification by subsampling assumes the adversary cannot know which examples are in
        # which batch: the Poisson sampler is seeded from OS entropy unless sampler_seed is given (for
        # reproducible runs, which void the guarantee against whoever knows that seed).
        self.sampler_seed_known = sampler_seed is not None
        if sampler_seed is None:
            sampler_seed = os_seed()
        self.sampler_generator = torch.Generator().manual_seed(int(sampler_seed))
        self.train_set: UInt8ImageDataset | None = None
        self.test_set: UInt8ImageDataset | None = None

    # ------------------------------------------------------------ data

    def _root(self) -> Path:
        return Path(self.data_dir).expanduser().resolve() if self.data_dir else default_data_dir()

    @functools.cached_property
    def cache_dir(self) -> Path:
        """Where this dataset's verified cache is. For your own images the folder's name hashes every
        source file's size and time, so it is computed once per data module."""
        if self.user_kind:
            return user_cache_dir(self.user_kind, self.path, data_dir=self._root(), resolution=self.resolution)
        return dataset_dir(self.name, self.data_dir)

    def is_prepared(self) -> bool:
        """Whether the cache was written to the end. Its files are verified when `setup` reads them (once
        per run: hashing a dataset twice would double the start-up time)."""
        return is_written(self.cache_dir)

    def prepare_data(self) -> None:
        """Fill the verified cache if this dataset is not in it yet (`dpdm-data` does the same ahead of
        time; your own images are imported). Lightning calls this on one process per node; dpdm-train
        calls it before `setup`, because the privacy plan needs N. Datasets that cannot be fetched
        (celeba32) say what to do instead. A damaged cache is reported by `setup`, with what to do."""
        if self.is_prepared():
            return
        if self.user_kind:
            import_user_data(self.user_kind, self.path, data_dir=self._root(), resolution=self.resolution,
                             say=lambda m: print(m, file=sys.stderr, flush=True))
        else:
            prepare(self.name, data_dir=self.data_dir, progress=True)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None and stage in (None, "fit"):
            images, labels = self._load_train()
            if (keep := training_subset(images.shape[0], self.subset_size, self.seed)) is not None:
                images, labels = images[keep], labels[keep]
            if self.batch_size > images.shape[0]:
                raise ValueError(
                    f"batch_size {self.batch_size} exceeds the {images.shape[0]} training examples; "
                    "the Poisson sample rate batch_size/num_train must be in (0, 1]"
                )
            self.train_set = UInt8ImageDataset(images, labels)
        if self.test_set is None and not self.user_kind and stage in (None, "fit", "validate", "test", "predict"):
            self.test_set = UInt8ImageDataset(*load_split(self.name, "test", data_dir=self.data_dir))

    def _load_train(self):
        if not self.user_kind:
            return load_split(self.name, "train", data_dir=self.data_dir)
        if self.is_prepared():
            images, labels, self.user_meta = load_user_data(self.cache_dir)
            return images, labels
        raise DatasetMissingError(f"data.path={self.path} is not imported yet (prepare_data imports it; "
                                  "dpdm-train does so itself)")

    def _train(self) -> UInt8ImageDataset:
        if self.train_set is None:
            self.setup("fit")
        assert self.train_set is not None
        return self.train_set

    def _test(self) -> UInt8ImageDataset:
        if self.user_kind:
            raise ValueError(f"data={self.user_kind} has no test split: the evaluation callbacks and metrics "
                             "that compare with real test data need a built-in dataset")
        if self.test_set is None:
            self.setup("test")
        assert self.test_set is not None
        return self.test_set

    # ------------------------------------------------------------ properties

    @property
    def num_train(self) -> int:
        return len(self._train())

    @property
    def sample_rate(self) -> float:
        """Poisson sampling probability q = batch_size / num_train."""
        return self.batch_size / self.num_train

    @property
    def expected_batch_size(self) -> int:
        return self.batch_size

    def _user_meta(self) -> UserDataset:
        if self.user_meta is None:
            self._train()
        assert self.user_meta is not None
        return self.user_meta

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self._user_meta().image_shape if self.user_kind else self.info.image_shape

    @property
    def num_classes(self) -> int:
        return self._user_meta().num_classes if self.user_kind else self.info.num_classes

    # ------------------------------------------------------------ loaders

    def _rank_and_world_size(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def train_dataloader(self) -> DataLoader:
        dataset = self._train()
        rank, world_size = self._rank_and_world_size()
        if self.poisson_sampling:
            generator = self.sampler_generator
            if world_size > 1:
                # Data-parallel DP-SGD: rank r Poisson-samples its disjoint shard (every world_size-th
                # example) at the *global* rate q = B/N with its own independent stream. Every example
                # is then in the step's batch independently with probability q: the union of the local
                # batches is a Poisson sample of the whole dataset, as in one process. Every rank yields
                # ⌊1/q⌋ batches, empty ones included, so all ranks take the same steps in lockstep.
                dataset = Subset(dataset, range(rank, len(dataset), world_size))
                seed = int(torch.randint(0, 2**62, (1,), generator=self.sampler_generator))
                generator = torch.Generator().manual_seed(derived_seed(seed, rank))
            return DPDataLoader(
                dataset,
                sample_rate=self.sample_rate,
                generator=generator,
                collate_fn=batch_passthrough,
                num_workers=self.num_workers,
            )
        if world_size > 1:
            raise ValueError("data.poisson_sampling=false (a non-private run) is single-process only; "
                             "trainer=ddp needs Poisson sampling (privacy enabled)")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=False,
            generator=self.sampler_generator,
            collate_fn=batch_passthrough,
            num_workers=self.num_workers,
        )

    def _eval_loader(self) -> DataLoader:
        return DataLoader(
            self._test(),
            batch_size=self.eval_batch_size,
            shuffle=False,
            collate_fn=batch_passthrough,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader()

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader()

    # ------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        # As the DP noise (module.on_save_checkpoint): the batches continue from the checkpoint only when
        # the sampler seed is known anyway; otherwise a resume samples fresh OS-entropy batches, so runs
        # forked from one checkpoint do not replay the same batches.
        if not self.sampler_seed_known:
            return {}
        return {"sampler_generator_state": self.sampler_generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "sampler_generator_state" not in state_dict or not self.sampler_seed_known:
            return  # keep this process's fresh OS-entropy stream
        # A checkpoint loaded with a GPU map_location may hand back a CUDA
        # tensor; generator state must be a CPU ByteTensor.
        state = torch.as_tensor(state_dict["sampler_generator_state"]).to("cpu", torch.uint8)
        self.sampler_generator.set_state(state)

