"""The version of mmcore: the one place it is written.

``pyproject.toml`` reads it from here at build time (scikit-build-core's regex metadata
provider), the build passes it to the native module (``mmcore._C.__version__``), and
``mmcore.__version__``, ``mmcore info`` and the ``mmcore_version`` field of model directories
import it.
"""

__version__ = "0.1.0"
