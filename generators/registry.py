"""Imports every generator, which registers it under the name the build asks for
(``rt3d_conv3d_dense``, ``rt3d_conv3d_sparse``, see :mod:`.__main__`)."""

from . import conv3d_dense, conv3d_sparse  # noqa: F401  (the imports register the generators)
