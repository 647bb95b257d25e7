// The CPU emulator's scheduler and runtime (see cuda_emu.h for the model).
//
// The threads of a block are fibers on one OS thread. x86-64 switches stacks with a few
// instructions (emu_switch below: callee-saved registers, MXCSR and the x87 control word);
// other targets use ucontext (slower: it saves the signal mask with a system call).
#include "cuda_emu.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <exception>
#include <map>
#include <mutex>
#include <sstream>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

namespace cuda_emu {

uint3 g_thread_idx{0, 0, 0}, g_block_idx{0, 0, 0};
dim3 g_block_dim, g_grid_dim;

namespace {

// ---------------------------------------------------------------------------------------
// Context switch.

#if defined(__x86_64__)
extern "C" void cuda_emu_switch(void** save_sp, void* next_sp);
extern "C" void cuda_emu_fiber_start();
// cuda_emu_switch(save, next): pushes the callee-saved state, stores rsp in *save, loads
// next and pops the state saved there. A new fiber's stack is laid out as if it had
// switched away: its "return address" is cuda_emu_fiber_start, which calls
// fiber_main(r12) with a 16-byte aligned stack.
asm(R"(
  .text
  .globl cuda_emu_switch
  .type cuda_emu_switch, @function
cuda_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuda_emu_switch, .-cuda_emu_switch

  .globl cuda_emu_fiber_start
  .type cuda_emu_fiber_start, @function
cuda_emu_fiber_start:
  movq %r12, %rdi
  call cuda_emu_fiber_main
  ud2
  .size cuda_emu_fiber_start, .-cuda_emu_fiber_start
)");
#endif

constexpr size_t kStackBytes =
#if defined(__SANITIZE_ADDRESS__)
    1 << 20;
#else
    256 << 10;
#endif

enum class State { kReady, kBlockBarrier, kWarpBarrier, kExited };

struct PendingCopy {
  uint32_t dst;
  const void* src;
  int cp_size, src_size;
};

struct Fiber {
  int id = 0;  // linear thread index in the block
  uint3 idx{0, 0, 0};
  State state = State::kReady;
  const char* file = "";
  int line = 0;
  const char* kind = "";
  unsigned mask = 0;
  // Warp collectives: where this lane's output goes.
  void* out = nullptr;
  size_t out_bytes = 0;
  // cp.async: copies of the open group, and committed groups oldest first.
  std::vector<PendingCopy> open_group;
  std::deque<std::vector<PendingCopy>> groups;
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t ctx;
#endif
  unsigned char* stack = nullptr;
};

// A collective some lanes of a warp wait at (several at once when their masks are disjoint).
struct Pending {
  unsigned mask = 0;     // participating lanes
  unsigned arrived = 0;  // lanes waiting
  const char* kind = nullptr;
  Combine combine = nullptr;
};

struct Warp {
  WarpArea area;
  std::vector<Pending> pending;
  unsigned busy() const {  // lanes named by a pending collective
    unsigned m = 0;
    for (const Pending& p : pending) m |= p.mask;
    return m;
  }
};

struct Block {
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  std::deque<int> ready;
  int alive = 0;
  // __syncthreads
  int at_barrier = 0;
  const char* barrier_file = nullptr;
  int barrier_line = 0;
  // The kernel and its argument block.
  void (*entry)(void*) = nullptr;
  void* ctx = nullptr;
  Fiber* current = nullptr;
  std::exception_ptr error;
  // Dynamic shared memory.
  unsigned char* smem = nullptr;
  size_t smem_size = 0;
  // Schedule.
  int order = 2;  // 0 forward, 1 reverse, 2 shuffle
  uint64_t rng = 0;
#if defined(__x86_64__)
  void* sched_sp = nullptr;
#else
  ucontext_t sched_ctx;
#endif
#if defined(__SANITIZE_ADDRESS__)
  const void* sched_stack_bottom = nullptr;
  size_t sched_stack_size = 0;
#endif
};

Block* g_block = nullptr;
std::mutex g_launch_mutex;
uint64_t g_launch_count = 0;

// Per-OS-thread last error (as the CUDA runtime keeps it per host thread).
thread_local int t_last_error = 0;
thread_local std::string t_last_detail;

std::map<const void*, int>& smem_limits() {
  static std::map<const void*, int> limits;
  return limits;
}

constexpr int kDefaultSmem = 48 * 1024;
constexpr int kOptinSmem = 227 * 1024;  // H100: 232448 bytes per block

std::string where() {
  std::ostringstream s;
  if (g_block != nullptr) {
    s << " (block (" << g_block_idx.x << "," << g_block_idx.y << "," << g_block_idx.z << ")";
    if (g_block->current != nullptr) {
      const uint3 t = g_block->current->idx;
      s << ", thread (" << t.x << "," << t.y << "," << t.z << ")";
    }
    s << ")";
  }
  return s.str();
}

// ---------------------------------------------------------------------------------------
// Scheduling.

void switch_to_scheduler(Fiber* f) {
  Block* b = g_block;
#if defined(__SANITIZE_ADDRESS__)
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(f->state == State::kExited ? nullptr : &fake, b->sched_stack_bottom,
                                 b->sched_stack_size);
#endif
#if defined(__x86_64__)
  cuda_emu_switch(&f->sp, b->sched_sp);
#else
  swapcontext(&f->ctx, &b->sched_ctx);
#endif
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  g_thread_idx = f->idx;
}

uint64_t next_random(Block* b) {
  b->rng ^= b->rng << 13;
  b->rng ^= b->rng >> 7;
  b->rng ^= b->rng << 17;
  return b->rng;
}

// Makes the threads in `ids` runnable, in the schedule's order.
void release(Block* b, std::vector<int>& ids) {
  if (b->order == 1) {
    std::reverse(ids.begin(), ids.end());
  } else if (b->order == 2) {
    for (size_t i = ids.size(); i > 1; --i) std::swap(ids[i - 1], ids[next_random(b) % i]);
  }
  for (int id : ids) {
    b->fibers[id].state = State::kReady;
    b->ready.push_back(id);
  }
}

void maybe_release_block_barrier(Block* b) {
  if (b->at_barrier == 0 || b->at_barrier < b->alive) return;
  std::vector<int> ids;
  for (Fiber& f : b->fibers) {
    if (f.state == State::kBlockBarrier) ids.push_back(f.id);
  }
  b->at_barrier = 0;
  b->barrier_file = nullptr;
  release(b, ids);
}

void run_copies(const std::vector<PendingCopy>& group) {
  for (const PendingCopy& c : group) {
    unsigned char* dst = shared_pointer(c.dst, static_cast<size_t>(c.cp_size));
    if (c.src_size > 0) std::memcpy(dst, c.src, static_cast<size_t>(c.src_size));
    if (c.src_size < c.cp_size) std::memset(dst + c.src_size, 0, static_cast<size_t>(c.cp_size - c.src_size));
  }
}

std::string thread_ranges(const std::vector<int>& ids) {
  std::ostringstream s;
  for (size_t i = 0; i < ids.size();) {
    size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
    if (i) s << ",";
    s << ids[i];
    if (j > i) s << "-" << ids[j];
    i = j + 1;
  }
  return s.str();
}

std::string deadlock_report(Block* b) {
  std::map<std::string, std::vector<int>> groups;
  for (Fiber& f : b->fibers) {
    std::ostringstream key;
    if (f.state == State::kExited) {
      key << "exited";
    } else if (f.state == State::kBlockBarrier) {
      key << "wait at __syncthreads (" << f.file << ":" << f.line << ")";
    } else {
      key << "wait at " << f.kind << " (mask 0x" << std::hex << f.mask << std::dec << ", " << f.file << ":" << f.line
          << ")";
    }
    groups[key.str()].push_back(f.id);
  }
  std::ostringstream s;
  s << "deadlock: no thread can run (a barrier that some threads never reach?) in block (" << g_block_idx.x << ","
    << g_block_idx.y << "," << g_block_idx.z << "):";
  for (auto& [what, ids] : groups) s << "\n  threads " << thread_ranges(ids) << ": " << what;
  return s.str();
}

}  // namespace

extern "C" void cuda_emu_fiber_main(Fiber* f);

extern "C" void cuda_emu_fiber_main(Fiber* f) {
  Block* b = g_block;
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(nullptr, &b->sched_stack_bottom, &b->sched_stack_size);
#endif
  g_thread_idx = f->idx;
  try {
    b->entry(b->ctx);
    // Copies still in flight complete (a GPU finishes them too).
    for (auto& g : f->groups) run_copies(g);
    run_copies(f->open_group);
    // A lane that exits while its warp waits for it in a collective: UB on a GPU.
    Warp& w = b->warps[static_cast<size_t>(f->id / 32)];
    const unsigned bit = 1u << (f->id % 32);
    for (const Pending& p : w.pending) {
      if (p.mask & bit) fault(std::string("thread exited while its warp waits for it in ") + p.kind);
    }
  } catch (...) {
    if (!b->error) b->error = std::current_exception();
  }
  f->state = State::kExited;
  --b->alive;
  if (!b->error) maybe_release_block_barrier(b);
  switch_to_scheduler(f);
  std::abort();  // never resumed
}

namespace {

// Fiber stacks: one mapping with a guard page below each stack, reused across launches.
struct Stacks {
  unsigned char* base = nullptr;
  size_t count = 0;
  size_t page = 4096;
  unsigned char* get(size_t i) {
    if (i >= count) grow(std::max<size_t>(i + 1, 1024));
    return base + i * (kStackBytes + page) + page;
  }
  void grow(size_t n) {
    if (base) munmap(base, count * (kStackBytes + page));
    page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t bytes = n * (kStackBytes + page);
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("cuda emulator: cannot map fiber stacks");
    base = static_cast<unsigned char*>(p);
    count = n;
    for (size_t i = 0; i < n; ++i) mprotect(base + i * (kStackBytes + page), page, PROT_NONE);
  }
};
Stacks g_stacks;

void init_fiber(Block* b, Fiber& f) {
  (void)b;
#if defined(__SANITIZE_ADDRESS__)
  // The stack is reused: forget the previous fiber's frames (their poisoned redzones).
  __asan_unpoison_memory_region(f.stack, kStackBytes);
#endif
#if defined(__x86_64__)
  // Top of the stack, 16-byte aligned: [fiber_start][rbp rbx r12 r13 r14 r15][mxcsr|fpucw].
  // After the switch's ret, rsp = top (16-byte aligned), as fiber_start's call needs.
  uintptr_t top = reinterpret_cast<uintptr_t>(f.stack + kStackBytes) & ~uintptr_t{15};
  uint64_t* sp = reinterpret_cast<uint64_t*>(top);
  *--sp = reinterpret_cast<uint64_t>(&cuda_emu_fiber_start);
  *--sp = 0;                               // rbp
  *--sp = 0;                               // rbx
  *--sp = reinterpret_cast<uint64_t>(&f);  // r12: fiber_main's argument
  *--sp = 0;                               // r13
  *--sp = 0;                               // r14
  *--sp = 0;                               // r15
  uint32_t csr[2];
  asm volatile("stmxcsr %0" : "=m"(csr[0]));
  asm volatile("fnstcw %0" : "=m"(csr[1]));
  *--sp = static_cast<uint64_t>(csr[0]) | (static_cast<uint64_t>(csr[1]) << 32);
  f.sp = sp;
#else
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack;
  f.ctx.uc_stack.ss_size = kStackBytes;
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, reinterpret_cast<void (*)()>(&cuda_emu_fiber_main), 1, &f);
#endif
}

void run_block(Block* b) {
  const int n = static_cast<int>(b->fibers.size());
  b->alive = n;
  b->at_barrier = 0;
  b->barrier_file = nullptr;
  b->ready.clear();
  for (Warp& w : b->warps) w.pending.clear();
  std::vector<int> ids(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) {
    Fiber& f = b->fibers[static_cast<size_t>(i)];
    f.state = State::kReady;
    f.open_group.clear();
    f.groups.clear();
    init_fiber(b, f);
    ids[static_cast<size_t>(i)] = i;
  }
  if (b->smem) std::memset(b->smem, 0xff, b->smem_size);  // NaN in every float type
  release(b, ids);
  while (true) {
    if (b->error) break;
    if (b->ready.empty()) {
      if (b->alive == 0) break;
      b->current = nullptr;
      fault(deadlock_report(b));
    }
    Fiber* f = &b->fibers[static_cast<size_t>(b->ready.front())];
    b->ready.pop_front();
    b->current = f;
    g_thread_idx = f->idx;
#if defined(__SANITIZE_ADDRESS__)
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(&fake, f->stack, kStackBytes);
#endif
#if defined(__x86_64__)
    cuda_emu_switch(&b->sched_sp, f->sp);
#else
    swapcontext(&b->sched_ctx, &f->ctx);
#endif
#if defined(__SANITIZE_ADDRESS__)
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  }
  b->current = nullptr;
  if (b->error) std::rethrow_exception(b->error);
}

Fiber& current_fiber() {
  if (g_block == nullptr || g_block->current == nullptr) {
    throw std::runtime_error("cuda emulator: a device function was called outside a kernel");
  }
  return *g_block->current;
}

int schedule_order() {
  const char* s = std::getenv("LLAMA_FAST_EMULATE_SCHEDULE");
  if (s == nullptr || *s == 0 || std::strcmp(s, "shuffle") == 0) return 2;
  if (std::strcmp(s, "forward") == 0) return 0;
  if (std::strcmp(s, "reverse") == 0) return 1;
  throw std::runtime_error(std::string("cuda emulator: LLAMA_FAST_EMULATE_SCHEDULE must be forward, reverse or shuffle, got ") + s);
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Services for the emulated code.

void fault(const std::string& what) { throw std::runtime_error("cuda emulator: " + what + where()); }

void misaligned(const char* what, const void* p, size_t align) {
  std::ostringstream s;
  s << "misaligned " << what << " at " << p << " (needs " << align << "-byte alignment; a GPU traps)";
  fault(s.str());
}

unsigned lane_id() { return static_cast<unsigned>(current_fiber().id % 32); }

void sync_block(const char* file, int line) {
  Fiber& f = current_fiber();
  Block* b = g_block;
  if (b->barrier_file != nullptr && (b->barrier_line != line || std::strcmp(b->barrier_file, file) != 0)) {
    std::ostringstream s;
    s << "__syncthreads reached at " << file << ":" << line << " while other threads of the block wait at "
      << b->barrier_file << ":" << b->barrier_line << " (a barrier in divergent code)";
    fault(s.str());
  }
  b->barrier_file = file;
  b->barrier_line = line;
  f.state = State::kBlockBarrier;
  f.file = file;
  f.line = line;
  ++b->at_barrier;
  maybe_release_block_barrier(b);  // the last to arrive releases everyone, itself included
  switch_to_scheduler(&f);         // the schedule decides who runs first
}

void warp_collective(unsigned mask, const char* kind, Combine combine, const void* in, size_t in_bytes, void* out,
                     size_t out_bytes, const char* file, int line) {
  Fiber& f = current_fiber();
  Block* b = g_block;
  const int lane = f.id % 32;
  Warp& w = b->warps[static_cast<size_t>(f.id / 32)];
  const unsigned bit = 1u << lane;
  if (!(mask & bit)) {
    std::ostringstream s;
    s << kind << " called by lane " << lane << " with mask 0x" << std::hex << mask << " that does not include it";
    fault(s.str());
  }
  if (mask & ~w.area.lanes) {
    std::ostringstream s;
    s << kind << " with mask 0x" << std::hex << mask << " names lanes that this warp does not have (lanes 0x"
      << w.area.lanes << "; the block size is not a multiple of 32)";
    fault(s.str());
  }
  Pending* p = nullptr;
  for (Pending& q : w.pending) {
    if (q.mask & bit) p = &q;
  }
  if (p == nullptr) {
    // A new collective: its lanes must not be waiting at another one, nor have exited.
    const unsigned overlap = w.busy() & mask;
    if (overlap) {
      for (const Pending& q : w.pending) {
        if (q.mask & overlap) p = const_cast<Pending*>(&q);
      }
      std::ostringstream s;
      s << "lanes of one warp meet at different collectives: " << kind << " (mask 0x" << std::hex << mask << std::dec
        << ", " << file << ":" << line << ") while lanes wait at " << p->kind << " (mask 0x" << std::hex << p->mask
        << ")";
      fault(s.str());
    }
    for (int l = 0; l < 32; ++l) {
      if ((mask >> l & 1u) && b->fibers[static_cast<size_t>((f.id / 32) * 32 + l)].state == State::kExited) {
        std::ostringstream s;
        s << kind << " with mask 0x" << std::hex << mask << std::dec << " at " << file << ":" << line << ": lane " << l
          << " of the mask has exited";
        fault(s.str());
      }
    }
    w.pending.push_back(Pending{mask, 0, kind, combine});
    p = &w.pending.back();
  } else if (p->mask != mask || std::strcmp(p->kind, kind) != 0) {
    std::ostringstream s;
    s << "lanes of one warp meet at different collectives: " << kind << " (mask 0x" << std::hex << mask << std::dec
      << ", " << file << ":" << line << ") while lanes wait at " << p->kind << " (mask 0x" << std::hex << p->mask
      << ")";
    fault(s.str());
  }
  if (in_bytes > sizeof(w.area.in[0]) || out_bytes > sizeof(w.area.out[0])) fault("warp collective payload too large");
  if (in_bytes) std::memcpy(w.area.in[lane], in, in_bytes);
  p->arrived |= bit;
  f.state = State::kWarpBarrier;
  f.file = file;
  f.line = line;
  f.kind = kind;
  f.mask = mask;
  f.out = out;
  f.out_bytes = out_bytes;
  if (p->arrived == mask) {
    w.area.mask = mask;
    p->combine(w.area);
    std::vector<int> ids;
    for (int l = 0; l < 32; ++l) {
      if (!(mask >> l & 1u)) continue;
      Fiber& g = b->fibers[static_cast<size_t>((f.id / 32) * 32 + l)];
      if (g.out_bytes) std::memcpy(g.out, w.area.out[l], g.out_bytes);
      ids.push_back(g.id);
    }
    w.pending.erase(w.pending.begin() + (p - w.pending.data()));
    release(b, ids);
  }
  switch_to_scheduler(&f);
}

void combine_shfl(WarpArea& area) {
  for (int l = 0; l < 32; ++l) {
    if (!(area.mask >> l & 1u)) continue;
    ShflIn in;
    std::memcpy(&in, area.in[l], sizeof(in));
    if (in.src < 0 || in.src > 31 || !(area.mask >> in.src & 1u)) {
      std::ostringstream s;
      s << "shuffle: lane " << l << " reads lane " << in.src << ", which is not in the mask 0x" << std::hex
        << area.mask;
      fault(s.str());
    }
    ShflIn src;
    std::memcpy(&src, area.in[in.src], sizeof(src));
    std::memcpy(area.out[l], src.value, sizeof(src.value));
  }
}

void combine_vote(WarpArea& area) {
  unsigned ballot = 0;
  for (int l = 0; l < 32; ++l) {
    if (!(area.mask >> l & 1u)) continue;
    int p;
    std::memcpy(&p, area.in[l], sizeof(p));
    if (p) ballot |= 1u << l;
  }
  for (int l = 0; l < 32; ++l) std::memcpy(area.out[l], &ballot, sizeof(ballot));
}

unsigned char* dynamic_shared_base() {
  Block* b = g_block;
  if (b == nullptr) throw std::runtime_error("cuda emulator: dynamic shared memory outside a kernel");
  return b->smem;
}

size_t dynamic_shared_size() { return g_block ? g_block->smem_size : 0; }

uint32_t shared_address(const void* p) {
  Block* b = g_block;
  const unsigned char* c = static_cast<const unsigned char*>(p);
  if (b == nullptr || b->smem == nullptr || c < b->smem || c > b->smem + b->smem_size) {
    std::ostringstream s;
    s << "__cvta_generic_to_shared(" << p << "): not a pointer into the block's dynamic shared memory "
      << "(the emulator gives shared-window addresses to dynamic shared memory only)";
    fault(s.str());
  }
  return kSharedBase + static_cast<uint32_t>(c - b->smem);
}

unsigned char* shared_pointer(uint32_t address, size_t bytes) {
  Block* b = g_block;
  if (b == nullptr || address < kSharedBase || address - kSharedBase + bytes > b->smem_size) {
    std::ostringstream s;
    s << "shared-memory access of " << bytes << " bytes at shared offset " << static_cast<int64_t>(address) - kSharedBase
      << " is out of bounds of the " << (b ? b->smem_size : 0) << " bytes of dynamic shared memory";
    fault(s.str());
  }
  return b->smem + (address - kSharedBase);
}

void cp_async(uint32_t dst, const void* src, int cp_size, int src_size) {
  Fiber& f = current_fiber();
  if (src_size < 0 || src_size > cp_size) fault("cp.async: src-size outside [0, cp-size]");
  if (dst % static_cast<uint32_t>(cp_size) != 0) misaligned("cp.async shared destination", shared_pointer(dst, 1), cp_size);
  if (src_size > 0 && reinterpret_cast<uintptr_t>(src) % static_cast<uintptr_t>(cp_size) != 0) {
    misaligned("cp.async global source", src, static_cast<size_t>(cp_size));
  }
  shared_pointer(dst, static_cast<size_t>(cp_size));  // bounds check now, where the kernel issued it
  f.open_group.push_back(PendingCopy{dst, src, cp_size, src_size});
}

void cp_async_commit() {
  Fiber& f = current_fiber();
  f.groups.push_back(std::move(f.open_group));
  f.open_group.clear();
}

void cp_async_wait_group(int pending) {
  Fiber& f = current_fiber();
  while (static_cast<int>(f.groups.size()) > pending) {
    run_copies(f.groups.front());
    f.groups.pop_front();
  }
}

void cp_async_wait_all() {
  cp_async_commit();
  cp_async_wait_group(0);
}

void set_last_error(int err, const std::string& detail) {
  t_last_error = err;
  t_last_detail = detail;
}

void set_max_dynamic_shared(const void* kernel, int bytes) { smem_limits()[kernel] = bytes; }

void run_grid(const void* kernel, dim3 grid, dim3 block, size_t smem_bytes, void (*entry)(void*), void* ctx) {
  // Launch-time checks, reported as a GPU reports them: through cudaGetLastError.
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || threads == 0 || grid.x > 2147483647u || grid.y > 65535u ||
      grid.z > 65535u || block.x > 1024u || block.y > 1024u || block.z > 64u || threads > 1024u) {
    std::ostringstream s;
    s << "grid (" << grid.x << "," << grid.y << "," << grid.z << ") x block (" << block.x << "," << block.y << ","
      << block.z << ") is outside the limits (grid x < 2^31, y and z <= 65535, non-zero; block <= 1024 threads, "
      << "z <= 64)";
    set_last_error(cudaErrorInvalidConfiguration, s.str());
    return;
  }
  int limit = kDefaultSmem;
  {
    auto it = smem_limits().find(kernel);
    if (it != smem_limits().end()) limit = it->second;
  }
  if (smem_bytes > static_cast<size_t>(limit)) {
    set_last_error(cudaErrorInvalidValue, "launch with " + std::to_string(smem_bytes) +
                                              " bytes of dynamic shared memory, above the kernel's limit of " +
                                              std::to_string(limit) + " (cudaFuncSetAttribute raises it, up to " +
                                              std::to_string(kOptinSmem) + ")");
    return;
  }

  std::lock_guard<std::mutex> lock(g_launch_mutex);
  Block b;
  b.entry = entry;
  b.ctx = ctx;
  b.order = schedule_order();
  b.rng = 0x9e3779b97f4a7c15ull * (++g_launch_count) + 12345;
  const int n = static_cast<int>(threads);
  b.fibers.resize(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) {
    Fiber& f = b.fibers[static_cast<size_t>(i)];
    f.id = i;
    f.idx = uint3{static_cast<unsigned>(i) % block.x, (static_cast<unsigned>(i) / block.x) % block.y,
                  static_cast<unsigned>(i) / (block.x * block.y)};
    f.stack = g_stacks.get(static_cast<size_t>(i));
  }
  b.warps.resize(static_cast<size_t>((n + 31) / 32));
  for (size_t w = 0; w < b.warps.size(); ++w) {
    const int lanes = std::min(32, n - static_cast<int>(w) * 32);
    b.warps[w].area.lanes = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1u;
  }
  // Dynamic shared memory, 128-byte aligned.
  std::vector<unsigned char> smem_storage;
  if (smem_bytes > 0) {
    smem_storage.resize(smem_bytes + 128);
    uintptr_t p = reinterpret_cast<uintptr_t>(smem_storage.data());
    b.smem = reinterpret_cast<unsigned char*>((p + 127) & ~uintptr_t{127});
    b.smem_size = smem_bytes;
  }

  struct Restore {
    ~Restore() { g_block = nullptr; }
  } restore;
  g_block = &b;
  g_grid_dim = grid;
  g_block_dim = block;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        g_block_idx = uint3{x, y, z};
        run_block(&b);
      }
    }
  }
}

}  // namespace cuda_emu

