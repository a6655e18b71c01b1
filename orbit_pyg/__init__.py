"""orbit_pyg: Orbit Diffusion (Rao-Blackwellized symmetry-orbit targets) for PyTorch Geometric.

The core layer is pure torch + torch_geometric: schedules, kernels, orbits, the estimator,
losses and diagnostics. Adapters to pymatgen / ASE / RDKit / matbench live in
``orbit_pyg.integrations``.
"""
from . import diagnostics, estimator, kernels, orbits, schedules
from .estimator import OrbitEstimate, effective_sample_size, orbit_estimate
from .kernels import GaussianKernel, WrappedNormalKernel
from .losses import MODES, PARAMETERIZATIONS, NoisyBatch, OrbitDiffusionLoss
from .orbits import (
    O3,
    SO3,
    ExplicitPermutations,
    FiniteGroup,
    Orbit,
    OrbitCandidates,
    OrbitContext,
    ProductOrbit,
    SpeciesPermutation,
)
from .schedules import FlowSchedule, NoiseSchedule, VESchedule, VPSchedule

__version__ = "0.1.0"

__all__ = [
    "OrbitDiffusionLoss", "NoisyBatch", "MODES", "PARAMETERIZATIONS",
    "orbit_estimate", "OrbitEstimate", "effective_sample_size",
    "GaussianKernel", "WrappedNormalKernel",
    "NoiseSchedule", "VPSchedule", "VESchedule", "FlowSchedule",
    "Orbit", "OrbitCandidates", "OrbitContext", "ProductOrbit",
    "SO3", "O3", "SpeciesPermutation", "ExplicitPermutations", "FiniteGroup",
    "diagnostics", "estimator", "kernels", "orbits", "schedules",
]
