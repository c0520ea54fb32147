// grouped_mm and grouped_mm_wgrad on CUDA (DESIGN.md section 3).
//
// Three paths, chosen per call on the host without reading any device value. The two
// tensor-core paths take bf16 or fp16 with K, N multiples of 8 (16-byte aligned rows);
// operands whose strides or base pointers they cannot take are copied to contiguous
// storage first (a copy is far cheaper than the SIMT path):
//   SM90:     the CUTLASS 3.x Hopper grouped GEMMs of csrc/cuda/sm90/ (TMA + WGMMA,
//             warp-specialized persistent kernels) on compute capability 9.0, when compiled
//             in (ANYEXPERTS_SM90).
//   SM80:     the CUTLASS 2.x grouped GEMMs of csrc/cuda/sm80/ (cp.async + mma.sync,
//             persistent threadblocks) on every other GPU of compute capability 8.0 or
//             more, when compiled in (ANYEXPERTS_SM80).
//   SIMT:     the tiled kernels of grouped_mm_simt.cu, fp32 accumulation (fp64 for fp64),
//             any float dtype and any strides, for every other case (older GPUs, fp32/fp64,
//             odd sizes).
// ANYEXPERTS_GROUPED_MM_BACKEND caps the choice (testing, see below). No path synchronises
// with the host: group spans are computed on the device from `offsets` by the group end
// rule of rules.h, so all are CUDA-graph capturable.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "anyexperts/checks.h"
#include "anyexperts/cuda_utils.cuh"
#include "anyexperts/grouped_mm_simt.h"

#if defined(ANYEXPERTS_SM80)
#include "anyexperts/grouped_mm_sm80.h"
#endif
#if defined(ANYEXPERTS_SM90)
#include "anyexperts/grouped_mm_sm90.h"
#endif

namespace anyexperts {
namespace {

// ======================================================================================
// Path choice: the backend override (environment)
// ======================================================================================
//
// ANYEXPERTS_GROUPED_MM_BACKEND  auto (default) | sm90 | sm80 | simt: the newest path a call
//                                may take. Each path still needs its conditions (device,
//                                dtype, sizes); a call that does not meet them takes the
//                                next older one. For tests and benchmarks of the older
//                                paths on newer GPUs (sm80 on an H100).
// Unset or empty means auto; any other value fails every grouped_mm call with work to do
// (empty shapes return first) with an error that lists the accepted ones. Read once per
// process, or on every call with ANYEXPERTS_GROUPED_MM_TUNING_LIVE set to any value but 0
// (as the SM90 tuning variables below).
enum class Backend : int { kSimt = 0, kSm80 = 1, kSm90 = 2 };  // ordered: newer is larger

// The variable's value, or nullptr when unset or empty.
const char* env_value(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? v : nullptr;
}

// Whether the environment overrides are re-read on every call (read once itself). Opt-in:
// setenv racing with getenv in another thread is undefined behaviour, so a normal process
// never calls getenv after its first grouped_mm call.
bool tuning_live() {
  static const bool live = [] {
    const char* v = env_value("ANYEXPERTS_GROUPED_MM_TUNING_LIVE");
    return v != nullptr && std::strcmp(v, "0") != 0;
  }();
  return live;
}

Backend read_backend() {
  const char* v = env_value("ANYEXPERTS_GROUPED_MM_BACKEND");
  if (v == nullptr || std::strcmp(v, "auto") == 0 || std::strcmp(v, "sm90") == 0) {
    return Backend::kSm90;
  }
  if (std::strcmp(v, "sm80") == 0) return Backend::kSm80;
  if (std::strcmp(v, "simt") == 0) return Backend::kSimt;
  TORCH_CHECK(false, "grouped_mm: unknown ANYEXPERTS_GROUPED_MM_BACKEND='", v,
              "'; expected one of: auto, sm90, sm80, simt");
}

Backend backend() {
  if (tuning_live()) return read_backend();
  // A bad value throws out of the initializer: the next call reads and throws again.
  static const Backend once = read_backend();
  return once;
}

// ======================================================================================
// Tensor-core paths (SM80, SM90): eligibility and operands
// ======================================================================================

#if defined(ANYEXPERTS_SM80) || defined(ANYEXPERTS_SM90)

// ANYEXPERTS_GROUPED_MM_WGRAD_ORDER  auto (default) = largest_first | index: the order in
//                                    which both tensor-core paths hand grouped_mm_wgrad's
//                                    problems to the GEMM (wgrad_slot in
//                                    grouped_mm_prepare.cuh). For timing the two side by side
//                                    (bench/bench_grouped_mm.py). Read as the backend is.
bool read_wgrad_largest_first() {
  const char* v = env_value("ANYEXPERTS_GROUPED_MM_WGRAD_ORDER");
  if (v == nullptr || std::strcmp(v, "auto") == 0 || std::strcmp(v, "largest_first") == 0) {
    return true;
  }
  TORCH_CHECK(std::strcmp(v, "index") == 0,
              "grouped_mm_wgrad: unknown ANYEXPERTS_GROUPED_MM_WGRAD_ORDER='", v,
              "'; expected one of: auto, largest_first, index");
  return false;
}

bool wgrad_largest_first() {
  if (tuning_live()) return read_wgrad_largest_first();
  static const bool once = read_wgrad_largest_first();
  return once;
}

// Per-device facts, read once: compute capability, SM count and L2 size.
struct DeviceInfo {
  int major = 0;
  int minor = 0;
  int sm_count = 0;
  int l2_bytes = 0;
};

const DeviceInfo& device_info(int device) {
  constexpr int kMaxDevices = 64;
  static std::array<DeviceInfo, kMaxDevices> infos{};
  static std::array<std::atomic<bool>, kMaxDevices> ready{};
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "grouped_mm: device index ", device,
              " out of range");
  if (!ready[device].load(std::memory_order_acquire)) {
    DeviceInfo info;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.major, cudaDevAttrComputeCapabilityMajor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.minor, cudaDevAttrComputeCapabilityMinor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.sm_count, cudaDevAttrMultiProcessorCount, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.l2_bytes, cudaDevAttrL2CacheSize, device));
    infos[device] = info;  // idempotent: racing writers store the same values
    ready[device].store(true, std::memory_order_release);
  }
  return infos[device];
}

