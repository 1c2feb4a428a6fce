"""Checkpoint conversion from and to other BASED implementations (`based convert`)."""
from .hazyresearch import (
    ConversionError,
    config_from_hazyresearch,
    config_to_hazyresearch,
    load_hazyresearch,
    read_state_dict,
    save_hazyresearch,
    state_dict_from_hazyresearch,
    state_dict_to_hazyresearch,
)

FORMATS = ("hazyresearch",)

__all__ = [
    "FORMATS", "ConversionError", "config_from_hazyresearch", "config_to_hazyresearch", "load_hazyresearch",
    "read_state_dict", "save_hazyresearch", "state_dict_from_hazyresearch", "state_dict_to_hazyresearch",
]
