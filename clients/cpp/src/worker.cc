#include "agentrun/worker.h"

#include <google/protobuf/struct.pb.h>
#include <google/protobuf/util/json_util.h>
#include <google/protobuf/util/time_util.h>

#include <algorithm>
#include <condition_variable>
#include <deque>
#include <iostream>
#include <mutex>
#include <random>
#include <set>
#include <thread>
#include <variant>
#include <vector>

namespace agentrun {

using Clock = std::chrono::system_clock;
using google::protobuf::util::TimeUtil;

namespace {

v1::Value Convert(const google::protobuf::Value& in) {
  v1::Value out;
  switch (in.kind_case()) {
    case google::protobuf::Value::kNumberValue: {
      double number = in.number_value();
      if (number == static_cast<double>(static_cast<int64_t>(number))) {
        out.set_int_value(static_cast<int64_t>(number));
      } else {
        out.set_double_value(number);
      }
      break;
    }
    case google::protobuf::Value::kStringValue:
      out.set_string_value(in.string_value());
      break;
    case google::protobuf::Value::kBoolValue:
      out.set_bool_value(in.bool_value());
      break;
    case google::protobuf::Value::kListValue:
      for (const auto& item : in.list_value().values()) {
        *out.mutable_list_value()->add_values() = Convert(item);
      }
      break;
    case google::protobuf::Value::kStructValue: {
      // protobuf's Struct is a map: keys come out sorted, as encoding/json writes them in Go.
      std::vector<std::string> keys;
      for (const auto& field : in.struct_value().fields()) keys.push_back(field.first);
      std::sort(keys.begin(), keys.end());
      for (const auto& key : keys) {
        auto* field = out.mutable_struct_value()->add_fields();
        field->set_key(key);
        *field->mutable_value() = Convert(in.struct_value().fields().at(key));
      }
      break;
    }
    default:
      out.set_null_value(google::protobuf::NULL_VALUE);
  }
  return out;
}

double Seconds(const google::protobuf::Timestamp& t) {
  return static_cast<double>(t.seconds()) + t.nanos() / 1e9;
}

double Now() {
  return std::chrono::duration<double>(Clock::now().time_since_epoch()).count();
}

google::protobuf::Duration DurationOf(double seconds) {
  return TimeUtil::NanosecondsToDuration(static_cast<int64_t>(seconds * 1e9));
}

enum Kind { kComplete, kFail, kRelease, kExtend, kKinds };

struct Held {
  v1::Lease lease;
  double deadline;
  double duration;
  bool extending = false;
};

struct Outcome {
  std::string task_id, lease_id;
  enum { kDone, kFailed, kPermanent, kRetryLater } kind;
  StageResult result;
  std::string error;
  std::chrono::milliseconds after{0};
};

struct StreamEnd {
  grpc::Status status;
};

using Event = std::variant<v1::WorkResponse, StreamEnd, Outcome>;

}  // namespace

v1::Value ValueFromJson(const std::string& json) {
  google::protobuf::Value value;
  auto parsed = google::protobuf::util::JsonStringToMessage(json, &value);
  if (!parsed.ok()) throw std::invalid_argument("not JSON: " + parsed.ToString());
  return Convert(value);
}

bool Revocation::revoked() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return revoked_;
}

bool Revocation::WaitFor(std::chrono::milliseconds timeout) const {
  std::unique_lock<std::mutex> lock(mutex_);
  return changed_.wait_for(lock, timeout, [this] { return revoked_; });
}

void Revocation::Revoke() {
  std::lock_guard<std::mutex> lock(mutex_);
  revoked_ = true;
  changed_.notify_all();
}

