// A stage worker for agentrun's Work protocol in C++, as the Python Runner and the Go
// work.Worker are: the rules of agentrun.work.WorkProtocol (credits, batched settles, lease
// extension, heartbeats, revocations, reconnect and resume, drain) over gRPC's synchronous API,
// each running task on its own thread (a pool of at most `credits`, reused).
#pragma once

#include <chrono>
#include <condition_variable>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>

#include "agentrun/client.h"

namespace agentrun {

// What a stage function returns: the pathway to take ("" at a stage without pathways) and an
// optional JSON-like output handed to the next stage (see ValueFromJson).
struct StageResult {
  std::string pathway;
  std::optional<v1::Value> output;
};

// Thrown by a stage function: the task fails for good (a dead letter), not retried. Any other
// exception fails the attempt, retried with backoff while attempts remain.
class PermanentError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Thrown by a stage function: hand the task back to run again after `after`, no attempt spent
// (a rate limit), as the Python Runner's Retry(after=...).
class RetryLater : public std::runtime_error {
 public:
  explicit RetryLater(std::chrono::milliseconds after)
      : std::runtime_error("run again later"), after(after) {}
  std::chrono::milliseconds after;
};

// Tells a stage function that the server took its lease back (the task was cancelled, its lease
// expired, or the stream was refused): stop, the result is not settled. The thread-per-task
// counterpart of the Go worker's ctx and the TypeScript worker's AbortSignal: test it between
// steps (`if (revoked) ...`), and wait with WaitFor rather than sleeping, so that a revocation
// wakes the function at once and a thousand waiting tasks cost no CPU.
class Revocation {
 public:
  bool revoked() const;
  explicit operator bool() const { return revoked(); }
  // Blocks up to `timeout`, returning early once the lease is revoked; true if it was.
  bool WaitFor(std::chrono::milliseconds timeout) const;
  void Revoke();  // called by the Worker

 private:
  mutable std::mutex mutex_;
  mutable std::condition_variable changed_;
  bool revoked_ = false;
};

// A stage function: one task's lease (its run in lease.agent_run(), the previous stage's output
// in lease.input()) and its Revocation.
using StageFunction =
    std::function<StageResult(const v1::Lease& lease, const Revocation& revoked)>;

struct WorkerOptions {
  std::string workflow;
  std::map<std::string, StageFunction> stages;
  uint32_t credits = 16;         // tasks at once, a pooled thread each
  bool exit_when_empty = false;  // return once the stages hold no task (notify_when_empty)
  std::string name = "cpp-worker";
};

struct WorkerSummary {
  std::map<std::string, int> completed, failed, dead, retried, revoked;
};

// A JSON text as a wire Value: integers stay integers, other numbers are doubles. Throws
// std::invalid_argument on text that is not JSON.
v1::Value ValueFromJson(const std::string& json);

class Worker {
 public:
  Worker(std::shared_ptr<grpc::Channel> channel, WorkerOptions options);
  ~Worker();
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  // Works until drained and nothing is held, the stages are empty (exit_when_empty), or the
  // server refuses the stream for good (thrown as std::runtime_error naming the status).
  // Broken streams are reopened and their leases resumed.
  WorkerSummary Run();

  // Asks for no new leases; Run returns once the running tasks are settled. Thread-safe (call
  // it from a thread that waits for SIGTERM, say).
  void Drain();

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace agentrun
