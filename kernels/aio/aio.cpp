// Asynchronous reads and writes of host memory to files over Linux libaio.
//
// One AioHandle owns N worker threads, each with its own io_context of
// `queue_depth` slots. submit() splits a request into block_size pieces, deals
// them round-robin to the workers and returns at once; each worker keeps its
// context full (submit) while reaping completions (io_getevents), so submission
// and completion overlap. wait() blocks until every submitted request finished
// and returns one result per request: (id, errno, short_read, bytes_done).
//
// The Python side (accel_zero/ops.py) opens the file (O_DIRECT when it can),
// validates offsets and sizes, turns results into exceptions carrying errno and
// path, and keeps the tensors alive until wait() returned their ids. This file
// deliberately uses plain pybind11 and no torch headers so it builds in seconds.
//
// [Note: O_DIRECT alignment]
// O_DIRECT needs buffer address, length and file offset aligned to the logical
// block size (4096 covers every device we know). Offsets are checked in Python.
// The aligned body of a request goes straight from/to user memory when the user
// pointer is aligned (ops.aligned_empty gives such buffers), else through a
// per-slot aligned bounce buffer. The tail (< 4096 bytes) always goes through a
// bounce buffer: a write is zero-padded to a whole block, a read fetches the
// whole block and copies out exactly the bytes asked for.

#include <fcntl.h>
#include <libaio.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cerrno>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

namespace py = pybind11;

namespace {

constexpr int64_t kAlign = 4096;

struct Op {
  int64_t id = 0;
  int fd = -1;
  bool write = false;
  bool direct = false;
  bool close_fd = false;
  char* buf = nullptr;
  int64_t nbytes = 0;
  int64_t offset = 0;
  std::atomic<int64_t> remaining{0};
  std::atomic<int> err{0};
  std::atomic<bool> short_read{false};
  std::atomic<int64_t> done_bytes{0};

  void fail(int e) {
    int expected = 0;
    err.compare_exchange_strong(expected, e);
  }
};

struct Task {
  Op* op = nullptr;
  int64_t rel = 0;     // offset of the piece inside the request
  int64_t len = 0;     // bytes of user data in the piece
  int64_t io_len = 0;  // bytes actually transferred (len, or len padded to kAlign)
  bool bounce = false;
};

using Result = std::tuple<int64_t, int, bool, int64_t>;

class AioHandle;

struct Worker {
  io_context_t ctx{};
  std::mutex mu;
  std::condition_variable cv;
  std::deque<Task> queue;
  bool stop = false;
  std::thread thread;
};

class AioHandle {
 public:
  AioHandle(int64_t block_size, int queue_depth, int threads)
      : block_size_(block_size), queue_depth_(queue_depth) {
    if (block_size <= 0 || block_size % kAlign != 0) {
      throw std::invalid_argument("block_size must be a positive multiple of 4096, got " +
                                  std::to_string(block_size));
    }
    if (queue_depth <= 0) throw std::invalid_argument("queue_depth must be >= 1");
    if (threads <= 0) throw std::invalid_argument("threads must be >= 1");
    workers_.reserve(threads);
    for (int i = 0; i < threads; ++i) {
      auto w = std::make_unique<Worker>();
      int rc = io_setup(queue_depth, &w->ctx);
      if (rc < 0) {
        shutdown();
        throw std::runtime_error(std::string("io_setup(") + std::to_string(queue_depth) +
                                 ") failed: " + std::strerror(-rc) +
                                 " (raise /proc/sys/fs/aio-max-nr or lower queue_depth)");
      }
      workers_.push_back(std::move(w));
    }
    for (auto& w : workers_) {
      Worker* raw = w.get();
      raw->thread = std::thread([this, raw] { run(*raw); });
    }
  }

  ~AioHandle() { shutdown(); }

