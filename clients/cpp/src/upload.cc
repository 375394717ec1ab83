#include <random>
#include <regex>
#include <thread>

#include "agentrun/client.h"

namespace agentrun {
namespace {

struct Item {
  size_t index;
  const v1::AgentRun* run;
  size_t size;
};

bool TooLarge(const grpc::Status& status) {
  static const std::regex pattern("larger than max|message too large|max_runs_per_message",
                                  std::regex::icase);
  return (status.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED ||
          status.error_code() == grpc::StatusCode::INVALID_ARGUMENT) &&
         std::regex_search(status.error_message(), pattern);
}

grpc::Status UploadOnce(v1::IngestionService::StubInterface& stub, const std::string& collection,
                        const std::vector<Item>& items, const UploadOptions& options,
                        v1::UploadAgentRunsResponse* response) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + options.timeout);
  auto writer = stub.UploadAgentRuns(&context, response);
  v1::UploadAgentRunsRequest message;
  message.set_collection_id(collection);
  size_t bytes = 0;
  for (size_t i = 0; i < items.size(); ++i) {
    *message.add_agent_runs() = *items[i].run;
    bytes += items[i].size;
    bool last = i + 1 == items.size();
    if (last || message.agent_runs_size() >= options.max_message_runs ||
        bytes + items[i + 1].size > options.max_message_bytes) {
      if (!writer->Write(message)) break;  // the status comes with Finish
      message.clear_agent_runs();
      bytes = 0;
    }
  }
  writer->WritesDone();
  return writer->Finish();
}

void Deliver(v1::IngestionService::StubInterface& stub, const std::string& collection,
             const std::vector<Item>& items, const UploadOptions& options, UploadResult& result) {
  std::mt19937 random(std::random_device{}());
  for (int attempt = 1;; ++attempt) {
    v1::UploadAgentRunsResponse response;
    grpc::Status status = UploadOnce(stub, collection, items, options, &response);
    if (status.ok()) {
      result.accepted += static_cast<int>(response.accepted_count());
      result.duplicates += static_cast<int>(response.duplicate_count());
      for (auto rejected : response.rejected()) {
        if (rejected.index() < items.size()) {
          rejected.set_index(static_cast<uint32_t>(items[rejected.index()].index));
        }
        result.rejected.push_back(std::move(rejected));
      }
      return;
    }
    if (TooLarge(status)) {
      if (items.size() > 1) {
        size_t middle = items.size() / 2;
        Deliver(stub, collection, {items.begin(), items.begin() + middle}, options, result);
        Deliver(stub, collection, {items.begin() + middle, items.end()}, options, result);
        return;
      }
      v1::RejectedAgentRun rejected;
      rejected.set_index(static_cast<uint32_t>(items[0].index));
      rejected.set_agent_run_id(items[0].run->id());
      rejected.set_reason(v1::REJECTION_REASON_TOO_LARGE);
      rejected.set_message("the server refused the run as too large: " + status.error_message());
      result.rejected.push_back(std::move(rejected));
      return;
    }
    if (!IsTransient(status.error_code()) || attempt >= options.max_attempts) {
      throw std::runtime_error("upload failed (code " +
                               std::to_string(static_cast<int>(status.error_code())) +
                               "): " + status.error_message());
    }
    // The SDK's backoff: 0.25 s doubling to 30 s, 20 % jitter.
    double delay = std::min(30.0, 0.25 * (1 << std::min(attempt - 1, 10)));
    delay *= std::uniform_real_distribution<double>(0.8, 1.2)(random);
    std::this_thread::sleep_for(std::chrono::duration<double>(delay));
  }
}

}  // namespace

UploadResult Upload(v1::IngestionService::StubInterface& stub, const std::string& collection_id,
                    const std::vector<v1::AgentRun>& runs, const UploadOptions& options) {
  std::vector<Item> items;
  items.reserve(runs.size());
  for (size_t i = 0; i < runs.size(); ++i) items.push_back({i, &runs[i], runs[i].ByteSizeLong()});
  UploadResult result;
  if (!items.empty()) Deliver(stub, collection_id, items, options, result);
  return result;
}

}  // namespace agentrun