// The newest tensor-core path this call can take (kSimt: none), within the override's cap.
Backend tensor_core_path(const at::Tensor& a, int64_t K, int64_t N) {
  const Backend cap = backend();  // first: a bad override fails every call
  const auto dt = a.scalar_type();
  // CUTLASS problem sizes are int: K or N of 2^31 or more goes to the fallback, which takes
  // int64 sizes (and refuses, with a clear error, what its grid cannot cover: the forward an
  // N, the wgrad a K, past 65535 tiles of 64).
  constexpr int64_t kIntLimit = int64_t{1} << 31;
  if (!((dt == at::kBFloat16 || dt == at::kHalf) && K % 8 == 0 && N % 8 == 0 &&
        K < kIntLimit && N < kIntLimit)) {
    return Backend::kSimt;
  }
  const DeviceInfo& info = device_info(a.device().index());
#if defined(ANYEXPERTS_SM90)
  if (cap >= Backend::kSm90 && info.major == 9 && info.minor == 0) return Backend::kSm90;
#endif
#if defined(ANYEXPERTS_SM80)
  if (cap >= Backend::kSm80 && info.major >= 8) return Backend::kSm80;
#endif
  return Backend::kSimt;
}

bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

// A leading dimension the tensor-core kernels take (TMA on SM90, 16-byte cp.async on SM80):
// a multiple of 16 bytes, and rows that do not overlap.
bool ld16_ok(int64_t ld, int64_t row_len) { return ld % 8 == 0 && ld >= row_len; }

// A 2-D operand they can read row by row: unit column stride, 16-byte row stride and base.
bool rows16_ok(const at::Tensor& t) {
  return t.stride(1) == 1 && (t.size(0) <= 1 || ld16_ok(t.stride(0), t.size(1))) &&
         aligned16(t);
}

// `t` itself when the kernels can read it, else a fresh contiguous (so 16-byte aligned) copy.
at::Tensor rows16(const at::Tensor& t) {
  return rows16_ok(t) ? t : t.clone(at::MemoryFormat::Contiguous);
}

