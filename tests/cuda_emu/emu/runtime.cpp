// The scheduler of the CUDA emulation (cuda_emu.h): blocks one at a time, threads as
// ucontext fibers, barriers, warp exchanges, the shared-memory poison and race check, and
// the launch checks. Errors become c10::Error (RuntimeError in Python) once the launch
// has unwound back to the host.
#include "emu/cuda_emu.h"

#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <numeric>
#include <random>
#include <sstream>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#endif

extern "C" {
// Bounds of the section that holds every static __shared__ variable (set by the linker;
// weak: a module whose kernels declare none has no such section).
extern unsigned char __start_steplaw_emu_shared[] __attribute__((weak));
extern unsigned char __stop_steplaw_emu_shared[] __attribute__((weak));
}

namespace emu {

uint3 g_thread_idx{0, 0, 0}, g_block_idx{0, 0, 0};
dim3 g_block_dim, g_grid_dim;

namespace {

constexpr size_t kMaxDynamicSmem = 48 * 1024;  // without cudaFuncSetAttribute
#ifdef EMU_ASAN
constexpr size_t kStackBytes = 512 * 1024;
#else
constexpr size_t kStackBytes = 128 * 1024;
#endif

// Thrown inside a fiber to end it when the launch is aborted (never crosses fibers).
struct FiberAbort {};

enum class State { kRunnable, kAtBlockBarrier, kAtWarpOp, kDone };

struct Fiber {
  ucontext_t ctx;
  unsigned char* stack = nullptr;
  uint3 tid{0, 0, 0};
  int linear = 0;
  State state = State::kRunnable;
  Site site{nullptr, 0};
  unsigned mask = 0;
  int phase = 0;
  bool started = false;
};

struct Settings {
  Order order = Order::kForward;
  uint64_t seed = 0;
};

struct Run {
  const char* kernel = "";
  const std::function<void()>* body = nullptr;
  std::vector<Fiber> fibers;
  std::vector<uint64_t> exchange;  // one slot per thread
  std::vector<unsigned char> dyn_smem;
  size_t dyn_bytes = 0;
  std::string error;  // first error of the launch
  Fiber* current = nullptr;
  ucontext_t scheduler;
  std::mt19937_64 rng;
  // Race check: per shared byte, the thread that last changed it since the last barrier
  // (-1 none, -2 touched by an atomic).
  std::vector<int> writer;
  std::vector<unsigned char> snapshot;
#ifdef EMU_ASAN
  void* fake_stack = nullptr;
  const void* scheduler_stack_bottom = nullptr;
  size_t scheduler_stack_size = 0;
#endif
};

Settings g_settings;
Run* g_run = nullptr;
bool g_unchecked_launch = false;
std::mutex g_mutex;
std::vector<unsigned char*> g_stack_pool;
std::map<std::string, int64_t> g_launch_counts;

unsigned char* static_smem_begin() { return __start_steplaw_emu_shared; }
size_t static_smem_bytes() {
  return __start_steplaw_emu_shared ? size_t(__stop_steplaw_emu_shared - __start_steplaw_emu_shared) : 0;
}

// Two call sites are the same line of the same file (the file names compared as strings:
// the same name's literal may have several copies).
bool same_site(const Site& a, const Site& b) {
  return a.line == b.line && a.file && b.file && std::strcmp(a.file, b.file) == 0;
}

std::string where(const Site& s) {
  std::string file = s.file ? s.file : "?";
  const size_t slash = file.rfind("csrc/");
  if (slash != std::string::npos) file = file.substr(slash);
  return file + ":" + std::to_string(s.line);
}

std::string thread_name(const Fiber& f) {
  std::ostringstream out;
  out << "block (" << g_block_idx.x << "," << g_block_idx.y << "," << g_block_idx.z << ") thread (" << f.tid.x << ","
      << f.tid.y << "," << f.tid.z << ")";
  return out.str();
}

void record_error(const std::string& message) {
  if (g_run->error.empty()) g_run->error = std::string(g_run->kernel) + ": " + message;
}

// Ends the calling fiber's kernel code: it unwinds to the fiber's entry.
[[noreturn]] void fail(const std::string& message) {
  record_error(message);
  throw FiberAbort();
}

unsigned char* take_stack() {
  if (!g_stack_pool.empty()) {
    unsigned char* s = g_stack_pool.back();
    g_stack_pool.pop_back();
    return s;
  }
  void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  TORCH_CHECK(p != MAP_FAILED, "CUDA emulation: cannot map a fiber stack");
  return static_cast<unsigned char*>(p);
}

// ---- fiber switches (with AddressSanitizer's annotations in the sanitized build) ----------

void switch_to_fiber(Fiber& f) {
  g_run->current = &f;
  f.started = true;
  g_thread_idx = f.tid;
#ifdef EMU_ASAN
  __sanitizer_start_switch_fiber(&g_run->fake_stack, f.stack, kStackBytes);
#endif
  swapcontext(&g_run->scheduler, &f.ctx);
#ifdef EMU_ASAN
  __sanitizer_finish_switch_fiber(g_run->fake_stack, nullptr, nullptr);
#endif
  g_run->current = nullptr;
}

void yield_to_scheduler(bool finished) {
  Fiber& f = *g_run->current;
#ifdef EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(finished ? nullptr : &fake, g_run->scheduler_stack_bottom,
                                 g_run->scheduler_stack_size);
#else
  (void)finished;
#endif
  swapcontext(&f.ctx, &g_run->scheduler);
#ifdef EMU_ASAN
  __sanitizer_finish_switch_fiber(fake, &g_run->scheduler_stack_bottom, &g_run->scheduler_stack_size);
#endif
}

void fiber_entry() {
#ifdef EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &g_run->scheduler_stack_bottom, &g_run->scheduler_stack_size);
#endif
  Fiber& f = *g_run->current;
  try {
    (*g_run->body)();
  } catch (const FiberAbort&) {
  } catch (const std::exception& e) {
    record_error(std::string("exception in device code: ") + e.what());
  } catch (...) {
    record_error("exception in device code");
  }
  f.state = State::kDone;
  yield_to_scheduler(true);
  std::abort();  // a finished fiber is never resumed
}

// ---- shared memory: poison and race check --------------------------------------------------

size_t smem_total() { return g_run->dyn_bytes + static_smem_bytes(); }

unsigned char* smem_byte(size_t i) {
  return i < g_run->dyn_bytes ? g_run->dyn_smem.data() + i : static_smem_begin() + (i - g_run->dyn_bytes);
}

void take_snapshot() {
  const size_t n = smem_total();
  g_run->snapshot.resize(n);
  if (g_run->dyn_bytes) std::memcpy(g_run->snapshot.data(), g_run->dyn_smem.data(), g_run->dyn_bytes);
  if (static_smem_bytes()) std::memcpy(g_run->snapshot.data() + g_run->dyn_bytes, static_smem_begin(), static_smem_bytes());
}

// After fiber f ran a stretch: every shared byte it changed; a byte changed by another
// thread since the last barrier (not through an atomic) is a race.
void check_writes(const Fiber& f) {
  const size_t n = smem_total();
  for (size_t i = 0; i < n; ++i) {
    if (*smem_byte(i) == g_run->snapshot[i]) continue;
    int& w = g_run->writer[i];
    if (w >= 0 && w != f.linear) {
      const bool dynamic = i < g_run->dyn_bytes;
      record_error("shared-memory race: threads " + std::to_string(w) + " and " + std::to_string(f.linear) + " of " +
                   thread_name(f) + "'s block both wrote " + (dynamic ? "dynamic" : "static") +
                   " shared byte " + std::to_string(dynamic ? i : i - g_run->dyn_bytes) +
                   " with no barrier in between");
      return;
    }
    if (w != -2) w = f.linear;
  }
}

// A barrier among `lanes` (a warp's mask, or all threads) orders their writes: forget them.
void forget_writers(const std::vector<int>& threads) {
  if (threads.size() == g_run->fibers.size()) {
    std::fill(g_run->writer.begin(), g_run->writer.end(), -1);
    return;
  }
  for (int& w : g_run->writer) {
    if (w >= 0 && std::find(threads.begin(), threads.end(), w) != threads.end()) w = -1;
  }
}

// ---- barriers --------------------------------------------------------------------------

int warp_base(const Fiber& f) { return f.linear / 32 * 32; }

// The calling fiber waits at a warp operation over `mask`; returns when every lane of the
// mask has arrived at the same operation and phase.
void warp_wait(unsigned mask, Site site, int phase) {
  Fiber& f = *g_run->current;
  const int base = warp_base(f);
  const int n = int(g_run->fibers.size());
  const unsigned lane = unsigned(f.linear - base);
  if (!(mask >> lane & 1u)) fail("warp operation at " + where(site) + " with mask " + std::to_string(mask) +
                                 " called by lane " + std::to_string(lane) + ", which the mask leaves out");
  std::vector<int> members;
  bool all_here = true;
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    const int t = base + l;
    if (t >= n) fail("warp operation at " + where(site) + ": mask names lane " + std::to_string(l) +
                     ", which this block of " + std::to_string(n) + " threads does not have");
    members.push_back(t);
    const Fiber& o = g_run->fibers[t];
    if (t == f.linear) continue;
    if (o.state == State::kDone) fail("warp operation at " + where(site) + ": lane " + std::to_string(l) +
                                      " of its mask has already returned");
    if (o.state != State::kAtWarpOp) {
      all_here = false;
      continue;
    }
    if (o.mask != mask || !same_site(o.site, site) || o.phase != phase) {
      fail("lanes of one warp wait at different warp operations: " + where(site) + " and " + where(o.site));
    }
  }
  f.state = State::kAtWarpOp;
  f.site = site;
  f.mask = mask;
  f.phase = phase;
  if (all_here) {
    check_writes(f);
    forget_writers(members);
    for (int t : members) g_run->fibers[t].state = State::kRunnable;
    take_snapshot();
    return;
  }
  yield_to_scheduler(false);
  if (!g_run->error.empty()) throw FiberAbort();
}

