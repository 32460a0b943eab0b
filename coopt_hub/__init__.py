"""coopt-hub: collaborative data optimization (CoOpt) on the Hugging Face Hub."""

from coopt_hub._env import configure_blas_environment, configure_hub_environment

__version__ = "0.1.0"

configure_hub_environment()
configure_blas_environment()