// ---------------------------------------------------------------------------------------
// Misaligned accesses. build.py compiles the CUDA sources with -fsanitize=alignment (and
// without UBSan's runtime): every load and store through a typed pointer (uint4, float4,
// Pack<T, VEC>, ...) checks its alignment and calls the handler below when it is off,
// where a GPU would trap ("misaligned address"). The handler throws, naming the access.
// (The ASAN build links UBSan's own runtime instead, which reports and goes on.)
#if !defined(LLAMA_FAST_EMULATE_UBSAN_RUNTIME)
namespace {
struct UbsanSourceLocation {
  const char* file;
  uint32_t line, column;
};
struct UbsanTypeDescriptor {
  uint16_t kind, info;
  char name[1];
};
struct UbsanTypeMismatch {
  UbsanSourceLocation loc;
  const UbsanTypeDescriptor* type;
  unsigned char log_alignment;
  unsigned char check_kind;
};

void type_mismatch(UbsanTypeMismatch* data, uintptr_t pointer) {
  const uintptr_t align = uintptr_t{1} << data->log_alignment;
  if (pointer == 0 || pointer % align == 0) return;  // not an alignment failure
  std::ostringstream s;
  s << "misaligned access to " << data->type->name << " at 0x" << std::hex << pointer << std::dec << " (needs "
    << align << "-byte alignment; a GPU traps) at " << data->loc.file << ":" << data->loc.line;
  cuda_emu::fault(s.str());
}
}  // namespace