void run_block(unsigned bx, unsigned by, unsigned bz) {
  Run& r = *g_run;
  g_block_idx = {bx, by, bz};
  const int n = int(r.fibers.size());
  // Poison: uninitialised shared memory reads as different garbage in different orders.
  const unsigned char poison = g_settings.order == Order::kForward ? 0xff
                               : g_settings.order == Order::kReverse ? 0x7f
                                                                     : static_cast<unsigned char>(r.rng());
  if (r.dyn_bytes) std::memset(r.dyn_smem.data(), poison, r.dyn_bytes);
  if (static_smem_bytes()) std::memset(static_smem_begin(), poison, static_smem_bytes());
  r.writer.assign(smem_total(), -1);
  for (int t = 0; t < n; ++t) {
    Fiber& f = r.fibers[t];
    f.state = State::kRunnable;
    f.started = false;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  std::vector<int> order(n);
  auto reorder = [&] {
    std::iota(order.begin(), order.end(), 0);
    if (g_settings.order == Order::kReverse) std::reverse(order.begin(), order.end());
    if (g_settings.order == Order::kShuffle) std::shuffle(order.begin(), order.end(), r.rng);
  };
  reorder();
  while (true) {
    bool ran = false;
    for (int t : order) {
      Fiber& f = r.fibers[t];
      if (f.state != State::kRunnable) continue;
      take_snapshot();
      switch_to_fiber(f);
      if (r.error.empty()) check_writes(f);
      ran = true;
      if (!r.error.empty()) return;
    }
    if (ran) continue;
    int done = 0, at_block = 0;
    const Fiber* first_block = nullptr;
    const Fiber* first_warp = nullptr;
    for (const Fiber& f : r.fibers) {
      if (f.state == State::kDone) ++done;
      if (f.state == State::kAtBlockBarrier) {
        ++at_block;
        if (!first_block) first_block = &f;
      }
      if (f.state == State::kAtWarpOp && !first_warp) first_warp = &f;
    }
    if (done == n) return;
    if (first_warp) {
      record_error("deadlock: " + thread_name(*first_warp) + " waits at the warp operation at " +
                   where(first_warp->site) + " for lanes of its mask that returned or wait elsewhere");
      return;
    }
    if (done > 0) {
      record_error("__syncthreads at " + where(first_block->site) + " reached by " + std::to_string(at_block) + " of " +
                   std::to_string(n) + " threads of block " + std::to_string(bx) + "; the other " +
                   std::to_string(done) + " had returned");
      return;
    }
    for (const Fiber& f : r.fibers) {
      if (!same_site(f.site, first_block->site)) {
        record_error("threads of block " + std::to_string(bx) + " wait at different __syncthreads: " +
                     where(first_block->site) + " and " + where(f.site));
        return;
      }
    }
    std::fill(r.writer.begin(), r.writer.end(), -1);
    for (Fiber& f : r.fibers) f.state = State::kRunnable;
    reorder();
  }
}

// Ends the aborted fibers of a block: each unwinds its kernel frames (FiberAbort).
void unwind_block() {
  for (Fiber& f : g_run->fibers) {
    if (f.started && f.state != State::kDone) {
      f.state = State::kRunnable;
      switch_to_fiber(f);
    }
  }
}

}  // namespace

