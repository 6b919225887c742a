"""Every generator of the package, by the registered name the build asks for."""

from .conv3d_dense import DenseConv3dGenerator
from .conv3d_sparse import SparseConv3dGenerator

GENERATORS = {"dense": DenseConv3dGenerator, "sparse": SparseConv3dGenerator}
