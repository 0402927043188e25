// File: allreduce.hpp — bucketed, overlapped all-reduce of replicated (dense) gradients, and the
// global gradient norm over dense and expert parameters.
//
// Notation: P ranks; N total elements of the dense gradients; B bucket size in elements.
//
// The dense gradients, in the order backward finishes them, are laid end to end in one virtual
// flat array of N elements which is cut into buckets of B elements (the last may be shorter), so
// a bucket boundary may fall inside a tensor and no bucket exceeds B (B <= INT_MAX: MPI counts
// never overflow). Bucket b is launched with MPI_Iallreduce as soon as every tensor overlapping
// it is marked ready, and buckets are launched strictly in the order 0, 1, 2, ...: every rank
// issues the same non-blocking collectives in the same order even if ranks were to mark tensors
// in different orders. A bucket lying inside one contiguous tensor is reduced in place; the
// others are packed into a staging buffer that is allocated once.
//
// Each element ends as scale * (sum over ranks), with scale = options.scale / P when averaging,
// options.scale otherwise: the same as one MPI_Allreduce(MPI_SUM) per tensor followed by that
// multiplication (bitwise for P <= 2; for larger P an MPI library may add in a different order
// for a different message size, so agreement is to float rounding).
//
// The reducer works on its own duplicate of the communicator, so its pending requests never
// interleave with the MoE exchange's collectives on the caller's communicator.
//
// Per step:
//   reducer.begin();                       // local: resets the ready flags
//   ... backward: reducer.mark_ready(i) once gradient i is final (main thread only) ...
//   reducer.finish();                      // collective: launches the rest, waits, scales
// or reducer.all_reduce() for the blocking path (the same buckets, the same result).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "comm/communicator.hpp"
#include "runtime/tensor.hpp"

namespace moe::comm {

struct AllReduceOptions {
  int64_t bucket_bytes = int64_t{25} << 20;  // comm.bucket_mb; clamped to [4, 4 * INT_MAX]
  bool average = true;                       // divide the sum by P
  float scale = 1.0f;                        // extra factor on the (averaged) sum
};

class GradientAllReducer {
 public:
  // grads: the replicated gradients in the order backward finishes them; the views must stay
  // valid for the reducer's life. Collective over `comm` (duplicates it).
  GradientAllReducer(const Communicator& comm, std::vector<View> grads,
                     AllReduceOptions options = {});
  // Waits for requests still in flight (a step abandoned by an exception) without throwing.
  ~GradientAllReducer();
  GradientAllReducer(const GradientAllReducer&) = delete;
  GradientAllReducer& operator=(const GradientAllReducer&) = delete;

  // Starts a step: every gradient not ready, no bucket launched. Local.
  void begin();
  // Gradient i is final: launches every bucket, in order, whose tensors are all ready. Also
  // lets MPI progress requests already in flight. Collective in effect (it may start
  // MPI_Iallreduce); call from the thread that initialised MPI.
  void mark_ready(size_t i);
  // Launches the buckets not yet launched (treating unmarked gradients as ready), waits for all
  // and writes the scaled results into the gradients. Collective.
  void finish();
  // Blocking path: begin(), then finish(). Collective.
  void all_reduce();

  size_t n_tensors() const { return grads_.size(); }
  size_t n_buckets() const { return buckets_.size(); }
  int64_t bucket_elems() const { return bucket_elems_; }
  int64_t numel() const { return numel_; }
  // Buckets launched so far in this step (how much overlapped with backward).
  size_t n_launched() const { return next_launch_; }

 private:
  // Flat elements [begin, begin + n) of tensor `tensor` live at bucket offset `offset`.
  struct Segment {
    size_t tensor;
    int64_t begin, n, offset;
  };
  struct Bucket {
    int64_t n = 0;
    std::vector<Segment> segments;
    float* data = nullptr;  // in place in a tensor, or in staging_
    bool in_place = false;
    int pending = 0;  // tensors of this bucket not yet ready
    MPI_Request request = MPI_REQUEST_NULL;
  };
  void launch(size_t b);
  void launch_ready();

  Communicator comm_;
  std::vector<View> grads_;
  AllReduceOptions options_;
  float factor_ = 1.0f;
  int64_t bucket_elems_ = 0;
  int64_t numel_ = 0;
  std::vector<Bucket> buckets_;
  std::vector<std::vector<size_t>> tensor_buckets_;  // [tensor] -> buckets it overlaps
  std::vector<char> ready_;
  std::vector<float> staging_;
  size_t next_launch_ = 0;
  size_t next_progress_ = 0;  // oldest launched bucket that may still be in flight
};

// Sum of squares of a view's elements, accumulated in double. Local.
double sum_squares(ConstView v);
// The same over the listed rows only, visited in ascending order: when every other row is zero
// (a row-sparse gradient, ParamRef::sparse_rows) the result is bit-identical to sum_squares(v),
// since adding the exact zeros of the skipped rows changes no partial sum. Local.
double sum_squares_rows(ConstView v, const std::vector<int64_t>& rows);

// sqrt of the sum of squares over ALL parameters across ranks: `dense` gradients are replicated
// (counted once: rank 0 contributes them) and `expert` gradients are sharded (every rank
// contributes its own). One all-reduce of one double; every rank gets the same value.
// Collective over `comm`. `expert_rows`, if not empty, has one entry per `expert` view: null
// for a dense gradient, else the only rows that may be non-zero (ParamRef::sparse_rows); those
// views are scanned sparsely with the same result (sum_squares_rows), so a PEER table of N rows
// costs O(touched rows d), not O(N d).
double global_grad_norm(const std::vector<ConstView>& dense, const std::vector<ConstView>& expert,
                        const Communicator& comm,
                        const std::vector<const std::vector<int64_t>*>& expert_rows = {});

}  // namespace moe::comm
