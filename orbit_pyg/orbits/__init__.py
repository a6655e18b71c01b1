"""Group orbits acting on node positions (see :mod:`orbit_pyg.orbits.base` for the interface)."""
from .base import Orbit, OrbitCandidates, OrbitContext, ProductOrbit, apply_element
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

__all__ = [
    "Orbit", "OrbitCandidates", "OrbitContext", "ProductOrbit", "apply_element",
    "SO3", "O3", "SpeciesPermutation", "ExplicitPermutations", "FiniteGroup", "species_classes",
    "random_rotations", "quaternion_to_matrix", "axis_angle_to_matrix", "rotation_angle", "kabsch",
]