// Threads for stage functions, made as needed up to `size` and reused: a thread per running task
// without a thread's creation and join on the session's thread for each one.
class Pool {
 public:
  explicit Pool(size_t size) : size_(size) {}

  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    changed_.notify_all();
    for (auto& thread : threads_) thread.join();  // running functions finish first
  }

  void Submit(std::function<void()> job) {
    std::lock_guard<std::mutex> lock(mutex_);
    jobs_.push_back(std::move(job));
    if (jobs_.size() > waiting_ && threads_.size() < size_) {
      threads_.emplace_back([this] { Loop(); });
    } else {
      changed_.notify_one();
    }
  }

 private:
  void Loop() {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      if (jobs_.empty() && !stopping_) {
        ++waiting_;
        changed_.wait(lock, [this] { return stopping_ || !jobs_.empty(); });
        --waiting_;
      }
      if (jobs_.empty()) return;
      std::function<void()> job = std::move(jobs_.front());
      jobs_.pop_front();
      lock.unlock();
      job();
      lock.lock();
    }
  }

  const size_t size_;
  std::mutex mutex_;
  std::condition_variable changed_;
  std::deque<std::function<void()>> jobs_;
  std::vector<std::thread> threads_;
  size_t waiting_ = 0;
  bool stopping_ = false;
};

// The Work session: the state of agentrun.work.WorkProtocol, owned by Run's thread; the stream's
// reader and the tasks' threads only post events.
class Worker::Impl {
 public:
  Impl(std::shared_ptr<grpc::Channel> channel, WorkerOptions options)
      : stub_(v1::OrchestratorService::NewStub(channel)),
        options_(std::move(options)),
        pool_(std::make_unique<Pool>(options_.credits)) {}

  void Drain() {
    std::lock_guard<std::mutex> lock(mutex_);
    drain_asked_ = true;
    changed_.notify_all();
  }

  WorkerSummary Run() {
    std::mt19937 random(std::random_device{}());
    for (int attempt = 1;; ++attempt) {
      bool streamed = false;
      grpc::Status status = Stream(&streamed);
      if (closing_ && Unsettled() == 0 && running_.empty()) return summary_;
      if (streamed) attempt = 1;
      grpc::StatusCode code = status.error_code();
      if (IsRefused(code)) {
        for (auto& [key, revocation] : running_) revocation->Revoke();
        throw std::runtime_error("the orchestrator refused the Work stream (code " +
                                 std::to_string(static_cast<int>(code)) +
                                 "): " + status.error_message());
      }
      double delay = std::min(30.0, 0.25 * (1 << std::min(attempt - 1, 10))) *
                     std::uniform_real_distribution<double>(0.8, 1.2)(random);
      std::cerr << "agentrun: work stream ended (" << status.error_message() << "); reconnecting in "
                << delay << " s, " << held_.size() << " leases held\n";
      Wait(std::chrono::duration<double>(delay));
    }
  }

 private:
  // --- events --------------------------------------------------------------------------------

  void Post(Event event) {
    std::lock_guard<std::mutex> lock(mutex_);
    events_.push_back(std::move(event));
    changed_.notify_all();
  }

  // The next event, or none by `until`; a drain asked meanwhile is taken up first.
  std::optional<Event> Next(Clock::time_point until) {
    std::unique_lock<std::mutex> lock(mutex_);
    changed_.wait_until(lock, until, [this] { return !events_.empty() || drain_asked_; });
    if (drain_asked_) {
      drain_asked_ = false;
      lock.unlock();
      StartDrain();
      return std::nullopt;
    }
    if (events_.empty()) return std::nullopt;
    Event event = std::move(events_.front());
    events_.pop_front();
    return event;
  }

  void Wait(std::chrono::duration<double> delay) {
    auto until = Clock::now() + std::chrono::duration_cast<Clock::duration>(delay);
    while (Clock::now() < until) {
      auto event = Next(until);
      if (event && std::holds_alternative<Outcome>(*event)) Settle(std::get<Outcome>(*event));
    }
  }

  // --- one stream ----------------------------------------------------------------------------

