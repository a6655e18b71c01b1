r"""PyG transforms for Orbit Diffusion (``torch_geometric.transforms.BaseTransform`` subclasses).

Functional names are registered with an ``orbit_`` prefix (``orbit_center``, ``orbit_random_action``,
``orbit_structure``, ``orbit_noise``).

A pipeline that adopts Orbit Diffusion changes two things: the dataset gets
:class:`OrbitNoise` (or the training loop calls :class:`BatchedOrbitNoise` on each batch), and the
loop regresses the model's output onto ``batch.target`` instead of the noise it drew itself.
"""
from .attach_orbit_structure import AttachOrbitStructure
from .center_positions import CenterPositions
from .orbit_noise import BatchedOrbitNoise, OrbitNoise
from .random_orbit_action import RandomOrbitAction

__all__ = ["CenterPositions", "RandomOrbitAction", "AttachOrbitStructure", "OrbitNoise", "BatchedOrbitNoise"]
