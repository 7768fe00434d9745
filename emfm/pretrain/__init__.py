"""Self-supervised objectives; importing the package registers every method in ``METHODS``."""

from emfm.pretrain import densecl, mae, mim, mocov3, restore, simclr  # noqa: F401  (registration)