  grpc::Status Stream(bool* streamed) {
    grpc::ClientContext context;
    auto stream = stub_->Work(&context);
    v1::WorkRequest subscribe;
    auto* s = subscribe.mutable_subscribe();
    s->set_workflow(options_.workflow);
    s->set_credits(options_.credits);
    s->set_worker(options_.name);
    s->set_notify_when_empty(options_.exit_when_empty);
    for (const auto& stage : options_.stages) s->add_stages()->set_stage(stage.first);
    std::vector<std::pair<std::string, std::string>> resumed;
    for (const auto& [task, held] : held_) {
      auto* ref = s->add_resume();
      ref->set_task_id(task);
      ref->set_lease_id(held.lease.lease_id());
      resumed.emplace_back(task, held.lease.lease_id());
    }
    reconnect_asked_ = false;
    last_write_ = Now();
    stream->Write(subscribe);
    v1::WorkResponse first;
    if (!stream->Read(&first)) return stream->Finish();
    if (!first.has_subscribed()) {
      context.TryCancel();
      stream->Finish();
      return grpc::Status(grpc::StatusCode::INTERNAL, "the first Work message was not subscribed");
    }
    OnSubscribed(first.subscribed(), resumed);
    *streamed = true;
    std::thread reader([this, &stream] {
      v1::WorkResponse response;
      while (stream->Read(&response)) Post(response);
      Post(StreamEnd{stream->Finish()});
    });
    bool sent_close = false;
    grpc::Status ended;
    for (;;) {
      StartTasks();
      if (!sent_close) {
        for (const auto& request : Outgoing(Now())) {
          if (!stream->Write(request)) break;  // the reader gets the status
        }
      }
      if (!closing_ && Finished() && running_.empty() && Unsettled() == 0) Close();
      if (DoneWriting() && !sent_close) {
        sent_close = true;
        stream->WritesDone();
      }
      // Every event already waiting is taken before writing: tasks that finish together are
      // settled in one message per kind, not one message each.
      bool over = false;
      for (auto event = Next(NextWriteAt(Now())); event && !over; event = Next(Clock::now())) {
        if (auto* response = std::get_if<v1::WorkResponse>(&*event)) {
          OnResponse(*response);
        } else if (auto* outcome = std::get_if<Outcome>(&*event)) {
          Settle(*outcome);
        } else {
          ended = std::get<StreamEnd>(*event).status;
          over = true;
        }
      }
      if (over) break;
    }
    reader.join();
    return ended;
  }

  // --- the protocol (a port of agentrun.work.WorkProtocol) -----------------------------------

  void OnSubscribed(const v1::Subscribed& subscribed,
                    const std::vector<std::pair<std::string, std::string>>& resumed) {
    idle_timeout_ = subscribed.has_idle_timeout()
                        ? TimeUtil::DurationToNanoseconds(subscribed.idle_timeout()) / 1e9
                        : 0;
    for (size_t i = 0; i < resumed.size() && i < static_cast<size_t>(subscribed.resumed_size()); ++i) {
      auto held = held_.find(resumed[i].first);
      if (held == held_.end() || held->second.lease.lease_id() != resumed[i].second) continue;
      const auto& ack = subscribed.resumed(static_cast<int>(i));
      if (ack.code() == 0) {
        held->second.deadline = Seconds(ack.deadline());
        held->second.extending = false;
      } else {
        Revoke(held->first, "not resumed: " + ack.message());
      }
    }
    for (auto& [kind, items] : written_) {  // never acked: written again (a repeat is answered
      if (kind == kExtend) continue;        // as the first was); extensions are redone when due
      pending_[kind].insert(pending_[kind].begin(), items.begin(), items.end());
      for (const auto& item : items) resent_.insert(item.task_id() + "/" + item.lease_id());
    }
    written_.clear();
    for (auto& [task, held] : held_) held.extending = false;
    drain_pending_ = draining_;
  }

