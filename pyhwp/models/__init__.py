"""Small reference models for demos and evidence."""

from pyhwp.models.digits_cnn import DigitsCNN, train_digits_cnn

__all__ = ["DigitsCNN", "train_digits_cnn"]
