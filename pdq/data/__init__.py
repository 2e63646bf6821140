from pdq.data.base import DataModule
from pdq.data.fashion_mnist import FashionMNISTDataModule, read_idx
from pdq.data.folder import FolderDataModule
from pdq.data.imagenet import ImageNetDataModule
from pdq.data.synthetic import SyntheticDataModule

__all__ = ["DataModule", "FashionMNISTDataModule", "FolderDataModule", "ImageNetDataModule", "SyntheticDataModule",
           "read_idx"]