  void OnResponse(const v1::WorkResponse& response) {
    if (response.has_leases()) {
      for (const auto& lease : response.leases().leases()) {
        double deadline = Seconds(lease.deadline());
        held_[lease.task_id()] = Held{lease, deadline, std::max(0.0, deadline - Now())};
        ready_.push_back(lease.task_id());
      }
      empty_ = false;
    } else if (response.has_acks()) {
      OnAcks(response.acks());
    } else if (response.has_revoked()) {
      for (const auto& item : response.revoked().leases()) {
        auto held = held_.find(item.task_id());
        if (held != held_.end() && held->second.lease.lease_id() == item.lease_id()) {
          std::string reason = v1::RevokeReason_Name(item.reason());
          Revoke(item.task_id(), reason);
        }
      }
    } else if (response.has_stages_empty()) {
      empty_ = true;
    } else if (response.has_reconnect()) {
      reconnect_asked_ = true;
    }
  }

  void Revoke(const std::string& task_id, const std::string& reason) {
    auto held = held_.find(task_id);
    const v1::Lease& lease = held->second.lease;
    summary_.revoked[lease.stage()]++;
    auto running = running_.find(task_id + "/" + lease.lease_id());
    if (running != running_.end()) running->second->Revoke();
    std::cerr << "agentrun: task " << task_id << " (" << lease.stage() << ") revoked: " << reason
              << "\n";
    ready_.erase(std::remove(ready_.begin(), ready_.end(), task_id), ready_.end());
    held_.erase(held);
  }

  void OnAcks(const v1::AckBatch& batch) {
    if (written_.empty()) return;
    auto [kind, items] = written_.front();
    written_.pop_front();
    for (const auto& ack : batch.acks()) {
      auto held = held_.find(ack.task_id());
      bool mine = held != held_.end() && held->second.lease.lease_id() == ack.lease_id();
      if (kind == kExtend && mine) {
        held->second.extending = false;
        if (ack.code() == 0) held->second.deadline = Seconds(ack.deadline());
      }
      std::string key = ack.task_id() + "/" + ack.lease_id();
      bool resent = resent_.erase(key) > 0;
      if (ack.code() == 3 && (kind == kComplete || kind == kRelease)) {
        // Refused as malformed, the lease still held on the server: fail the attempt with the
        // server's reason rather than leave it leased until it expires.
        Item failure;
        failure.set_task_id(ack.task_id());
        failure.set_lease_id(ack.lease_id());
        failure.failure.set_task_id(ack.task_id());
        failure.failure.set_lease_id(ack.lease_id());
        failure.failure.set_error("the server refused the worker's " +
                                  std::string(kind == kComplete ? "completion" : "release") +
                                  ": " + ack.message());
        failure.failure.set_non_retryable(kind == kComplete);
        pending_[kFail].push_back(failure);
      }
      if (ack.code() != 0 && !resent) {
        std::cerr << "agentrun: task " << ack.task_id() << ": the server refused a settle: "
                  << ack.message() << "\n";
      }
    }
  }

  // One settle or extension item, of whichever kind.
  struct Item {
    std::string task_id_, lease_id_;
    v1::TaskCompletion completion;
    v1::TaskFailure failure;
    v1::TaskRelease release;
    v1::LeaseExtension extension;
    const std::string& task_id() const { return task_id_; }
    const std::string& lease_id() const { return lease_id_; }
    void set_task_id(const std::string& v) { task_id_ = v; }
    void set_lease_id(const std::string& v) { lease_id_ = v; }
  };

  bool Holds(const std::string& task_id, const std::string& lease_id) const {
    auto held = held_.find(task_id);
    return held != held_.end() && held->second.lease.lease_id() == lease_id;
  }

  void Queue(Kind kind, Item item) {
    held_.erase(item.task_id());
    pending_[kind].push_back(std::move(item));
  }

