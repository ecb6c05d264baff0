"""Small built-in data sets (shipped with their libraries; nothing is downloaded)."""

from pyhwp.data.digits import DigitsData, digits_loaders, load_digits

__all__ = ["DigitsData", "digits_loaders", "load_digits"]
