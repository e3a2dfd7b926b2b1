"""Device code only: @triton.jit kernels, installed as ``fusedpg.kernels``. No autograd, no host-side policy."""
