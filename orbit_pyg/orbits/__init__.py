"""Group orbits acting on node positions (see :mod:`orbit_pyg.orbits.base` for the interface)."""
from .base import Orbit, OrbitCandidates, OrbitContext, ProductOrbit, apply_element
from .matrix_fisher import matrix_fisher_mean, matrix_fisher_moments, proper_svd
from .permutation import ExplicitPermutations, FiniteGroup, SpeciesPermutation, species_classes
from .rotation import (
    O3,
    SO3,
    axis_angle_to_matrix,
    kabsch,
    quaternion_to_matrix,
    random_rotations,
    rotation_angle,
)
from .torus_quadrature import circular_least_squares_mean, shift_marginal

__all__ = [
    "Orbit", "OrbitCandidates", "OrbitContext", "ProductOrbit", "apply_element",
    "SO3", "O3", "SpeciesPermutation", "ExplicitPermutations", "FiniteGroup", "species_classes",
    "random_rotations", "quaternion_to_matrix", "axis_angle_to_matrix", "rotation_angle", "kabsch",
    "matrix_fisher_mean", "matrix_fisher_moments", "proper_svd", "shift_marginal", "circular_least_squares_mean",
]