// The forward problem of out = a @ b[g] per group. b[g] is K x N: row-major (N contiguous)
// or column-major (K contiguous, the transposed view of nn.Linear's [G,N,K] storage), each
// its own kernel; anything else is copied. `a` and `b` keep the operands alive.
grouped::ForwardProblem forward_problem(const at::Tensor& a_in, const at::Tensor& b_in,
                                        const at::Tensor& offsets, bool zero_tail,
                                        at::Tensor& out, at::Tensor& a, at::Tensor& b) {
  const int64_t R = a_in.size(0), K = a_in.size(1), N = b_in.size(2), G = b_in.size(0);
  a = rows16(a_in);
  b = b_in;
  auto group_stride_ok = [&](const at::Tensor& t) { return G <= 1 || t.stride(0) % 8 == 0; };
  grouped::BLayout layout;
  int64_t ldb;
  if (b.stride(2) == 1 && ld16_ok(b.stride(1), N) && group_stride_ok(b) && aligned16(b)) {
    layout = grouped::BLayout::kRowMajor;
    ldb = b.stride(1);
  } else if (b.stride(1) == 1 && ld16_ok(b.stride(2), K) && group_stride_ok(b) && aligned16(b)) {
    layout = grouped::BLayout::kColMajor;
    ldb = b.stride(2);
  } else {
    b = b_in.clone(at::MemoryFormat::Contiguous);
    layout = grouped::BLayout::kRowMajor;
    ldb = N;
  }
  grouped::ForwardProblem p{};
  p.a = a.data_ptr();
  p.lda = R > 1 ? a.stride(0) : K;
  p.b = b.data_ptr();
  p.ldb = ldb;
  p.b_group_stride = G > 1 ? b.stride(0) : 0;
  p.layout = layout;
  p.out = out.data_ptr();
  p.offsets = offsets.data_ptr<int32_t>();
  p.groups = G;
  p.rows = R;
  p.k = K;
  p.n = N;
  p.zero_tail = zero_tail;
  return p;
}

// The weight-gradient problem db[g] = a_g^T @ dout_g. `a` and `dout` keep the operands alive.
grouped::WgradProblem wgrad_problem(const at::Tensor& a_in, const at::Tensor& dout_in,
                                    const at::Tensor& offsets, at::Tensor& db, at::Tensor& a,
                                    at::Tensor& dout) {
  const int64_t R = a_in.size(0), K = a_in.size(1), N = dout_in.size(1), G = offsets.size(0);
  a = rows16(a_in);
  dout = rows16(dout_in);
  grouped::WgradProblem p{};
  p.a = a.data_ptr();
  p.lda = R > 1 ? a.stride(0) : K;
  p.dout = dout.data_ptr();
  p.ldd = R > 1 ? dout.stride(0) : N;
  p.db = db.data_ptr();
  p.offsets = offsets.data_ptr<int32_t>();
  p.groups = G;
  p.rows = R;
  p.k = K;
  p.n = N;
  p.largest_first = wgrad_largest_first();
  return p;
}

// The kernels' workspace (argument arrays, and CUTLASS's own on SM90) is a byte tensor from
// the caching allocator: no cudaMalloc, and graph capture keeps it alive.
at::Tensor workspace_for(const at::Tensor& like, size_t bytes) {
  return at::empty({static_cast<int64_t>(std::max<size_t>(bytes, 1))},
                   like.options().dtype(at::kByte));
}

#else

Backend tensor_core_path(const at::Tensor&, int64_t, int64_t) {
  backend();  // still rejects a bad override
  return Backend::kSimt;
}

#endif  // ANYEXPERTS_SM80 || ANYEXPERTS_SM90

// ======================================================================================
// SM80 path
// ======================================================================================

#if defined(ANYEXPERTS_SM80)

// Runs `kernel` on `p` on `like`'s device; `op` names the op in errors.
template <class Kernel, class Problem>
void run_sm80_kernel(const char* op, const Kernel& kernel, const Problem& p,
                     const at::Tensor& like) {
  const int device = like.device().index();
  const at::Tensor workspace = workspace_for(like, kernel.workspace_bytes(p.groups));
  const sm80::Launch launch{workspace.data_ptr(), c10::cuda::getCurrentCUDAStream(device).stream(),
                            device, device_info(device).sm_count};
  const char* err = kernel.run(p, launch);
  TORCH_CHECK(err == nullptr, op, ": SM80 kernel ", kernel.name, " failed: ", err);
}

