// Stand-in for CUDA's cooperative_groups.h, which only device compilation accepts: MLX includes
// it in every custom kernel and aliases its namespace; the kernel body does not use it.
#pragma once

namespace cooperative_groups {}
