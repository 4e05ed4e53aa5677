"""Bagged ensembles of torchvision ResNet/ResNeXt classifiers, trained and soft-voted on Ray."""

__version__ = "0.1.0"