void sm80_grouped_mm(const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& offsets,
                     bool zero_tail, at::Tensor& out) {
  at::Tensor a, b;
  const grouped::ForwardProblem p = forward_problem(a_in, b_in, offsets, zero_tail, out, a, b);
  const bool row = p.layout == grouped::BLayout::kRowMajor;
  const sm80::ForwardKernel kernel =
      a.scalar_type() == at::kBFloat16
          ? (row ? sm80::forward_bf16_rowmajor() : sm80::forward_bf16_colmajor())
          : (row ? sm80::forward_fp16_rowmajor() : sm80::forward_fp16_colmajor());
  run_sm80_kernel("grouped_mm", kernel, p, a);
}

void sm80_grouped_mm_wgrad(const at::Tensor& a_in, const at::Tensor& dout_in,
                           const at::Tensor& offsets, at::Tensor& db) {
  at::Tensor a, dout;
  const grouped::WgradProblem p = wgrad_problem(a_in, dout_in, offsets, db, a, dout);
  const sm80::WgradKernel kernel =
      a.scalar_type() == at::kBFloat16 ? sm80::wgrad_bf16() : sm80::wgrad_fp16();
  run_sm80_kernel("grouped_mm_wgrad", kernel, p, a);
}

#endif  // ANYEXPERTS_SM80

// ======================================================================================
// SM90 path: workspace, tuning overrides, kernel choice
// ======================================================================================

#if defined(ANYEXPERTS_SM90)

// Runs `kernel` on `p` on `like`'s device (workspace: CUTLASS's per-SM TMA descriptors,
// then the per-group argument arrays); `op` names the op in errors.
template <class Kernel, class Problem>
void run_sm90_kernel(const char* op, const Kernel& kernel, const Problem& p,
                     const at::Tensor& like, const sm90::Scheduling& scheduling = {}) {
  const int device = like.device().index();
  const int sm_count = device_info(device).sm_count;
  const at::Tensor workspace = workspace_for(like, kernel.workspace_bytes(p.groups, sm_count));
  const sm90::Launch launch{workspace.data_ptr(),
                            c10::cuda::getCurrentCUDAStream(device).stream(), device, sm_count,
                            scheduling};
  const char* err = kernel.run(p, launch);
  TORCH_CHECK(err == nullptr, op, ": SM90 kernel ", kernel.name, " failed: ", err);
}

// ---- Tuning overrides (environment) ---------------------------------------------------
//
// For tuning runs (bench/bench_grouped_mm.py --sweep); the defaults are what runs otherwise.
//   ANYEXPERTS_GROUPED_MM_SCHEDULE  auto (the choice of select_forward_schedule) or one of
//                                   kScheduleNames: forces that schedule for grouped_mm
//                                   (forward and dgrad) in bf16. fp16 has one kernel compiled
//                                   and runs it whatever is named; grouped_mm_wgrad too.
//   ANYEXPERTS_GROUPED_MM_RASTER    auto (grouped_mm: the choice of
//                                   select_forward_scheduling; grouped_mm_wgrad: along M) |
//                                   along_m | along_n | heuristic: tile order of the
//                                   persistent group scheduler (sm90::Raster), both ops.
//   ANYEXPERTS_GROUPED_MM_SWIZZLE   1 (default) | 2 | 4 | 8 (sm90::Scheduling::swizzle), both.
// Unset or empty means the default; any other value fails every SM90 grouped_mm call with
// an error that lists the accepted ones (a typo must not quietly time the default).
// They are read once, at the first SM90 grouped_mm call of the process. With
// ANYEXPERTS_GROUPED_MM_TUNING_LIVE set (not to 0) every call reads them again
// (tuning_live), so one process can time every configuration (the sweep, the CUDA tests).
struct ScheduleName {
  const char* name;
  sm90::Schedule schedule;
};

// Every compiled schedule, by the name the override takes (tile MxN, then cluster MxN).
constexpr ScheduleName kScheduleNames[] = {
    {"cooperative_128x256_2x1", sm90::Schedule::kCooperative128x256},
    {"pingpong_64x256_1x1", sm90::Schedule::kPingpong64x256},
    {"cooperative_128x128_1x2", sm90::Schedule::kCooperative128x128},
    {"cooperative_256x128_2x1", sm90::Schedule::kCooperative256x128},
    {"pingpong_128x128_1x2", sm90::Schedule::kPingpong128x128},
    // Short names the override took before the candidates existed.
    {"cooperative", sm90::Schedule::kCooperative128x256},
    {"pingpong", sm90::Schedule::kPingpong64x256},
};