  void Settle(const Outcome& outcome) {
    std::string key = outcome.task_id + "/" + outcome.lease_id;
    running_.erase(key);
    auto held = held_.find(outcome.task_id);
    if (!Holds(outcome.task_id, outcome.lease_id)) return;  // revoked meanwhile: never settled
    const v1::Lease& lease = held->second.lease;
    const std::string stage = lease.stage();
    Item item;
    item.set_task_id(outcome.task_id);
    item.set_lease_id(outcome.lease_id);
    switch (outcome.kind) {
      case Outcome::kDone:
        item.completion.set_task_id(outcome.task_id);
        item.completion.set_lease_id(outcome.lease_id);
        item.completion.set_pathway(outcome.result.pathway);
        if (outcome.result.output) *item.completion.mutable_output() = *outcome.result.output;
        summary_.completed[stage]++;
        Queue(kComplete, std::move(item));
        return;
      case Outcome::kRetryLater:
        item.release.set_task_id(outcome.task_id);
        item.release.set_lease_id(outcome.lease_id);
        *item.release.mutable_retry_after() = DurationOf(outcome.after.count() / 1000.0);
        summary_.retried[stage]++;
        Queue(kRelease, std::move(item));
        return;
      case Outcome::kPermanent:
      case Outcome::kFailed:
        item.failure.set_task_id(outcome.task_id);
        item.failure.set_lease_id(outcome.lease_id);
        item.failure.set_error(outcome.error);
        item.failure.set_non_retryable(outcome.kind == Outcome::kPermanent);
        std::cerr << "agentrun: task " << outcome.task_id << " (" << stage << ") attempt "
                  << lease.attempt() << "/" << lease.max_attempts() << " failed: " << outcome.error
                  << "\n";
        summary_.failed[stage]++;
        if (outcome.kind == Outcome::kPermanent || lease.attempt() >= lease.max_attempts()) {
          summary_.dead[stage]++;
        }
        Queue(kFail, std::move(item));
        return;
    }
  }

  void StartTasks() {
    while (!ready_.empty()) {
      std::string task_id = ready_.front();
      ready_.pop_front();
      const v1::Lease& lease = held_.at(task_id).lease;
      auto function = options_.stages.find(lease.stage());
      if (function == options_.stages.end() || draining_) {
        Item item;
        item.set_task_id(task_id);
        item.set_lease_id(lease.lease_id());
        item.release.set_task_id(task_id);
        item.release.set_lease_id(lease.lease_id());
        Queue(kRelease, std::move(item));
        continue;
      }
      auto revoked = std::make_shared<Revocation>();
      running_[task_id + "/" + lease.lease_id()] = revoked;
      pool_->Submit([this, lease, revoked, fn = function->second] {
        Outcome outcome{lease.task_id(), lease.lease_id(), Outcome::kDone, {}, "", {}};
        try {
          outcome.result = fn(lease, *revoked);
        } catch (const RetryLater& later) {
          outcome.kind = Outcome::kRetryLater;
          outcome.after = later.after;
        } catch (const PermanentError& error) {
          outcome.kind = Outcome::kPermanent;
          outcome.error = error.what();
        } catch (const std::exception& error) {
          outcome.kind = Outcome::kFailed;
          outcome.error = error.what();
        } catch (...) {
          outcome.kind = Outcome::kFailed;
          outcome.error = "the stage function threw something not a std::exception";
        }
        Post(std::move(outcome));
      });
    }
  }

  void StartDrain() {
    if (draining_) return;
    draining_ = drain_pending_ = true;
    while (!ready_.empty()) {  // received, not started: handed back
      std::string task_id = ready_.front();
      ready_.pop_front();
      Item item;
      item.set_task_id(task_id);
      item.set_lease_id(held_.at(task_id).lease.lease_id());
      item.release.set_task_id(task_id);
      item.release.set_lease_id(item.lease_id());
      Queue(kRelease, std::move(item));
    }
  }

  void Close() { closing_ = true; }

