"""testtime: test-time adaptation (`testtime.adapt`) and test-time scaling (`testtime.scale`)."""

__version__ = "0.1.0"

from testtime.adapt import AdaptedModel, adapt, get_method, list_methods
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
    "get_method",
    "list_methods",
    "load_model",
]