struct Tuning {
  bool auto_schedule = true;
  sm90::Schedule schedule = sm90::Schedule::kCooperative128x256;  // when !auto_schedule
  bool auto_raster = true;
  sm90::Scheduling scheduling{};  // its raster only when !auto_raster
};

Tuning read_tuning() {
  Tuning t;
  if (const char* v = env_value("ANYEXPERTS_GROUPED_MM_SCHEDULE")) {
    if (std::strcmp(v, "auto") != 0) {
      bool found = false;
      std::string names = "auto";
      for (const ScheduleName& s : kScheduleNames) {
        names += std::string(", ") + s.name;
        if (!found && std::strcmp(v, s.name) == 0) {
          t.auto_schedule = false;
          t.schedule = s.schedule;
          found = true;
        }
      }
      TORCH_CHECK(found, "grouped_mm: unknown ANYEXPERTS_GROUPED_MM_SCHEDULE='", v,
                  "'; expected one of: ", names);
    }
  }
  if (const char* v = env_value("ANYEXPERTS_GROUPED_MM_RASTER")) {
    if (std::strcmp(v, "auto") != 0) {
      t.auto_raster = false;
      if (std::strcmp(v, "along_m") == 0) {
        t.scheduling.raster = sm90::Raster::kAlongM;
      } else if (std::strcmp(v, "along_n") == 0) {
        t.scheduling.raster = sm90::Raster::kAlongN;
      } else if (std::strcmp(v, "heuristic") == 0) {
        t.scheduling.raster = sm90::Raster::kHeuristic;
      } else {
        TORCH_CHECK(false, "grouped_mm: unknown ANYEXPERTS_GROUPED_MM_RASTER='", v,
                    "'; expected one of: auto, along_m, along_n, heuristic");
      }
    }
  }
  if (const char* v = env_value("ANYEXPERTS_GROUPED_MM_SWIZZLE")) {
    const std::string sw(v);
    TORCH_CHECK(sw == "1" || sw == "2" || sw == "4" || sw == "8",
                "grouped_mm: unknown ANYEXPERTS_GROUPED_MM_SWIZZLE='", v,
                "'; expected one of: 1, 2, 4, 8");
    t.scheduling.swizzle = std::stoi(sw);
  }
  return t;
}

Tuning tuning() {
  if (tuning_live()) return read_tuning();
  // A bad value throws out of the initializer: the next call reads and throws again.
  static const Tuning once = read_tuning();
  return once;
}

// ---- Kernel choice: the one place where a schedule is picked for a shape -------------
//
// The schedules (grouped_mm_sm90.h):
//   kCooperative128x256 (128x256x64 tiles, 2x1 cluster): the throughput kernel. The two
//     warpgroups share each staged B tile (half the B loads of 64-row tiles), and the
//     cluster multicasts each expert's B tile to the two CTAs holding neighbouring 128-row
//     tiles. Wins when groups hold many rows and K is long (prefill, training: m_avg in
//     the hundreds or thousands; the forward GEMMs of bench/bench_grouped_mm.py, and every
//     GEMM of its E8 shape).
//   kPingpong64x256 (64x256x64 tiles, no cluster): each warpgroup owns a 64-row tile, and
//     one warpgroup's epilogue overlaps the other's mainloop. Wins when groups are short
//     (decode, many small experts): a 128-row tile would be mostly padding, and a 2x1
//     cluster would round every group up to an even number of M tiles.
//   kPingpong128x128 (128x128x64 tiles, 1x2 cluster): each warpgroup owns a whole 128x128
//     tile, and its epilogue overlaps the other's mainloop. Wins when K is short: with
//     K <= 1024 a tile's mainloop is at most 16 k-steps, so the cooperative kernel's
//     epilogue, during which both its warpgroups stall, is a large share of every tile.
//     These are the dgrad GEMMs of fine-grained experts (K = F = 768 or 1024), where it
//     ran at 1.07-1.13x of torch._grouped_mm on an H100 while the cooperative kernel was
//     at 1.00-1.01x (bench/results/grouped_mm_sweep.md).
//   kCooperative128x128 (1x2 cluster), kCooperative256x128 (2x1): bf16 candidates,
//     compiled so that an H100 session can time them against the above on the benchmark
//     shapes (bench_grouped_mm.py --sweep). Neither has won beyond the measurement's noise;
//     the override runs them.
// The choice uses K and m_avg = R / G, the mean rows per group, an upper bound known on
// the host without reading offsets: kPingpong64x256 when m_avg <= 128, else
// kPingpong128x128 when K <= 1024, else kCooperative128x256. fp16 has only
// kCooperative128x256 compiled (compile time; bf16 is the training dtype).
// ANYEXPERTS_GROUPED_MM_SCHEDULE overrides the choice (tuning, see above).
// grouped_mm_wgrad always runs the cooperative kernel: its output db[g] is K x N for every
// group whatever the group's rows (those are its reduction dimension), so its tiles are
// full-size wherever there is work.
sm90::Schedule select_forward_schedule(int64_t rows, int64_t groups, int64_t k,
                                       const Tuning& t) {
  if (!t.auto_schedule) return t.schedule;
  const int64_t m_avg = rows / std::max<int64_t>(groups, 1);
  if (m_avg <= 128) return sm90::Schedule::kPingpong64x256;
  return k <= 1024 ? sm90::Schedule::kPingpong128x128 : sm90::Schedule::kCooperative128x256;
}

