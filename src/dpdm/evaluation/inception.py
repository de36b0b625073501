"""FID proper: torchmetrics' FrechetInceptionDistance with the standard Inception-v3 weights, offline.

The standard weights are the 2015-12-05 TensorFlow Inception graph ported to PyTorch
(torch-fidelity's `weights-inception-2015-12-05-6726825d.pth`; pytorch-fid publishes the same file as
`pt_inception-2015-12-05-6726825d.pth`). They are read from `weights_path` if given, else from the torch
hub cache; when the cache lacks them they are downloaded into it on first use (`fid.download`, on by
default) and kept only if their sha256 is the standard one. Offline, or when a file is not byte-identical
to the standard one, FID is *unavailable* (`FIDUnavailable`, whose message says how to provide the file):
another network's distance is never reported as FID.
"""
from __future__ import annotations

import socket
from pathlib import Path

import torch

from dpdm.evaluation.frechet import FrechetDistance
from dpdm.utils.checksums import sha256_file
from dpdm.utils.files import atomic_path

__all__ = [
    "FIDUnavailable",
    "INCEPTION_FILENAMES",
    "INCEPTION_SHA256",
    "INCEPTION_URL",
    "inception_frechet_distance",
    "download_inception_weights",
    "resolve_inception_weights",
]

INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
# torch hub names files <stem>-<first 8 hex of sha256>.pth; both published names carry the same bytes.
INCEPTION_FILENAMES = ("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth")
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"


class FIDUnavailable(RuntimeError):
    """FID cannot be computed here; the message says why and how to fix it."""


def hub_checkpoint_dir() -> Path:
    """Where torch hub keeps downloaded weights: $TORCH_HOME/hub/checkpoints (default ~/.cache/torch/...)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _how_to_provide(looked_at: list[Path]) -> str:
    places = ", ".join(str(p) for p in looked_at)
    return (f"FID unavailable: the standard Inception-v3 weights (2015-12-05) were not found (looked at: "
            f"{places}). On a machine with internet, download {INCEPTION_URL} "
            f"(sha256 {INCEPTION_SHA256}) and either pass its path as "
            f"fid.weights_path=<file> or copy it into {hub_checkpoint_dir()}/ "
            "(the torch hub cache; set TORCH_HOME to move it). No other network is substituted for FID; "
            "fd_classifier is the offline progress metric.")


def download_inception_weights(url: str = INCEPTION_URL, *, progress: bool = True) -> Path:
    """Download the standard weights into the torch hub cache; kept only if the sha256 is the standard one.

    Written beside the target under a temporary name (utils.files.atomic_path), so an interrupted or wrong
    download never sits where a later run would find it. `FIDUnavailable` (with the reason and the manual
    way) when it cannot be done.
    """
    target = hub_checkpoint_dir() / INCEPTION_FILENAMES[0]
    # torch.hub's urlopen has no timeout of its own: behind a firewall that drops packets it would wait
    # forever. A minute without data ends the attempt.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(60)
    try:
        with atomic_path(target, suffix=".partial") as partial:
            try:
                torch.hub.download_url_to_file(url, str(partial), progress=progress)
            except Exception as e:  # noqa: BLE001 - URLError, HTTPError, OSError, timeouts: all mean "not here"
                raise FIDUnavailable(f"{_how_to_provide([target])} (Downloading {url} failed: {e})") from e
            if (digest := sha256_file(partial)) != INCEPTION_SHA256:
                raise FIDUnavailable(f"FID unavailable: the file downloaded from {url} has sha256 {digest}, not "
                                     f"the standard {INCEPTION_SHA256}; it was deleted. {_how_to_provide([target])}")
    finally:
        socket.setdefaulttimeout(previous)
    return target


def resolve_inception_weights(*, weights_path: str | Path | None = None, verify: bool = True,
                              download: bool = True, url: str = INCEPTION_URL) -> Path:
    """The local standard-weights file, or `FIDUnavailable` saying how to provide it.

    An explicit `weights_path` is the only place looked at when given (a typo must not fall back to
    some other file, nor trigger a download). Otherwise the torch hub cache, downloading into it when
    `download` and the file is not there yet. With `verify`, the file must have the standard sha256.
    """
    if weights_path is not None:
        candidates = [Path(weights_path).expanduser()]
    else:
        candidates = [hub_checkpoint_dir() / name for name in INCEPTION_FILENAMES]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None and weights_path is None and download:
        found = download_inception_weights(url)
    if found is None:
        raise FIDUnavailable(_how_to_provide(candidates))
    if verify and (digest := sha256_file(found)) != INCEPTION_SHA256:
        raise FIDUnavailable(
            f"FID unavailable: {found} is not the standard Inception-v3 file (sha256 {digest}, expected "
            f"{INCEPTION_SHA256}); a distance under other weights is not comparable with published FIDs. "
            f"Replace it with {INCEPTION_URL}, or pass fid.verify_weights=false to use it anyway "
            "(eval.json then records the weights as unverified).")
    return found


def _grey_to_rgb(images: torch.Tensor) -> torch.Tensor:
    # The paper's protocol: a grey image is the same image in all three channels.
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def inception_frechet_distance(*, weights_path: str | Path, antialias: bool = False,
                               device: torch.device | str = "cpu") -> FrechetDistance:
    """FID on 2048-d pool3 features. uint8 images of any size are resized to 299×299 inside.

    `antialias=False` resizes like TensorFlow 1.x bilinear (torch-fidelity's TF-compatible
    interpolation), which is how the reference FID implementations and the paper's numbers resize.
    """
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE
    except ImportError as e:  # pragma: no cover - torchmetrics is a hard dependency
        raise FIDUnavailable(f"FID unavailable: torchmetrics cannot be imported ({e})") from e
    if not _TORCH_FIDELITY_AVAILABLE:
        raise FIDUnavailable("FID unavailable: torchmetrics' Inception network needs torch-fidelity; "
                             "install it with `pip install torch-fidelity`.")
    metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(weights_path),
                                      antialias=antialias, normalize=False)
    return FrechetDistance(metric=metric, prepare=_grey_to_rgb, device=device)