void set_order(Order order, uint64_t seed) {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_settings = {order, seed};
}

std::string launch_counts() {
  std::lock_guard<std::mutex> lock(g_mutex);
  std::string out;
  for (const auto& [name, count] : g_launch_counts) out += name + "=" + std::to_string(count) + "\n";
  return out;
}

void launch_check() {
  g_unchecked_launch = false;
}

void* dynamic_smem() { return g_run->dyn_smem.data(); }

[[noreturn]] void device_fail(const char* what, const char* file, int line) {
  fail(std::string("device-side assert triggered: ") + what + " at " + where(Site{file, line}) + " in " +
       thread_name(*g_run->current));
}

void note_atomic(const void* address, size_t bytes) {
  if (g_run == nullptr) return;
  const auto* p = static_cast<const unsigned char*>(address);
  const unsigned char* dyn = g_run->dyn_smem.data();
  for (size_t b = 0; b < bytes; ++b) {
    if (g_run->dyn_bytes && p + b >= dyn && p + b < dyn + g_run->dyn_bytes) g_run->writer[p + b - dyn] = -2;
    const unsigned char* st = static_smem_begin();
    if (static_smem_bytes() && p + b >= st && p + b < st + static_smem_bytes()) {
      g_run->writer[g_run->dyn_bytes + (p + b - st)] = -2;
    }
  }
}

