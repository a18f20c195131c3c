"""Models: ``network`` (the smp networks, ``ARCHS``, any input size) and ``weights``
(pretrained encoder weights through smp's and timm's own loaders and caches)."""
