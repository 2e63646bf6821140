from pdq.data.fashion_mnist import FashionMNISTDataModule, read_idx
from pdq.data.imagenet import ImageNetDataModule

__all__ = ["FashionMNISTDataModule", "ImageNetDataModule", "read_idx"]