  std::vector<v1::WorkRequest> Outgoing(double now) {
    std::vector<v1::WorkRequest> out;
    if (reconnect_asked_) return out;
    if (drain_pending_) {
      drain_pending_ = false;
      out.emplace_back().mutable_drain();
    }
    for (auto& [task, held] : held_) {
      if (!held.extending && held.deadline - now < held.duration / 2) {
        held.extending = true;
        Item item;
        item.set_task_id(task);
        item.set_lease_id(held.lease.lease_id());
        item.extension.set_task_id(task);
        item.extension.set_lease_id(held.lease.lease_id());
        *item.extension.mutable_lease_duration() = DurationOf(held.duration);
        pending_[kExtend].push_back(std::move(item));
      }
    }
    for (int kind = kComplete; kind < kKinds; ++kind) {
      auto& items = pending_[kind];
      if (items.empty()) continue;
      v1::WorkRequest& request = out.emplace_back();
      for (const auto& item : items) {
        if (kind == kComplete) *request.mutable_complete_tasks()->add_completions() = item.completion;
        if (kind == kFail) *request.mutable_fail_tasks()->add_failures() = item.failure;
        if (kind == kRelease) *request.mutable_release_tasks()->add_releases() = item.release;
        if (kind == kExtend) *request.mutable_extend_leases()->add_extensions() = item.extension;
      }
      written_.emplace_back(static_cast<Kind>(kind), std::move(items));
      items.clear();
    }
    if (out.empty() && idle_timeout_ > 0 && now - last_write_ >= idle_timeout_ / 3) {
      out.emplace_back().mutable_heartbeat();
    }
    if (!out.empty()) last_write_ = now;
    return out;
  }

  Clock::time_point NextWriteAt(double now) const {
    double soon = now + 1.0;
    for (const auto& [task, held] : held_) {
      if (!held.extending) soon = std::min(soon, held.deadline - held.duration / 2);
    }
    if (idle_timeout_ > 0) soon = std::min(soon, last_write_ + idle_timeout_ / 3);
    soon = std::max(soon, now);
    return Clock::time_point(std::chrono::duration_cast<Clock::duration>(
        std::chrono::duration<double>(soon)));
  }

  bool DoneWriting() const {
    if (reconnect_asked_) return true;
    if (!closing_) return false;
    for (const auto& items : pending_) {
      if (!items.empty()) return false;
    }
    return true;
  }

  size_t Unsettled() const {
    size_t n = pending_[kComplete].size() + pending_[kFail].size() + pending_[kRelease].size();
    for (const auto& [kind, items] : written_) {
      if (kind != kExtend) n += items.size();
    }
    return n;
  }

  bool Finished() const { return held_.empty() && (empty_ || draining_ || closing_); }

  std::unique_ptr<v1::OrchestratorService::Stub> stub_;
  WorkerOptions options_;
  WorkerSummary summary_;
  std::map<std::string, Held> held_;
  std::deque<std::string> ready_;
  std::vector<Item> pending_[kKinds];
  std::deque<std::pair<Kind, std::vector<Item>>> written_;
  std::set<std::string> resent_;
  std::map<std::string, std::shared_ptr<Revocation>> running_;
  bool empty_ = false, draining_ = false, drain_pending_ = false, closing_ = false;
  bool reconnect_asked_ = false;
  double idle_timeout_ = 0, last_write_ = 0;
  std::mutex mutex_;
  std::condition_variable changed_;
  std::deque<Event> events_;
  bool drain_asked_ = false;
  std::unique_ptr<Pool> pool_;  // last: destroyed first, its functions finished while the rest lives
};

Worker::Worker(std::shared_ptr<grpc::Channel> channel, WorkerOptions options)
    : impl_(std::make_unique<Impl>(std::move(channel), std::move(options))) {}
Worker::~Worker() = default;
WorkerSummary Worker::Run() { return impl_->Run(); }
void Worker::Drain() { impl_->Drain(); }

}  // namespace agentrun
