// The trainer's bridge to torch.distributed's C++ core (c10d) in libtorch: a TCP store for
// the rendezvous, a Gloo (CPU) or NCCL (CUDA) process group on it, and the collectives the
// trainer needs, behind a C interface that Rust calls (trainer/src/distributed.rs). Tensors
// cross as tch's handles (`at::Tensor*`). Every entry point catches C++ exceptions and
// returns their message in `*err` (free it with rd_c10d_free_str).
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef RD_C10D_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

namespace {

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
};

char* dup(const std::string& s) {
  char* p = static_cast<char*>(std::malloc(s.size() + 1));
  if (p != nullptr) {
    std::memcpy(p, s.c_str(), s.size() + 1);
  }
  return p;
}

template <typename F>
int guarded(char** err, F&& f) {
  try {
    f();
    return 0;
  } catch (const c10::Error& e) {
    *err = dup(e.what_without_backtrace());
  } catch (const std::exception& e) {
    *err = dup(e.what());
  } catch (...) {
    *err = dup("unknown C++ exception in c10d");
  }
  return 1;
}


}  // namespace

extern "C" {

// Joins the group: `backend` "gloo" or "nccl"; the TCP store at host:port (hosted by rank 0
// unless `store_is_agent`: torchrun's agent already hosts it); `timeout_ms` bounds the
// rendezvous and every collective. NULL on failure, with the reason in *err.
void* rd_c10d_new(const char* backend, const char* host, uint16_t port, int rank, int world,
                  int64_t timeout_ms, int store_is_agent, char** err) {
  Group* g = nullptr;
  guarded(err, [&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions opts;
    opts.port = port;
    opts.isServer = rank == 0 && store_is_agent == 0;
    opts.numWorkers = world;
    opts.waitWorkers = store_is_agent == 0;
    opts.timeout = timeout;
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    auto store = c10::make_intrusive<c10d::PrefixStore>("reddino", tcp);
    std::string b(backend);
    c10::intrusive_ptr<c10d::Backend> pg;
    if (b == "gloo") {
      auto o = c10d::ProcessGroupGloo::Options::create();
      o->timeout = timeout;
      const char* ifname = std::getenv("GLOO_SOCKET_IFNAME");
      if (ifname != nullptr && ifname[0] != '\0') {
        o->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
      } else {
        o->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
      }
      pg = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, o);
    } else if (b == "nccl") {
#ifdef RD_C10D_NCCL
      auto o = c10d::ProcessGroupNCCL::Options::create();
      o->timeout = timeout;
      pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, o);
#else
      throw std::runtime_error(
          "this trainer was built without NCCL (build with the `nccl` feature on a machine "
          "with the CUDA torch wheel)");
#endif
    } else {
      throw std::runtime_error("unknown backend `" + b + "` (gloo or nccl)");
    }
    g = new Group{tcp, pg};
  });
  return g;
}

// In-place sum (op 0) or max (op 1) of each tensor over all ranks, one collective per tensor.
int rd_c10d_all_reduce(void* group, at::Tensor** ts, int n, int op, char** err) {
  return guarded(err, [&] {
    auto* g = static_cast<Group*>(group);
    c10d::AllreduceOptions o;
    o.reduceOp = op == 1 ? c10d::ReduceOp::MAX : c10d::ReduceOp::SUM;
    for (int i = 0; i < n; ++i) {
      std::vector<at::Tensor> one{*ts[i]};
      g->backend->allreduce(one, o)->wait();
    }
  });
}

// Rank `root`'s values of each tensor, in place on every rank.
int rd_c10d_broadcast(void* group, at::Tensor** ts, int n, int root, char** err) {
  return guarded(err, [&] {
    auto* g = static_cast<Group*>(group);
    c10d::BroadcastOptions o;
    o.rootRank = root;
    for (int i = 0; i < n; ++i) {
      std::vector<at::Tensor> one{*ts[i]};
      g->backend->broadcast(one, o)->wait();
    }
  });
}

int rd_c10d_barrier(void* group, char** err) {
  return guarded(err, [&] {
    auto* g = static_cast<Group*>(group);
    g->backend->barrier()->wait();
  });
}

void rd_c10d_free(void* group) {
  delete static_cast<Group*>(group);
}

void rd_c10d_free_str(char* s) {
  std::free(s);
}

}  // extern "C"