  int64_t submit(int fd, bool write, uintptr_t ptr, int64_t nbytes, int64_t offset,
                 bool close_fd) {
    if (nbytes < 0 || offset < 0) throw std::invalid_argument("negative size or offset");
    auto op = std::make_unique<Op>();
    Op* o = op.get();
    o->fd = fd;
    o->write = write;
    o->close_fd = close_fd;
    o->buf = reinterpret_cast<char*>(ptr);
    o->nbytes = nbytes;
    o->offset = offset;
    int flags = fcntl(fd, F_GETFL);
    o->direct = flags >= 0 && (flags & O_DIRECT) != 0;
    bool aligned_ptr = (ptr % kAlign) == 0;

    std::vector<Task> tasks;
    int64_t body = nbytes & ~(kAlign - 1);
    for (int64_t rel = 0; rel < body; rel += block_size_) {
      int64_t len = std::min(block_size_, body - rel);
      tasks.push_back(Task{o, rel, len, len, o->direct && !aligned_ptr});
    }
    int64_t tail = nbytes - body;
    if (tail > 0) {
      // Writes are always padded (files look the same with and without O_DIRECT).
      bool pad = write || o->direct;
      tasks.push_back(Task{o, body, tail, pad ? kAlign : tail, pad});
    }
    {
      std::lock_guard<std::mutex> lk(mu_);
      o->id = next_id_++;
      ++submitted_;
      ops_[o->id] = std::move(op);
    }
    int64_t id = o->id;
    if (tasks.empty()) {
      finish(o);
      return id;
    }
    o->remaining.store(static_cast<int64_t>(tasks.size()));
    // Deal pieces round-robin; hand each worker its share under one lock.
    const size_t nw = workers_.size();
    std::vector<std::vector<Task>> share(nw);
    for (size_t i = 0; i < tasks.size(); ++i) share[(next_worker_ + i) % nw].push_back(tasks[i]);
    next_worker_ = (next_worker_ + tasks.size()) % nw;
    for (size_t i = 0; i < nw; ++i) {
      if (share[i].empty()) continue;
      Worker& w = *workers_[i];
      {
        std::lock_guard<std::mutex> lk(w.mu);
        for (auto& t : share[i]) w.queue.push_back(t);
      }
      w.cv.notify_one();
    }
    return id;
  }

  std::vector<Result> wait() {
    std::unique_lock<std::mutex> lk(mu_);
    done_cv_.wait(lk, [this] { return completed_ == submitted_; });
    std::vector<Result> out;
    out.swap(results_);
    for (auto& r : out) ops_.erase(std::get<0>(r));
    return out;
  }

  int64_t pending() {
    std::lock_guard<std::mutex> lk(mu_);
    return submitted_ - completed_;
  }

  int64_t block_size() const { return block_size_; }
  int queue_depth() const { return queue_depth_; }
  int threads() const { return static_cast<int>(workers_.size()); }

 private:
  struct Slot {
    Task task;
    char* bounce = nullptr;
    char* io_buf = nullptr;
  };

  void shutdown() {
    for (auto& w : workers_) {
      {
        std::lock_guard<std::mutex> lk(w->mu);
        w->stop = true;
      }
      w->cv.notify_all();
    }
    for (auto& w : workers_) {
      if (w->thread.joinable()) w->thread.join();
      if (w->ctx) io_destroy(w->ctx);
      w->ctx = nullptr;
    }
  }

  void finish(Op* o) {
    if (o->close_fd && o->fd >= 0) close(o->fd);
    std::lock_guard<std::mutex> lk(mu_);
    results_.emplace_back(o->id, o->err.load(), o->short_read.load(), o->done_bytes.load());
    ++completed_;
    if (completed_ == submitted_) done_cv_.notify_all();
  }

  // Finish a piece synchronously after the kernel transferred only `done` bytes.
  static int64_t finish_sync(Op* o, const Task& t, char* io_buf, int64_t done) {
    while (done < t.io_len) {
      off_t at = static_cast<off_t>(o->offset + t.rel + done);
      ssize_t r = o->write ? pwrite(o->fd, io_buf + done, t.io_len - done, at)
                           : pread(o->fd, io_buf + done, t.io_len - done, at);
      if (r < 0) {
        if (errno == EINTR) continue;
        // An unaligned O_DIRECT remainder fails with EINVAL; a short write on a
        // regular file means the device is full.
        o->fail(o->write && errno == EINVAL ? ENOSPC : errno);
        return done;
      }
      if (r == 0) {
        if (o->write) o->fail(ENOSPC);
        return done;
      }
      done += r;
    }
    return done;
  }

  void complete(Slot& s, long res) {
    Task& t = s.task;
    Op* o = t.op;
    if (res < 0) {
      o->fail(static_cast<int>(-res));
    } else {
      int64_t got = res;
      if (got < t.io_len) got = finish_sync(o, t, s.io_buf, got);
      if (o->write) {
        if (got >= t.io_len) o->done_bytes += t.len;
      } else if (got < t.len) {
        if (o->err.load() == 0) o->short_read = true;
        o->fail(EIO);
      } else {
        if (t.bounce) std::memcpy(o->buf + t.rel, s.bounce, t.len);
        o->done_bytes += t.len;
      }
    }
    if (--o->remaining == 0) finish(o);
  }