void syncthreads(Site site) {
  Fiber& f = *g_run->current;
  f.state = State::kAtBlockBarrier;
  f.site = site;
  yield_to_scheduler(false);
  if (!g_run->error.empty()) throw FiberAbort();
}

void syncwarp(unsigned mask, Site site) { warp_wait(mask, site, 0); }

uint64_t warp_exchange(unsigned mask, uint64_t value, int src_lane, Site site) {
  Fiber& f = *g_run->current;
  const int base = warp_base(f);
  g_run->exchange[f.linear] = value;
  warp_wait(mask, site, 1);
  uint64_t out = value;
  if (src_lane >= 0) {
    if (!(mask >> src_lane & 1u)) fail("shuffle at " + where(site) + " reads lane " + std::to_string(src_lane) +
                                       ", which its mask leaves out");
    out = g_run->exchange[base + src_lane];
  }
  warp_wait(mask, site, 2);  // no lane overwrites its slot before every lane has read
  return out;
}

unsigned warp_match(unsigned mask, uint64_t key, Site site) {
  Fiber& f = *g_run->current;
  const int base = warp_base(f);
  g_run->exchange[f.linear] = key;
  warp_wait(mask, site, 1);
  unsigned peers = 0;
  for (int l = 0; l < 32; ++l) {
    if ((mask >> l & 1u) && g_run->exchange[base + l] == key) peers |= 1u << l;
  }
  warp_wait(mask, site, 2);
  return peers;
}

