"""The RAT+ layer on megatron-core: the mixer and its submodules, specs, and its context-parallel maths."""