// The tile order (grouped_mm, forward and dgrad). A persistent wave covers ~sm_count
// tiles. Along M it sweeps down one N column of a group: the column's B panel stays in L2
// and A is read once per N column of the group whenever the group's rows outnumber the
// wave (a large expert: A then comes from DRAM once per N tile). Along N it walks across one
// M row: A is read once, and B (the whole K x N matrix of the group) is read again for
// every M row unless it stays in L2. So along N when one group's B is at most half of L2:
// fine-grained experts (E128 and E64 shapes: 3-4 MB), where it saves the A re-reads of
// Zipf-skewed loads' large groups: on an H100, timed in turns, along N 1.02-1.03x of
// torch._grouped_mm (which runs along M) and along M 1.00x in the sweep, and the default
// 1.04-1.05x in bench/results/grouped_mm.md. Along M otherwise (E8 x 14336: B is 117 MB,
// and along N lost 5% there).
// Balanced loads fit a group in a wave either way. The offsets never reach the host, so
// the choice cannot look at group sizes. ANYEXPERTS_GROUPED_MM_RASTER overrides it.
sm90::Scheduling select_forward_scheduling(int64_t k, int64_t n, int64_t element_bytes,
                                           const DeviceInfo& info, const Tuning& t) {
  if (!t.auto_raster) return t.scheduling;
  sm90::Scheduling s = t.scheduling;
  s.raster = 2 * k * n * element_bytes <= info.l2_bytes ? sm90::Raster::kAlongN
                                                         : sm90::Raster::kAlongM;
  return s;
}

sm90::ForwardKernel forward_kernel(at::ScalarType dtype, sm90::BLayout layout,
                                   sm90::Schedule schedule) {
  const bool row = layout == sm90::BLayout::kRowMajor;
  if (dtype != at::kBFloat16) {
    return row ? sm90::forward_fp16_rowmajor_cooperative() : sm90::forward_fp16_colmajor_cooperative();
  }
  switch (schedule) {
    case sm90::Schedule::kPingpong64x256:
      return row ? sm90::forward_bf16_rowmajor_pingpong() : sm90::forward_bf16_colmajor_pingpong();
    case sm90::Schedule::kCooperative128x128:
      return row ? sm90::forward_bf16_rowmajor_cooperative_128x128()
                 : sm90::forward_bf16_colmajor_cooperative_128x128();
    case sm90::Schedule::kCooperative256x128:
      return row ? sm90::forward_bf16_rowmajor_cooperative_256x128()
                 : sm90::forward_bf16_colmajor_cooperative_256x128();
    case sm90::Schedule::kPingpong128x128:
      return row ? sm90::forward_bf16_rowmajor_pingpong_128x128()
                 : sm90::forward_bf16_colmajor_pingpong_128x128();
    case sm90::Schedule::kCooperative128x256:
      break;
  }
  return row ? sm90::forward_bf16_rowmajor_cooperative() : sm90::forward_bf16_colmajor_cooperative();
}