extern "C" {
void __ubsan_handle_type_mismatch_v1(UbsanTypeMismatch* data, uintptr_t pointer) { type_mismatch(data, pointer); }
void __ubsan_handle_type_mismatch_v1_abort(UbsanTypeMismatch* data, uintptr_t pointer) {
  type_mismatch(data, pointer);
}
}
#endif

// ---------------------------------------------------------------------------------------
// Runtime API.

using cuda_emu::t_last_detail;
using cuda_emu::t_last_error;

const char* cudaGetErrorName(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDeviceFunction: return "cudaErrorInvalidDeviceFunction";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorLaunchOutOfResources: return "cudaErrorLaunchOutOfResources";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
  }
  return "cudaErrorUnknown";
}

const char* cudaGetErrorString(cudaError_t err) {
  // The emulator's detail for the last error it set (this thread), else a generic text.
  static thread_local std::string text;
  text = std::string(cudaGetErrorName(err)) + " (emulated)";
  if (err != cudaSuccess && err == t_last_error && !t_last_detail.empty()) text = t_last_detail;
  return text.c_str();
}

cudaError_t cudaGetLastError() {
  const cudaError_t err = static_cast<cudaError_t>(t_last_error);
  t_last_error = 0;
  return err;
}

cudaError_t cudaPeekAtLastError() { return static_cast<cudaError_t>(t_last_error); }

cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
  if (device != 0) {
    cuda_emu::set_last_error(cudaErrorInvalidDevice, "the emulator has one device, 0");
    return cudaErrorInvalidDevice;
  }
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

// An H100 SXM's numbers.
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; break;
    case cudaDevAttrMaxBlockDimX: *value = 1024; break;
    case cudaDevAttrMaxBlockDimY: *value = 1024; break;
    case cudaDevAttrMaxBlockDimZ: *value = 64; break;
    case cudaDevAttrMaxGridDimX: *value = 2147483647; break;
    case cudaDevAttrMaxGridDimY: *value = 65535; break;
    case cudaDevAttrMaxGridDimZ: *value = 65535; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = 48 * 1024; break;
    case cudaDevAttrWarpSize: *value = 32; break;
    case cudaDevAttrMultiProcessorCount: *value = 132; break;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; break;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = 228 * 1024; break;
    case cudaDevAttrMaxRegistersPerMultiprocessor: *value = 65536; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = 227 * 1024; break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  std::memset(prop, 0, sizeof(*prop));
  std::snprintf(prop->name, sizeof(prop->name), "llama_fast CPU emulator (H100 limits)");
  prop->totalGlobalMem = size_t{80} << 30;
  prop->sharedMemPerBlock = 48 * 1024;
  prop->sharedMemPerBlockOptin = 227 * 1024;
  prop->sharedMemPerMultiprocessor = 228 * 1024;
  prop->regsPerBlock = 65536;
  prop->warpSize = 32;
  prop->maxThreadsPerBlock = 1024;
  prop->maxThreadsDim[0] = prop->maxThreadsDim[1] = 1024;
  prop->maxThreadsDim[2] = 64;
  prop->maxGridSize[0] = 2147483647;
  prop->maxGridSize[1] = prop->maxGridSize[2] = 65535;
  prop->major = 9;
  prop->minor = 0;
  prop->multiProcessorCount = 132;
  return cudaSuccess;
}

cudaError_t cudaFuncSetAttribute_impl(const void* kernel, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || value > cuda_emu::kOptinSmem) {
      cuda_emu::set_last_error(cudaErrorInvalidValue,
                               "cudaFuncSetAttribute(MaxDynamicSharedMemorySize, " + std::to_string(value) +
                                   "): above the device's " + std::to_string(cuda_emu::kOptinSmem) + " bytes");
      return cudaErrorInvalidValue;
    }
    cuda_emu::set_max_dynamic_shared(kernel, value);
  }
  return cudaSuccess;
}
