// The fused RMSprop update as an MLX primitive: one graph node that reads the scalars vector,
// the gradient, the parameter and its state buffers and writes the new parameter and buffers;
// and the node that runs several parameters' updates as one.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <utility>
#include <vector>

#include "mlx/array.h"
#include "mlx/primitives.h"

#include "accumulation.h"

namespace mlx_rmsprop {

namespace mx = mlx::core;

// Below this many elements one thread runs the whole update. Measured on the 2-core CI machine
// (centered + momentum, float32, in cache): with the second core idle, 2^16 elements take 98 us
// on one thread and 56 us on two (2^20: 1660 against 743 us); with it busy elsewhere, offering
// parts costs 1-5% (the caller claims them itself). Smaller updates take under ~50 us, where a
// worker's wake-up is a sizeable share.
constexpr int64_t kParallelThreshold = int64_t(1) << 16;

// The number of state arrays `flags` asks for, in mlx_rmsprop.spec.UpdateOptions.state_keys
// order: v, then grad_avg (centered), momentum_buffer (momentum), each followed by its scales
// with quantized_state, then ema (EMA).
int state_buffer_count(uint32_t flags);

// Whether the update with these flags and primitive inputs rounds a store stochastically:
// stochastic_rounding, float32 arithmetic and a float16/bfloat16 output.
bool stochastic_stores(uint32_t flags, const std::vector<mx::array>& inputs);

class RMSpropUpdate;

// One update before its node is made: its checked inputs, its outputs' shapes and dtypes, and
// its primitive.
struct UpdateNode {
  std::vector<mx::array> inputs;
  std::vector<mx::Shape> shapes;
  std::vector<mx::Dtype> dtypes;
  std::shared_ptr<RMSpropUpdate> update;
};

// Checks the arguments of one parameter's update and describes its node on the CPU stream,
// whose outputs are {new parameter, new state arrays...}, each with the shape and dtype of the
// array it replaces. Arithmetic runs in scalars.dtype (float32 or float64). With
// quantized_state, v, grad_avg and momentum_buffer are uint8 codes with float32 scales per
// `block_size` elements; `index` is the parameter's position in the step, which stochastic
// rounding hashes. `factors`: a (parameters, 2) float32/float64 matrix whose row `index`
// replaces the scalars' CLIP_MULTIPLIER and CLIP_DIVISOR (clipping by each parameter's own
// norm, mlx_rmsprop/reference.py): read where it lies, so the step needs no node per
// parameter to pick its row. With `accumulation` on, the update first accumulates
// (accumulation.h): `accumulator` (shaped like the parameter, any floating dtype) and
// `accumulation_gates` (float32 (applies, skip)) are read, the gradient it steps with is the
// mean, and the new accumulator is the last output. Throws std::invalid_argument naming the bad
// argument.
UpdateNode update_node(
    const mx::array& scalars,
    const mx::array& gradient,
    const mx::array& parameter,
    const std::vector<mx::array>& state,
    uint32_t flags,
    int block_size,
    int64_t index,
    const std::optional<mx::array>& factors = std::nullopt,
    const Accumulation& accumulation = {},
    const std::optional<mx::array>& accumulator = std::nullopt,
    const std::optional<mx::array>& accumulation_gates = std::nullopt);

// The node's outputs (an RMSpropUpdate node).
std::vector<mx::array> rmsprop_update(UpdateNode node);

// Several updates as one node (RMSpropUpdateGroup): the outputs of each member in turn, each
// member's as rmsprop_update would return them. The members may differ in anything. A single
// update is its own RMSpropUpdate node.
std::vector<mx::array> rmsprop_update_group(std::vector<UpdateNode> members);

// The same update built from MLX ops, following mlx_rmsprop/reference.py section by section
// (transforms.cpp): what the primitive's vjp, jvp and vmap differentiate or batch. Takes the
// primitive's inputs and returns its outputs.
std::vector<mx::array> update_ops(const std::vector<mx::array>& inputs, uint32_t flags);

class RMSpropUpdate : public mx::Primitive {
 public:
  // block_size, index, whether the factors matrix is an input and the accumulation are
  // attributes (not compiled code): one node type serves all.
  RMSpropUpdate(
      mx::Stream stream,
      uint32_t flags,
      int block_size,
      uint32_t index,
      bool has_factors = false,
      Accumulation accumulation = {})
      : mx::Primitive(stream),
        flags_(flags),
        block_size_(block_size),
        index_(index),
        has_factors_(has_factors),
        accumulation_(accumulation) {}

  // inputs: {scalars, gradient, parameter, state..., [factors], [accumulator, accumulation
  // gates]}; outputs: {parameter, state..., [accumulator]}. An output reuses its input's memory
  // when MLX says that input is donatable.
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;

