"""Running the generated Metal kernels on the CPU (g++ + metal_shim.h) for the tests."""