void sm90_grouped_mm(const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& offsets,
                     bool zero_tail, at::Tensor& out) {
  at::Tensor a, b;
  const grouped::ForwardProblem p = forward_problem(a_in, b_in, offsets, zero_tail, out, a, b);
  const Tuning t = tuning();
  const sm90::ForwardKernel kernel =
      forward_kernel(a.scalar_type(), p.layout, select_forward_schedule(p.rows, p.groups, p.k, t));
  run_sm90_kernel("grouped_mm", kernel, p, a,
                  select_forward_scheduling(p.k, p.n, a.element_size(),
                                            device_info(a.device().index()), t));
}

void sm90_grouped_mm_wgrad(const at::Tensor& a_in, const at::Tensor& dout_in,
                           const at::Tensor& offsets, at::Tensor& db) {
  at::Tensor a, dout;
  const grouped::WgradProblem p = wgrad_problem(a_in, dout_in, offsets, db, a, dout);
  const sm90::WgradKernel kernel =
      a.scalar_type() == at::kBFloat16 ? sm90::wgrad_bf16() : sm90::wgrad_fp16();
  // Along M unless ANYEXPERTS_GROUPED_MM_RASTER / _SWIZZLE name an order (tuning).
  run_sm90_kernel("grouped_mm_wgrad", kernel, p, a, tuning().scheduling);
}

#endif  // ANYEXPERTS_SM90

// ======================================================================================
// Ops
// ======================================================================================

at::Tensor grouped_mm_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets_in,
                           bool zero_tail) {
  check_grouped_mm(a, b, offsets_in);
  TORCH_CHECK(a.is_cuda(), "grouped_mm: expected CUDA tensors, got ", a.device());
  const c10::cuda::CUDAGuard guard(a.device());
  const cuda::NvtxRange range("anyexperts::grouped_mm");
  const int64_t R = a.size(0), K = a.size(1), N = b.size(2), G = b.size(0);
  auto out = at::empty({R, N}, a.options());
  if (R == 0 || N == 0) return out;
  if (K == 0 || G == 0) return out.zero_();  // empty sums; no group at all: every row is tail
  TORCH_CHECK(G < (int64_t{1} << 31), "grouped_mm: too many groups");
  const auto offsets = offsets_in.contiguous();
  switch (tensor_core_path(a, K, N)) {
#if defined(ANYEXPERTS_SM90)
    case Backend::kSm90:
      sm90_grouped_mm(a, b, offsets, zero_tail, out);
      return out;
#endif
#if defined(ANYEXPERTS_SM80)
    case Backend::kSm80:
      sm80_grouped_mm(a, b, offsets, zero_tail, out);
      return out;
#endif
    default:
      simt::grouped_mm(a, b, offsets, zero_tail, out);
      return out;
  }
}

at::Tensor grouped_mm_wgrad_cuda(const at::Tensor& a, const at::Tensor& dout,
                                 const at::Tensor& offsets_in) {
  check_grouped_mm_wgrad(a, dout, offsets_in);
  TORCH_CHECK(a.is_cuda(), "grouped_mm_wgrad: expected CUDA tensors, got ", a.device());
  const c10::cuda::CUDAGuard guard(a.device());
  const cuda::NvtxRange range("anyexperts::grouped_mm_wgrad");
  const int64_t R = a.size(0), K = a.size(1), N = dout.size(1), G = offsets_in.size(0);
  auto db = at::empty({G, K, N}, a.options());
  if (G == 0 || K == 0 || N == 0) return db;
  if (R == 0) return db.zero_();  // every group is empty
  TORCH_CHECK(G < (int64_t{1} << 31), "grouped_mm_wgrad: too many groups");
  const auto offsets = offsets_in.contiguous();
  switch (tensor_core_path(a, K, N)) {
#if defined(ANYEXPERTS_SM90)
    case Backend::kSm90:
      sm90_grouped_mm_wgrad(a, dout, offsets, db);
      return db;
#endif
#if defined(ANYEXPERTS_SM80)
    case Backend::kSm80:
      sm80_grouped_mm_wgrad(a, dout, offsets, db);
      return db;
#endif
    default:
      simt::grouped_mm_wgrad(a, dout, offsets, db);
      return db;
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(anyexperts, CUDA, m) {
  m.impl("grouped_mm", &grouped_mm_cuda);
  m.impl("grouped_mm_wgrad", &grouped_mm_wgrad_cuda);
}

}  // namespace anyexperts