  // Transforms run on update_ops (the reference's ops); vmap with unbatched scalars stays one
  // RMSpropUpdate node over the batched arrays. With quantized_state (and vmap with stochastic
  // rounding that rounds a store) they throw std::invalid_argument naming the flag.
  std::vector<mx::array> jvp(
      const std::vector<mx::array>& primals,
      const std::vector<mx::array>& tangents,
      const std::vector<int>& argnums) override;
  std::vector<mx::array> vjp(
      const std::vector<mx::array>& primals,
      const std::vector<mx::array>& cotangents,
      const std::vector<int>& argnums,
      const std::vector<mx::array>& outputs) override;
  std::pair<std::vector<mx::array>, std::vector<int>> vmap(
      const std::vector<mx::array>& inputs,
      const std::vector<int>& axes) override;

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  bool is_equivalent(const mx::Primitive& other) const override;
  const char* name() const override {
    return "RMSpropUpdate";
  }

  uint32_t flags() const {
    return flags_;
  }
  // The inputs its outputs replace, in the outputs' order: each output has its input's shape
  // and dtype.
  std::vector<mx::array> replaced(const std::vector<mx::array>& inputs) const;
  int block_size() const {
    return block_size_;
  }
  uint32_t index() const {
    return index_;
  }
  bool has_factors() const {
    return has_factors_;
  }
  const Accumulation& accumulation() const {
    return accumulation_;
  }

 private:
  // Throws std::invalid_argument when `transform` cannot follow the reference for a storage
  // flag of this node.
  void require_transformable(const char* transform, const std::vector<mx::array>& inputs) const;

  // The inputs with the factors' row spliced into the scalars (and the factors dropped): what
  // update_ops takes. `inputs` hold no accumulation inputs.
  std::vector<mx::array> spliced(const std::vector<mx::array>& inputs) const;

  // The node's outputs from MLX ops (accumulate_ops, then update_ops on the spliced inputs):
  // what vjp, jvp and (with accumulation or factors) vmap transform.
  std::vector<mx::array> ops(const std::vector<mx::array>& inputs) const;

  // Inputs after the state buffers: the factors, then the accumulator and its gates.
  int trailing_inputs() const {
    return (has_factors_ ? 1 : 0) + (accumulation_.on() ? 2 : 0);
  }

  uint32_t flags_;
  int block_size_;
  uint32_t index_;
  bool has_factors_;
  Accumulation accumulation_;
};

// Several parameters' updates as one node: each member is an RMSpropUpdate with its inputs and
// outputs, laid out one member after the other (rmsprop_update_group puts the last first).
// Inputs that members share (the scalars vector, the factors, the gates) appear once per
// member. The node's task cuts every member into parts and hands them all to the worker
// threads at once, so a tree of many medium tensors waits for the workers once per group, not
// once per tensor (mlx_rmsprop/paths/native/__init__.py: GROUP_PARAMETERS, with figures).
class RMSpropUpdateGroup : public mx::Primitive {
 public:
  struct Member {
    std::shared_ptr<RMSpropUpdate> update;
    size_t inputs; // its inputs in the node's list
    size_t outputs; // its outputs
  };

  RMSpropUpdateGroup(mx::Stream stream, std::vector<Member> members)
      : mx::Primitive(stream), members_(std::move(members)) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;

  // Each member's transform of its own inputs (RMSpropUpdate's), the results laid out as the
  // node's.
  std::vector<mx::array> jvp(
      const std::vector<mx::array>& primals,
      const std::vector<mx::array>& tangents,
      const std::vector<int>& argnums) override;
  std::vector<mx::array> vjp(
      const std::vector<mx::array>& primals,
      const std::vector<mx::array>& cotangents,
      const std::vector<int>& argnums,
      const std::vector<mx::array>& outputs) override;
  std::pair<std::vector<mx::array>, std::vector<int>> vmap(
      const std::vector<mx::array>& inputs,
      const std::vector<int>& axes) override;

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  bool is_equivalent(const mx::Primitive& other) const override;
  const char* name() const override {
    return "RMSpropUpdateGroup";
  }

 private:
  // Calls visit(member, its inputs, the position of its first input) for each member.
  template <typename Visit>
  void for_each_member(const std::vector<mx::array>& inputs, Visit visit) const {
    size_t first = 0;
    for (const Member& member : members_) {
      visit(
          member,
          std::vector<mx::array>(
              inputs.begin() + first, inputs.begin() + first + member.inputs),
          first);
      first += member.inputs;
    }
  }

  std::vector<Member> members_;
};

// Threads a large update is split across (the caller's included).
int worker_threads();

// Which build of the 8-bit and stochastic-rounding loops runs: "avx2" or "baseline".
const char* storage_loops_name();

} // namespace mlx_rmsprop
