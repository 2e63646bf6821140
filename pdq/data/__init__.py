from pdq.data.fashion_mnist import FashionMNISTDataModule, read_idx
from pdq.data.folder import FolderDataModule
from pdq.data.imagenet import ImageNetDataModule

__all__ = ["FashionMNISTDataModule", "FolderDataModule", "ImageNetDataModule", "read_idx"]
