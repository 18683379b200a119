"""The fused update as one GPU kernel launch per parameter.

``source`` assembles the kernel text (the body shared by Metal and CUDA lives in the package
``mlx_rmsprop.metal``), ``launch`` sets up each call, ``metal`` and ``cuda`` are the two
launchers the path registry (:mod:`mlx_rmsprop.paths`) loads, and ``variants`` lists the
variants that verification runs.
"""