  void run(Worker& w) {
    const int qd = queue_depth_;
    std::vector<iocb> cbs(qd);
    std::vector<Slot> slots(qd);
    std::vector<int> free_slots;
    for (int i = qd - 1; i >= 0; --i) free_slots.push_back(i);
    std::vector<iocb*> batch;
    std::vector<io_event> events(qd);
    int inflight = 0;
    for (;;) {
      std::vector<Task> take;
      {
        std::unique_lock<std::mutex> lk(w.mu);
        if (inflight == 0) w.cv.wait(lk, [&] { return w.stop || !w.queue.empty(); });
        if (w.stop && w.queue.empty() && inflight == 0) break;
        while (!w.queue.empty() && static_cast<int>(take.size()) < qd - inflight) {
          take.push_back(w.queue.front());
          w.queue.pop_front();
        }
      }
      batch.clear();
      for (auto& t : take) {
        int si = free_slots.back();
        free_slots.pop_back();
        Slot& s = slots[si];
        s.task = t;
        s.io_buf = t.op->buf + t.rel;
        if (t.bounce) {
          if (s.bounce == nullptr) {
            void* mem = nullptr;
            if (posix_memalign(&mem, kAlign, static_cast<size_t>(block_size_)) != 0) mem = nullptr;
            s.bounce = static_cast<char*>(mem);
          }
          if (s.bounce == nullptr) {
            free_slots.push_back(si);
            complete(s, -ENOMEM);
            continue;
          }
          s.io_buf = s.bounce;
          if (t.op->write) {
            std::memcpy(s.bounce, t.op->buf + t.rel, t.len);
            std::memset(s.bounce + t.len, 0, t.io_len - t.len);
          }
        }
        iocb* cb = &cbs[si];
        long long at = t.op->offset + t.rel;
        if (t.op->write) {
          io_prep_pwrite(cb, t.op->fd, s.io_buf, t.io_len, at);
        } else {
          io_prep_pread(cb, t.op->fd, s.io_buf, t.io_len, at);
        }
        cb->data = reinterpret_cast<void*>(static_cast<intptr_t>(si));
        batch.push_back(cb);
      }
      size_t sent = 0;
      while (sent < batch.size()) {
        int r = io_submit(w.ctx, static_cast<long>(batch.size() - sent), batch.data() + sent);
        if (r > 0) {
          sent += r;
          inflight += r;
          continue;
        }
        if ((r == -EAGAIN || r == 0) && inflight > 0) {
          inflight -= reap(w, events, slots, free_slots, 1);
          continue;
        }
        if (r == -EAGAIN || r == 0) {
          std::this_thread::sleep_for(std::chrono::microseconds(50));
          continue;
        }
        // The request was refused outright (bad fd, EINVAL, ...): fail the rest.
        for (size_t k = sent; k < batch.size(); ++k) {
          int si = static_cast<int>(reinterpret_cast<intptr_t>(batch[k]->data));
          complete(slots[si], r);
          free_slots.push_back(si);
        }
        break;
      }
      if (inflight > 0) inflight -= reap(w, events, slots, free_slots, 1);
    }
    for (auto& s : slots) std::free(s.bounce);
  }

  int reap(Worker& w, std::vector<io_event>& events, std::vector<Slot>& slots,
           std::vector<int>& free_slots, int min_nr) {
    int n;
    do {
      n = io_getevents(w.ctx, min_nr, static_cast<long>(events.size()), events.data(), nullptr);
    } while (n == -EINTR);
    if (n < 0) throw std::runtime_error(std::string("io_getevents: ") + std::strerror(-n));
    for (int i = 0; i < n; ++i) {
      int si = static_cast<int>(reinterpret_cast<intptr_t>(events[i].data));
      complete(slots[si], static_cast<long>(events[i].res));
      free_slots.push_back(si);
    }
    return n;
  }

  const int64_t block_size_;
  const int queue_depth_;
  std::vector<std::unique_ptr<Worker>> workers_;
  size_t next_worker_ = 0;

  std::mutex mu_;  // guards everything below
  std::condition_variable done_cv_;
  int64_t next_id_ = 0;
  int64_t submitted_ = 0;
  int64_t completed_ = 0;
  std::map<int64_t, std::unique_ptr<Op>> ops_;
  std::vector<Result> results_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "accel_zero libaio engine (see accel_zero/ops.py for the public API)";
  py::class_<AioHandle>(m, "AioHandle")
      .def(py::init<int64_t, int, int>(), py::arg("block_size"), py::arg("queue_depth"),
           py::arg("threads"))
      .def("submit", &AioHandle::submit, py::arg("fd"), py::arg("write"), py::arg("ptr"),
           py::arg("nbytes"), py::arg("offset"), py::arg("close_fd"),
           py::call_guard<py::gil_scoped_release>())
      .def("wait", &AioHandle::wait, py::call_guard<py::gil_scoped_release>())
      .def("pending", &AioHandle::pending)
      .def_property_readonly("block_size", &AioHandle::block_size)
      .def_property_readonly("queue_depth", &AioHandle::queue_depth)
      .def_property_readonly("threads", &AioHandle::threads);
}