unsigned warp_ballot(unsigned mask, bool pred, Site site) {
  Fiber& f = *g_run->current;
  const int base = warp_base(f);
  g_run->exchange[f.linear] = pred ? 1 : 0;
  warp_wait(mask, site, 1);
  unsigned bits = 0;
  for (int l = 0; l < 32; ++l) {
    if ((mask >> l & 1u) && g_run->exchange[base + l]) bits |= 1u << l;
  }
  warp_wait(mask, site, 2);
  return bits;
}

void launch(const char* name, dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
  std::lock_guard<std::mutex> lock(g_mutex);
  std::string kernel(name);
  kernel = kernel.substr(0, kernel.find('<'));
  while (!kernel.empty() && kernel.back() == ' ') kernel.pop_back();
  TORCH_CHECK(!g_unchecked_launch, "CUDA emulation: launch of ", kernel,
              " follows a launch that no C10_CUDA_KERNEL_LAUNCH_CHECK() checked");
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  TORCH_CHECK(grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.x <= 2147483647u && grid.y <= 65535 &&
                  grid.z <= 65535,
              "CUDA error (emulated): invalid configuration argument: ", kernel, " launched with grid (", grid.x, ",",
              grid.y, ",", grid.z, ")");
  TORCH_CHECK(threads >= 1 && threads <= 1024 && block.z <= 64,
              "CUDA error (emulated): invalid configuration argument: ", kernel, " launched with block (", block.x,
              ",", block.y, ",", block.z, ")");
  TORCH_CHECK(smem <= kMaxDynamicSmem, "CUDA error (emulated): invalid argument: ", kernel, " launched with ", smem,
              " bytes of dynamic shared memory (at most ", kMaxDynamicSmem, " without cudaFuncSetAttribute)");
  // Only a launch that passed its configuration checks is pending: a refused one has
  // already raised, as the real launch's error would at its C10_CUDA_KERNEL_LAUNCH_CHECK.
  g_unchecked_launch = true;
  ++g_launch_counts[kernel];

  Run run;
  run.kernel = name;
  run.body = &body;
  run.rng.seed(g_settings.seed * 0x9E3779B97F4A7C15ull + 12345);
  run.dyn_bytes = smem;
  run.dyn_smem.assign(smem, 0);  // exact size: ASan sees an access past it
  run.fibers.resize(threads);
  run.exchange.assign(threads, 0);
  for (uint64_t t = 0; t < threads; ++t) {
    Fiber& f = run.fibers[t];
    f.linear = int(t);
    f.tid = {unsigned(t % block.x), unsigned(t / block.x % block.y), unsigned(t / (uint64_t(block.x) * block.y))};
    f.stack = take_stack();
  }
  g_run = &run;
  g_block_dim = block;
  g_grid_dim = grid;

  const uint64_t n_blocks = uint64_t(grid.x) * grid.y * grid.z;
  std::vector<uint64_t> blocks(n_blocks);
  std::iota(blocks.begin(), blocks.end(), uint64_t(0));
  if (g_settings.order == Order::kReverse) std::reverse(blocks.begin(), blocks.end());
  if (g_settings.order == Order::kShuffle) std::shuffle(blocks.begin(), blocks.end(), run.rng);
  for (uint64_t b : blocks) {
    run_block(unsigned(b % grid.x), unsigned(b / grid.x % grid.y), unsigned(b / (uint64_t(grid.x) * grid.y)));
    if (!run.error.empty()) {
      unwind_block();
      break;
    }
  }
  for (Fiber& f : run.fibers) g_stack_pool.push_back(f.stack);
  g_run = nullptr;
  g_thread_idx = {0, 0, 0};
  g_block_idx = {0, 0, 0};
  if (!run.error.empty()) {
    g_unchecked_launch = false;
    TORCH_CHECK(false, "CUDA error (emulated): ", run.error);
  }
}

}  // namespace emu
