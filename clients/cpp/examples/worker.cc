// agentrun-worker: serves stages of a workflow with a C++ stage function; drains on SIGTERM or
// Ctrl-C (the running tasks finish and are settled, then it exits).
//
//   agentrun-worker WORKFLOW STAGE[,STAGE...] [PATHWAY[,PATHWAY...]] [--work-ms N] [--credits N]
//                   [--exit-when-empty]
//
// The stage function counts the run's messages and takes each stage's PATHWAY (none at a
// terminal stage).
// The connection comes from $AGENTRUN_SERVER, $AGENTRUN_API_KEY and $AGENTRUN_TLS_*.
#include <atomic>
#include <csignal>
#include <iostream>
#include <thread>

#include "agentrun/worker.h"

namespace {
std::atomic<bool> signalled{false};
void OnSignal(int) { signalled = true; }
}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> positional;
  int work_ms = 0;
  agentrun::WorkerOptions options;
  options.name = "cpp-example-worker";
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--work-ms" && i + 1 < argc) {
      work_ms = std::stoi(argv[++i]);
    } else if (arg == "--credits" && i + 1 < argc) {
      options.credits = static_cast<uint32_t>(std::stoul(argv[++i]));
    } else if (arg == "--exit-when-empty") {
      options.exit_when_empty = true;
    } else {
      positional.push_back(arg);
    }
  }
  if (positional.size() < 2) {
    std::cerr << "usage: agentrun-worker WORKFLOW STAGE [PATHWAY] [--work-ms N] [--credits N] "
                 "[--exit-when-empty]\n";
    return 2;
  }
  options.workflow = positional[0];
  auto split = [](const std::string& text) {
    std::vector<std::string> parts;
    size_t start = 0;
    for (size_t comma; (comma = text.find(',', start)) != std::string::npos; start = comma + 1) {
      parts.push_back(text.substr(start, comma - start));
    }
    parts.push_back(text.substr(start));
    return parts;
  };
  std::vector<std::string> stages = split(positional[1]);
  std::vector<std::string> pathways = positional.size() > 2 ? split(positional[2]) : std::vector<std::string>{};
  for (size_t i = 0; i < stages.size(); ++i) {
    std::string pathway = i < pathways.size() ? pathways[i] : "";
    options.stages[stages[i]] = [pathway, work_ms](const agentrun::v1::Lease& lease,
                                                   const agentrun::Revocation& revoked) {
    int messages = 0;
    for (const auto& transcript : lease.agent_run().transcripts()) {
      messages += transcript.messages_size();
    }
    if (revoked.WaitFor(std::chrono::milliseconds(work_ms))) throw std::runtime_error("revoked");  // not settled either way
    return agentrun::StageResult{
        pathway, agentrun::ValueFromJson("{\"worker\": \"cpp\", \"messages\": " +
                                         std::to_string(messages) + ", \"attempt\": " +
                                         std::to_string(lease.attempt()) + "}")};
    };
  }
  std::signal(SIGTERM, OnSignal);
  std::signal(SIGINT, OnSignal);
  try {
    agentrun::Worker worker(agentrun::Connect(), options);
    std::atomic<bool> done{false};
    std::thread watcher([&] {
      while (!done) {
        if (signalled.exchange(false)) worker.Drain();
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
      }
    });
    agentrun::WorkerSummary summary;
    try {
      summary = worker.Run();
    } catch (...) {
      done = true;
      watcher.join();
      throw;
    }
    done = true;
    watcher.join();
    auto total = [](const std::map<std::string, int>& counts) {
      int n = 0;
      for (const auto& [stage, count] : counts) n += count;
      return n;
    };
    std::cout << "completed=" << total(summary.completed) << " failed=" << total(summary.failed)
              << " dead=" << total(summary.dead) << " revoked=" << total(summary.revoked)
              << std::endl;
    return total(summary.dead) > 0 ? 3 : 0;  // tasks ended dead, as the Python Runner says it
  } catch (const std::exception& error) {
    std::cerr << "agentrun-worker: " << error.what() << "\n";
    return 1;
  }
}
