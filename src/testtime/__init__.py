"""testtime: test-time adaptation (`testtime.adapt`) and test-time scaling (`testtime.scale`)."""

__version__ = "0.1.0"

from testtime import data
from testtime.adapt import AdaptedModel, adapt, get_method, list_methods
from testtime.data import cifar10c_stream, make_stream
from testtime.errors import ConfigError, DataError, ModelError, TestTimeError
from testtime.models.zoo import load_model

__all__ = [
    "AdaptedModel",
    "ConfigError",
    "DataError",
    "ModelError",
    "TestTimeError",
    "__version__",
    "adapt",
    "cifar10c_stream",
    "data",
    "get_method",
    "list_methods",
    "load_model",
    "make_stream",
]
